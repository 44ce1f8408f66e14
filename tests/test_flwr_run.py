"""The `make run` path: this app through a real `flwr run` on a local SuperLink.

scripts/run.py (simulation engine) and tests/local_deployment.py (real SuperNodes) each run as a
subprocess with a unique marker in its environment, which every process they start inherits
(SuperLink -> SuperExec -> flwr-simulation -> Ray, or SuperNode -> ClientApp). While they run,
the test records the marked processes; once they exit, none may be left: an independent check
of their cleanup.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from scripts.processes import free_port, wait_for_port
from scripts.run import run_config_string

REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = "FEDMAE_TEST_RUN_MARKER"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc"),
]


def _marked(token: str) -> dict[int, str]:
    """Live (non-zombie) processes whose environment carries this marker: pid -> command."""
    marker, found = f"{MARKER}={token}".encode(), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # it ended meanwhile
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat[stat.rfind(")") + 2] != "Z":
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    found[int(pid)] = cmd.decode(errors="replace")
    return found


def _watched(
    args: list[str], tmp_path: Path, timeout: float = 600, kill_when: str | None = None
) -> tuple[int, str, str, dict]:
    """Run ``python args`` with a fresh marker: exit code, output, marked processes seen, left.
    With ``kill_when``, SIGKILL the runner once a marked command contains it, and give what it
    started a minute to end."""
    token, seen = uuid.uuid4().hex, {}
    out_path = tmp_path / "runner-output.txt"
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO_ROOT,
            env={**os.environ, MARKER: token},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            seen.update(_marked(token))
            if kill_when and kill_when in " ".join(seen.values()):
                time.sleep(2.0)  # the guard notes the runner's processes twice a second
                proc.kill()
            time.sleep(0.5)
        if proc.poll() is None:
            proc.terminate()  # the runner's own cleanup path
        rc = proc.wait(60)
    left, give_up = _marked(token), time.monotonic() + (60 if kill_when else 0)
    while left and time.monotonic() < give_up:
        time.sleep(0.5)
        left = _marked(token)
    return rc, out_path.read_text(), " ".join(seen.values()), left


def test_flwr_run_completes_writes_the_run_and_cleans_up(tmp_path: Path, tiny_overrides) -> None:
    """6 SuperNodes, 2 blocks x 2 rounds: exit 0, outputs written, nothing left running."""
    pyproject_before = (REPO_ROOT / "pyproject.toml").read_bytes()
    home = tmp_path / "flwr-home"
    rc, out, seen, left = _watched(
        ["scripts/run.py", "--num-supernodes", "6", "--flwr-home", str(home),
         "--run-config", run_config_string(tiny_overrides)],
        tmp_path,
    )  # fmt: skip

    assert rc == 0, out[-4000:]
    summary = json.loads((Path(tiny_overrides["output-dir"]) / "tiny" / "summary.json").read_text())
    assert summary["depth"] == 2 and len(summary["stages"]) == 2
    # The SuperLink, SuperExec, flwr-simulation and Ray all ran under the marker, and all ended.
    for command in ("flower-superlink", "flower-superexec", "flwr-simulation", "raylet"):
        assert command in seen, f"{command} never seen: {seen[:2000]}"
    assert left == {}, f"processes survived: {left}"
    # The connection lives in $FLWR_HOME/config.toml; `flwr run` left pyproject.toml alone.
    assert "[superlink.fedmae-local]" in (home / "config.toml").read_text()
    assert (REPO_ROOT / "pyproject.toml").read_bytes() == pyproject_before


def test_flwr_run_with_a_bad_value_fails_with_a_readable_message(tmp_path: Path, tiny_overrides):
    """Checked by the runner before anything starts; unchecked (a SuperLink of your own), the
    ServerApp names it at its start and the run ends finished:failed."""
    bad = run_config_string({**tiny_overrides, "mask-ratio": 1.5})
    home = ["--flwr-home", str(tmp_path / "home")]
    rc, out, seen, left = _watched(["scripts/run.py", *home, "--run-config", bad], tmp_path)
    assert rc == 2 and "refused, nothing started: Bad value for config key 'mask-ratio'" in out
    assert "flower-superlink" not in seen and left == {}
    rc, out, _, left = _watched(
        ["scripts/run.py", "--num-supernodes", "2", *home, "--run-config", bad,
         "--no-config-check"],
        tmp_path,
    )  # fmt: skip
    assert rc == 1
    assert "Bad value for config key 'mask-ratio': 1.5. Allowed: a number in (0, 1)" in out
    assert "[run] FAILED: the run finished:failed" in out
    assert left == {}


def test_the_runner_reports_a_rejected_submission_and_leaves_nothing(tmp_path: Path):
    """An unknown key: Flower refuses the run at submission; the SuperLink still ends."""
    rc, out, seen, left = _watched(
        ["scripts/run.py", "--flwr-home", str(tmp_path / "home"), "--run-config", "no-such-key=1",
         "--no-config-check"],  # the runner's own check would name it before starting anything
        tmp_path,
    )  # fmt: skip
    assert rc == 1 and "[run] FAILED: the run never submitted" in out
    assert "flower-superlink" in seen and left == {}


def test_a_timeout_stops_the_run_and_ends_ray_too(tmp_path: Path, tiny_overrides):
    """Mid-run, a stopped SuperLink leaves flwr-simulation and Ray running: the runner ends them."""
    long_run = {**tiny_overrides, "rounds-per-stage": 500}
    rc, out, seen, left = _watched(
        ["scripts/run.py", "--num-supernodes", "6", "--flwr-home", str(tmp_path / "home"),
         "--timeout", "45", "--run-config", run_config_string(long_run)],
        tmp_path,
    )  # fmt: skip
    assert rc == 124, out[-4000:]
    assert "[run] TIMEOUT: still running after 45 s" in out
    assert "raylet" in seen and left == {}, f"processes survived: {left}"


def test_a_sigkilled_runner_leaves_nothing_running(tmp_path: Path, tiny_overrides):
    """`kill -9` (or the OOM killer) cannot be caught: the runner's guard ends the SuperLink,
    SuperExec, flwr-simulation and Ray it left behind (scripts/processes.py)."""
    long_run = {**tiny_overrides, "rounds-per-stage": 500}
    rc, out, seen, left = _watched(
        ["scripts/run.py", "--num-supernodes", "4", "--flwr-home", str(tmp_path / "home"),
         "--run-config", run_config_string(long_run)],
        tmp_path, timeout=300, kill_when="raylet",
    )  # fmt: skip
    assert rc == -signal.SIGKILL, out[-4000:]
    assert "flwr-simulation" in seen and left == {}, f"processes survived: {left}"
    # Ray's session folder under the runner's temp folder (named in Ray's command lines): the
    # guard removed it too, once the processes writing into it had ended.
    ray_temps = set(re.findall(r"(/tmp/tmp[^/\s]+)/ray/", seen))
    assert ray_temps and not any(map(os.path.exists, ray_temps)), ray_temps


def test_a_simulation_joins_a_running_ray_cluster(tmp_path: Path, tiny_overrides):
    """--ray-address: the virtual nodes run on a Ray cluster started beforehand (here a head on
    this machine, `ray start --head --block`), and the run starts no Ray of its own."""
    ray_tmp = Path(tempfile.mkdtemp(dir="/tmp"))  # Ray's socket paths must be short
    port, token = free_port(), uuid.uuid4().hex
    with (tmp_path / "ray-head.log").open("wb") as log:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
             "--port", str(port), "--num-cpus", "2", "--include-dashboard", "false",
             "--disable-usage-stats"],
            env={**os.environ, "RAY_TMPDIR": str(ray_tmp), MARKER: token},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        assert wait_for_port(port, head, timeout=120), (tmp_path / "ray-head.log").read_text()
        rc, out, seen, left = _watched(
            ["scripts/run.py", "--num-supernodes", "6", "--flwr-home", str(tmp_path / "home"),
             "--ray-address", f"127.0.0.1:{port}",
             "--run-config", run_config_string(tiny_overrides)],
            tmp_path,
        )  # fmt: skip
        assert rc == 0, out[-4000:]
        assert "flwr-simulation" in seen and left == {}
        assert "raylet" not in seen and "gcs_server" not in seen  # no Ray of its own
        # The simulation was the cluster's driver: with no Ray of its own, its ClientApps ran
        # on the cluster's workers.
        logs = ray_tmp / "ray" / "session_latest" / "logs"
        assert list(logs.glob("python-core-driver-*.log")), sorted(p.name for p in logs.iterdir())
    finally:
        head.terminate()  # `ray start --block` ends the cluster's processes on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(60)
        leftovers = _marked(token)
        for pid in leftovers:  # ours, by PID: only if the head failed to end them
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert leftovers == {}, f"the Ray head left processes: {leftovers}"


def test_deployed_supernodes_each_read_their_own_folder(tmp_path: Path, tiny_overrides):
    """A real SuperLink (no simulation) and 2 SuperNodes whose --node-config data-path differ;
    3 clients per round asked, min-available-clients 2: every round trains on the 2 there are
    (partial rounds) instead of waiting node-wait-timeout for a third and failing. One block,
    two rounds: each message costs a deployment ~15 s on 2 cores (a ClientApp process each);
    tests/test_secure_deployment.py runs the cascade's later stages deployed."""
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
        "clients-per-round": 3,
        "min-available-clients": 2,
        "evaluate-clients": 2,
        "finetune-labels": 0,
        "depth": 1,
    }
    nodes = [arg for node in sizes for arg in ("--node-config", f"data-path='{tmp_path / node}'")]
    rc, out, seen, left = _watched(
        ["-m", "tests.local_deployment", "--flwr-home", str(tmp_path / "home"), *nodes,
         "--run-config", run_config_string(overrides)],
        tmp_path,
    )  # fmt: skip
    assert rc == 0, out[-4000:]
    rows = [
        json.loads(line)
        for line in (Path(overrides["output-dir"]) / "tiny" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    # each node trains on its whole folder less its held-out share: 12 - 1 + 24 - 2 images
    assert {r["examples"] for r in rows} == {33.0}
    assert all(r["clients"] == 2 and r["sampled"] == 2 for r in rows)
    assert "round 1 trains on the 2 usable nodes connected, not 3" in out
    assert seen.count("flower-supernode") >= 2 and left == {}, f"processes survived: {left}"
