"""The quality benchmark's report: table cells and plots from run summaries (no training)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.quality import POSTHOC_KEY, write_report


def fake_run(algorithm: str, seed: int, finetune: float, out_root) -> dict:
    stages = [] if algorithm == "random-init" else [{"stage": 0, "psnr": 12.0}]
    rows = [] if algorithm == "random-init" else [
        {"round": 1, "knn-accuracy": 0.5 + seed / 100},
        {"round": 2, "knn-accuracy": 0.6 + seed / 100},
    ]  # fmt: skip
    name = f"{algorithm}-s{seed}"
    if stages:
        (out_root / name / "reconstructions").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(
            out_root / name / "reconstructions" / "stage-0.png"
        )
    comm = {
        "client-train-mbytes-peak": 56.0,
        "bytes-up-per-client-round": 2 * 2**20,
        "bytes-down-per-client-round": 3 * 2**20,
        "client-train-seconds-mean": 1.0,
        "bytes-up-total": 10 * 2**20,
        "bytes-down-total": 20 * 2**20,
    }
    summary = {
        "final-psnr": 12.0 if stages else None,
        "stages": stages,
        "finetune-accuracy": {algorithm: finetune},
        "linear-probe-accuracy": {algorithm: 0.7},
        "knn-accuracy": {algorithm: 0.6},
        "communication": comm,
        "wall-seconds": 100.0,
    }
    return {"name": name, "algorithm": algorithm, "seed": seed, "summary": summary, "rows": rows}


def test_report_has_mean_and_spread_over_seeds_and_the_plots(tmp_path):
    out_root = tmp_path / "runs"
    grid = {
        ("fedmae", "iid"): [
            fake_run("fedmae", 0, 0.70, out_root),
            fake_run("fedmae", 1, 0.80, out_root),
        ],
        ("random-init", "pooled"): [fake_run("random-init", 0, 0.60, out_root)],
    }
    # The full-recipe fine-tune ran afterwards for the fedmae runs only.
    for run, accuracy in zip(grid[("fedmae", "iid")], (0.66, 0.68), strict=True):
        run["summary"][POSTHOC_KEY] = {"fedmae": accuracy}
    path = write_report(grid, "python -m benchmarks.quality", tmp_path / "docs", out_root)
    text = path.read_text()
    # mean 75.0, sample standard deviation of (70, 80) = 7.1
    assert (
        "| fedmae | iid | 75.0 ± 7.1 | 67.0 ± 1.4 | 70.0 ± 0.0 | 60.0 ± 0.0 | 12.00 | 56 | 2.00 "
        "| 3.00 |" in text
    )
    assert "| random-init | pooled | 60.0 | - | 70.0 | 60.0 | - |" in text
    assert "python -m benchmarks.quality" in text
    assert "- iid: fedmae vs random-init: fine-tune +15.0, probe +0.0, k-NN +0.0 points" in text
    for picture in ("accuracy-vs-rounds", "accuracy-vs-bytes", "reconstructions"):
        assert (tmp_path / "docs" / f"results-{picture}.png").stat().st_size > 0
