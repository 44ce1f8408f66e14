"""The quality benchmark's report: table cells and plots from run summaries (no training)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from benchmarks.quality import write_report
from benchmarks.quality_grid import POSTHOC_KEY


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


def write_run_dir(
    out_root,
    algorithm: str,
    partition: str,
    seed: int,
    finetune: float,
    evaluation: dict,
    changes: dict | None = None,
    wall_seconds: float = 100.0,
) -> str:
    """A finished run folder as the harness would leave it (config.yaml of its overrides)."""
    import json
    import shutil

    from benchmarks.harness import BUDGET, PARTITIONS, run_name
    from fedmae_flwr.config import from_flat, to_yaml

    name = run_name(algorithm, partition, seed, changes)
    run_dir, fakes = out_root / name, out_root / ".fakes"
    run = fake_run(algorithm, seed, finetune, fakes)
    if (fakes / run["name"]).is_dir():  # its reconstructions
        shutil.copytree(fakes / run["name"], run_dir, dirs_exist_ok=True)
    shutil.rmtree(fakes, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = {**BUDGET, **evaluation, **PARTITIONS[partition], "algorithm": algorithm,
                 "seed": seed, **(changes or {})}  # fmt: skip
    overrides |= {"output-dir": str(out_root), "run-name": name}
    (run_dir / "config.yaml").write_text(to_yaml(from_flat(overrides)))
    result = {"accuracy": finetune, "train_accuracy": finetune}
    summary = {**run["summary"], "wall-seconds": wall_seconds,
               "downstream": {"finetune": {algorithm: result}}}  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in run["rows"]))
    return name


def test_the_grid_report_reads_its_times_from_the_run_files(tmp_path):
    """Wall time, start-up and post-hoc fine-tune minutes: from summary.json, the harness'
    bench-run.json and the fine-tune cache; change a file and the text follows."""
    import json

    from benchmarks import quality, quality_grid
    from benchmarks.harness import EVALUATION, GRID_EVALUATION, RUN_RECORD
    from benchmarks.label_efficiency import cache_path

    out_root = tmp_path / "runs"
    names = [
        write_run_dir(out_root, "fedmae", "iid", 0, 0.7, GRID_EVALUATION, wall_seconds=1500.0),
        write_run_dir(out_root, "random-init", "iid", 0, 0.6, GRID_EVALUATION, wall_seconds=900.0),
    ]
    for name, seconds in zip(names, (1520.0, 930.0), strict=True):  # start-up 20 and 30 s
        (out_root / name / RUN_RECORD).write_text(json.dumps({"flwr-run-seconds": seconds}))
    labels, epochs = GRID_EVALUATION["finetune-labels"], EVALUATION["finetune-epochs"]
    for name, seconds in zip(names, (600.0, 1200.0), strict=True):
        record = {"accuracy": 0.65, "seconds": seconds, "machine": "the test machine"}
        cache_path(out_root / name, labels, epochs=epochs).write_text(json.dumps(record))

    def report() -> str:
        grid = {}
        for algorithm in ("fedmae", "random-init"):
            run = quality_grid.run_one(algorithm, "iid", 0, out_root, report_only=True)
            grid[(algorithm, "pooled" if algorithm == "random-init" else "iid")] = [run]
        return quality.write_report(grid, "cmd", tmp_path / "docs", out_root).read_text()

    text = report()
    # 1500 + 900 s = 40 min; (20 + 30) / 2 = 25 s; 600 + 1200 s = 30 min
    assert "wall time adds up to 40 min, plus 25 s start-up per run, on" in text
    assert "(`make bench-quality-finetune`, 30 min on the test machine;" in text
    assert "| fedmae | iid | 70.0 | 65.0 |" in text
    summary = json.loads((out_root / names[0] / "summary.json").read_text())
    (out_root / names[0] / "summary.json").write_text(
        json.dumps({**summary, "wall-seconds": 1200.0})
    )
    (out_root / names[1] / RUN_RECORD).unlink()  # a run the harness did not time
    cache_path(out_root / names[1], labels, epochs=epochs).unlink()  # nor fine-tuned afterwards
    text = report()
    # 1200 + 900 s = 35 min; start-up 1520 - 1200 = 320 s, from the one run timed
    assert "adds up to 35 min, plus 320 s start-up per run (1 of 2 runs timed), on" in text
    assert (
        "(`make bench-quality-finetune`, 10 min for 1 of 2 backbones on the test machine;" in text
    )
    # Settings in the prose come from the schema and the evaluation dicts, not from the text.
    assert "Fashion-MNIST (28x28, patch 4, ViT width 192)" in text
    assert "(a 5-epoch fine-tune, 2,000 test images), chosen so that the 22 runs" in text
    assert "the full one (15 epochs, 5,000 test images)" in text
