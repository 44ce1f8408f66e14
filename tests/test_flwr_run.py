"""The `make run` path: this app through a real `flwr run` on a local SuperLink (simulation).

Guards the launcher (SuperLink start, config.toml wiring, status polling, process cleanup) and
the app as Flower packages and runs it (FAB, run-config from pyproject.toml, --run-config).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from scripts.run_local_simulation import read_proc, run_config_string, run_local_simulation

REPO_ROOT = Path(__file__).resolve().parent.parent


def _start_time(pid: int) -> int | None:
    """Start time of a live, non-zombie process; None if gone (PIDs may be reused)."""
    info = read_proc(pid)
    return None if info is None or info.state == "Z" else info.start_time


def _marked_processes(token: str) -> list[int]:
    """PIDs whose environment still carries this run's marker."""
    marker = f"FEDMAE_LOCAL_SIM_TOKEN={token}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.skipif(
    not (Path(sys.executable).parent / "flower-superlink").exists()
    and shutil.which("flower-superlink") is None,
    reason="flower-superlink not installed",
)
def test_flwr_run_completes_writes_the_run_and_cleans_up(tmp_path: Path, tiny_overrides) -> None:
    """6 SuperNodes, 2 blocks x 2 rounds: exit 0, outputs written, nothing left running."""
    pyproject_before = (REPO_ROOT / "pyproject.toml").read_bytes()
    record: dict = {}

    rc = run_local_simulation(
        app_dir=REPO_ROOT,
        num_supernodes=6,
        client_cpus=1,
        run_config=run_config_string(tiny_overrides),
        flwr_home=tmp_path / "flwr-home",
        timeout=600,
        process_record=record,
    )

    assert rc == 0
    summary = json.loads((Path(tiny_overrides["output-dir"]) / "tiny" / "summary.json").read_text())
    assert summary["depth"] == 2 and len(summary["stages"]) == 2
    # The SuperLink, SuperExec, flwr-simulation and Ray daemons were all observed ...
    assert record["superlink_pid"] in record["pids"]
    assert len(record["pids"]) >= 4
    # ... and none of them is still alive (same PID *and* start time => same process).
    alive = [p for p, st in record["pids"].items() if _start_time(p) == st]
    assert alive == [], f"processes survived: {alive}"
    assert record["survivors"] == []
    assert _marked_processes(record["token"]) == []
    with pytest.raises(ProcessLookupError):
        os.killpg(record["superlink_pgid"], 0)
    # `flwr run` must not touch the app's pyproject.toml; the Ray temp dir is removed.
    assert (REPO_ROOT / "pyproject.toml").read_bytes() == pyproject_before
    assert not Path(record["ray_tmpdir"]).exists()


@pytest.mark.slow
def test_flwr_run_with_a_bad_value_fails_with_a_readable_message(tmp_path: Path, tiny_overrides):
    out = io.StringIO()
    rc = run_local_simulation(
        app_dir=REPO_ROOT,
        num_supernodes=2,
        run_config=run_config_string({**tiny_overrides, "mask-ratio": 1.5}),
        flwr_home=tmp_path / "flwr-home",
        timeout=300,
        out=out,
    )
    assert rc == 1
    assert (
        "Bad value for config key 'mask-ratio': 1.5. Allowed: a number in (0, 1)" in out.getvalue()
    )


@pytest.mark.slow
def test_deployed_supernodes_each_read_their_own_folder(tmp_path: Path, tiny_overrides):
    """A real SuperLink (no simulation) and 2 SuperNodes whose --node-config data-path differ."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = {"node-a": 12, "node-b": 24}
    for node, count in sizes.items():
        for cls in ("x", "y"):
            (tmp_path / node / cls).mkdir(parents=True)
            for i in range(count // 2):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / node / cls / f"{i}.png")
    overrides = {
        **tiny_overrides,
        "dataset": "imagefolder",
        "data-path": str(tmp_path / "node-a"),  # the server's own evaluation images
        "in-chans": 3,
        "img-size": 32,
        "clients-per-round": 2,
        "evaluate-clients": 2,
        "finetune-labels": 0,
    }
    record: dict = {}
    rc = run_local_simulation(
        app_dir=REPO_ROOT,
        run_config=run_config_string(overrides),
        flwr_home=tmp_path / "flwr-home",
        timeout=600,
        process_record=record,
        node_configs=[f"data-path='{tmp_path / node}'" for node in sizes],
    )
    assert rc == 0
    rows = [
        json.loads(line)
        for line in (Path(overrides["output-dir"]) / "tiny" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    # each node trains on its own folder minus its test and held-out shares: 9 + 20 images
    assert {r["examples"] for r in rows} == {29.0}
    assert all(r["clients"] == 2 for r in rows)
    alive = [p for p, st in record["pids"].items() if _start_time(p) == st]
    assert alive == [] and record["survivors"] == []
