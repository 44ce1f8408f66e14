"""scripts/device_check.sh's run path on a CPU, with a tiny config, set up like the GPU machine.

There, Flower and Ray are only on PYTHONPATH (no console scripts): ``python3`` here is the venv's
base interpreter with the venv's packages on PYTHONPATH, so scripts/gpu_check.sh has to write the
commands Flower starts by name (flower-superexec, flwr-simulation, ...) itself.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import site
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from scripts.run import run_config_string

REPO_ROOT = Path(__file__).resolve().parent.parent
BASE_PYTHON = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"


def stand_in_bundle(folder: Path, fmnist_dir: Path) -> Path:
    """A device-carry folder: an empty site (the venv's packages come on PYTHONPATH instead) and
    the synthetic Fashion-MNIST idx files unzipped, packed as scripts/pack_device_carry.py does."""
    folder.mkdir()
    with tarfile.open(folder / "site.tar.xz", "w:xz"):
        pass
    with tarfile.open(folder / "fashion-mnist.tar.xz", "w:xz") as tar:
        for gz in sorted(fmnist_dir.glob("*.gz")):
            raw = gzip.decompress(gz.read_bytes())
            info = tarfile.TarInfo(gz.name.removesuffix(".gz"))
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not BASE_PYTHON.exists(), reason="no base interpreter beside the venv")
def test_device_check_runs_ray_engine_and_the_preset_through_flwr_run_on_a_cpu(
    tmp_path, fmnist_dir, tiny_overrides
):
    """The whole device script as the lent machine runs it, CPU-sized: unpack, imports, the Ray
    engine benchmark (one setting, 8 SuperNodes), then the preset through `flwr run`."""
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(BASE_PYTHON)
    keep = ("data-path", "output-dir", "run-name")  # gpu_check.sh sets these itself
    tiny = {k: v for k, v in tiny_overrides.items() if k not in keep}
    # no fine-tuning: its protocol is tested elsewhere; this test is the script's run path
    tiny |= {"local-epochs": 1, "stage-knn-images": 100, "evaluate-random-init": False,
             "finetune-labels": 0}  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin",  # no venv, no flower-* commands
        "PYTHONPATH": os.pathsep.join([*site.getsitepackages(), str(REPO_ROOT)]),
        "DEVICE_CARRY": str(stand_in_bundle(tmp_path / "carry", fmnist_dir)),
        "RAY_ENGINE_SECONDS": "60",
        "RAY_SUPERNODES": "8",
        "RAY_CLIENTS": "2",
        "RAY_CLIENT_GPUS": "0",
        "CLIENT_GPUS": "0",
        "NUM_SUPERNODES": "6",
        "EXTRA_RUN_CONFIG": run_config_string(tiny),
    }
    cmd = ["bash", "scripts/device_check.sh", str(out), "500", "0"]
    subprocess.run(cmd, cwd=REPO_ROOT, env=env, timeout=600, check=True, capture_output=True)

    log = (out / "gpu-check.log").read_text()
    assert "[device-check] imports ok" in log and "ray_engine exit 0" in log, log[-4000:]
    results = json.loads((out / "ray-engine" / "results.json").read_text())
    assert [(r["supernodes"], r["clients"], r["client-gpus"]) for r in results] == [(8, 2, 0)]
    assert "benchmarks.ray_engine" in (out / "ray-engine" / "ray-engine.md").read_text()
    assert "[gpu-check] fmnist-gpu-s0: exit 0 " in log, log[-4000:]
    assert "flwr-simulation" in log or "Starting Flower Simulation" in log
    summary = json.loads((out / "fmnist-gpu-s0-summary.json").read_text())
    assert summary["run-name"] == "fmnist-gpu-s0" and summary["depth"] == 2
    assert (out / "fmnist-gpu-s0-metrics.jsonl").read_text().count("\n") == 4  # 2 blocks x 2 rounds
    assert sorted(p.name for p in out.iterdir()) == [
        "fmnist-gpu-s0-config.yaml", "fmnist-gpu-s0-metrics.jsonl", "fmnist-gpu-s0-summary.json",
        "gpu-check.log", "ray-engine",
    ]  # fmt: skip


def test_device_check_without_a_bundle_exits_2_naming_make_device_carry(tmp_path):
    env = {**os.environ, "DEVICE_CARRY": str(tmp_path / "none")}
    cmd = ["bash", "scripts/device_check.sh", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "make device-carry" in done.stderr
