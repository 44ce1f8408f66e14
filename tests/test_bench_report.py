"""The quality benchmark's report: table cells and plots from run summaries (no training), and
the grid's post-hoc fine-tune (benchmarks.grid_finetune) on a tiny exported backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.quality import write_report
from benchmarks.quality_grid import FINETUNE_KEY


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
    # The protocol fine-tune ran afterwards for the fedmae runs only.
    for run, value in zip(grid[("fedmae", "iid")], (0.70, 0.80), strict=True):
        run["summary"][FINETUNE_KEY] = {"fedmae": value}
    bounds = {FINETUNE_KEY: 0.02, "linear-probe-accuracy": 0.005, "knn-accuracy": None}
    path = write_report(
        grid, "python -m benchmarks.quality", tmp_path / "docs", out_root, bounds=bounds
    )
    text = path.read_text()
    # mean 75.0, sample standard deviation of (70, 80) = 7.1
    assert "| fine-tune 1,000 labels (protocol) | linear probe | k-NN | masked PSNR (dB) |" in text
    assert (
        "| fedmae | iid | 0 1 | 75.0 ± 7.1 | 70.0 ± 0.0 | 60.0 ± 0.0 | 12.00 | 56 | 2.00 | 3.00 |"
        in text
    )
    assert "| random-init | pooled | 0 | - | 70.0 | 60.0 | - |" in text
    assert "python -m benchmarks.quality" in text
    # random-init has seed 0 only, and no fine-tune: one pair per measured metric, no verdict.
    assert (
        "| iid | random-init | linear probe | s0 +0.0 | +0.0 | - | 0.5 | one seed: not shown |"
        in text
    )
    assert "| iid | random-init | fine-tune |" not in text
    assert "| no noise bound measured | one seed: not shown |" in text  # k-NN
    for picture in ("accuracy-vs-rounds", "accuracy-vs-bytes", "reconstructions"):
        assert (tmp_path / "docs" / f"results-{picture}.png").stat().st_size > 0


def test_the_page_names_the_commands_that_make_its_runs_and_the_runs_it_lacks(tmp_path):
    """A page written with --report-only over runs that several commands made (IID at 5 seeds,
    Dirichlet at 3, no `local` on one partition) named one command that would make 55 runs."""
    from benchmarks.quality import runs_commands

    out_root, other = tmp_path / "runs", tmp_path / "same-names"  # fake runs are named alike
    grid = {
        ("fedmae", "iid"): [fake_run("fedmae", s, 0.7, out_root) for s in (0, 1, 2, 3, 4)],
        ("random-init", "pooled"): [fake_run("random-init", s, 0.7, out_root) for s in range(5)],
        ("fedmae", "dirichlet-0.1"): [fake_run("fedmae", s, 0.7, other) for s in (0, 1, 2)],
        ("local", "dirichlet-0.1"): [fake_run("local", s, 0.7, out_root) for s in (0, 1, 2)],
    }
    # Every run back from the commands, and no more.
    assert runs_commands(grid) == [
        "python -m benchmarks.quality --algorithms fedmae random-init --partitions iid "
        "--seeds 0 1 2 3 4",
        "python -m benchmarks.quality --algorithms fedmae local --partitions dirichlet-0.1 "
        "--seeds 0 1 2",
    ]
    asked = (["fedmae", "local", "random-init"], ["iid", "dirichlet-0.1"], [0, 1, 2, 3, 4])
    text = write_report(grid, "the page's command --report-only", tmp_path / "docs", out_root,
                        slice_of=asked).read_text()  # fmt: skip
    assert "Command: `the page's command --report-only`; its runs are those of `python" in text
    assert (
        "**Not every run asked for is here** (each row names its seeds): fedmae dirichlet-0.1 "
        "at seeds 3 4; local iid at seeds 0 1 2 3 4; local dirichlet-0.1 at seeds 3 4." in text
    )
    # The cost columns say which run they are; their units are MiB.
    assert "| client peak train MiB | MiB up / client-round |" in text
    assert "| client s / round (lowest seed) | run wall s (mean) |" in text


def test_verdicts_need_one_sign_at_every_seed_and_a_mean_beyond_the_noise_bound():
    from benchmarks.quality import verdict

    assert verdict([0.03, 0.05, 0.04], bound=0.02) == "ahead at every seed"
    # Two seeds never give a verdict, however far beyond the bound.
    assert verdict([0.03, 0.05], bound=0.02) == "2 seeds: not shown"
    assert verdict([-0.03, -0.05, -0.04], bound=0.02) == "behind at every seed"
    assert verdict([0.03, -0.01, 0.05], bound=0.02) == "not shown"  # signs differ
    assert verdict([0.01, 0.02, 0.015], bound=0.02) == "not shown"  # mean within the bound
    assert verdict([0.03, 0.0, 0.02], bound=0.001) == "not shown"  # a zero is no sign
    assert verdict([0.05], bound=0.001) == "one seed: not shown"
    assert verdict([], bound=None) == "one seed: not shown"
    # Without a measured bound: the same sign at 3 or more seeds.
    assert verdict([0.03, 0.05], bound=None) == "2 seeds: not shown"
    assert verdict([0.001, 0.002, 0.003], bound=None) == "ahead at every seed"
    assert verdict([-0.001, -0.002, -0.003], bound=None) == "behind at every seed"


def _with(run: dict, **values: float) -> dict:
    """``run`` with these accuracies (fine-tune, probe, knn) for its own algorithm."""
    keys = {"finetune": FINETUNE_KEY, "probe": "linear-probe-accuracy", "knn": "knn-accuracy"}
    for name, value in values.items():
        run["summary"][keys[name]] = {run["algorithm"]: value}
    return run


def test_comparisons_pair_runs_by_seed_and_drop_a_seed_the_baseline_lacks(tmp_path):
    from benchmarks.quality import comparisons, paired_differences

    out = tmp_path / "runs"
    ours = [
        _with(fake_run("fedmae", 0, 0.0, out / "a"), finetune=0.72, probe=0.80, knn=0.70),
        _with(fake_run("fedmae", 1, 0.0, out / "a"), finetune=0.90, probe=0.81, knn=0.71),
        _with(fake_run("fedmae", 2, 0.0, out / "a"), finetune=0.75, probe=0.79, knn=0.72),
        _with(fake_run("fedmae", 3, 0.0, out / "a"), finetune=0.74, probe=0.80, knn=0.73),
    ]
    # fedavg-mae lacks seed 1; listed out of seed order.
    theirs = [
        _with(fake_run("fedavg-mae", 2, 0.0, out / "b"), finetune=0.72, probe=0.80, knn=0.69),
        _with(fake_run("fedavg-mae", 0, 0.0, out / "b"), finetune=0.70, probe=0.78, knn=0.68),
        _with(fake_run("fedavg-mae", 3, 0.0, out / "b"), finetune=0.71, probe=0.80, knn=0.73),
    ]
    assert paired_differences(ours, theirs, FINETUNE_KEY, "fedavg-mae") == {
        0: pytest.approx(0.02),
        2: pytest.approx(0.03),
        3: pytest.approx(0.03),
    }
    grid = {("fedmae", "iid"): ours, ("fedavg-mae", "iid"): theirs}
    bounds = {FINETUNE_KEY: 0.02, "linear-probe-accuracy": 0.02, "knn-accuracy": None}
    lines = comparisons(grid, bounds)
    # fine-tune: +2, +3, +3, mean 2.7 > 2.0 -> ahead; probe: +2, -1, 0 -> not shown; k-NN:
    # +2, +3, 0 without a bound: a zero is no sign -> not shown.
    assert (
        "| iid | fedavg-mae | fine-tune | s0 +2.0, s2 +3.0, s3 +3.0 | +2.7 | 0.015 | 2.0 "
        "| ahead at every seed |" in lines
    )
    assert (
        "| iid | fedavg-mae | linear probe | s0 +2.0, s2 -1.0, s3 +0.0 | +0.3 | 0.74 | 2.0 "
        "| not shown |" in lines
    )
    assert (
        "| iid | fedavg-mae | k-NN | s0 +2.0, s2 +3.0, s3 +0.0 | +1.7 | 0.2 "
        "| no noise bound measured | not shown |" in lines
    )
    assert "- iid: fedmae vs fedavg-mae: client memory 1.00x, bytes up per client-round 1.00x" in (
        lines
    )
    # A wider bound and the fine-tune lead is no longer shown; a baseline behind at every seed.
    assert "| 3.0 | not shown |" in comparisons(grid, {**bounds, FINETUNE_KEY: 0.03})[2]
    for run in theirs:
        run["summary"][FINETUNE_KEY]["fedavg-mae"] += 0.10
    behind = comparisons(grid, bounds)[2]
    assert "| s0 -8.0, s2 -7.0, s3 -7.0 | -7.3 | 0.0021 | 2.0 | behind at every seed |" in behind


def test_heterogeneity_pairs_each_algorithm_with_itself_on_iid(tmp_path):
    from benchmarks.quality import heterogeneity_comparisons

    out = tmp_path / "runs"

    def runs(algorithm: str, sub: str, finetunes: list[float]) -> list[dict]:
        return [
            _with(fake_run(algorithm, s, 0.0, out / sub), finetune=f, probe=0.8, knn=0.7)
            for s, f in enumerate(finetunes)
        ]

    grid = {
        ("fedmae", "iid"): runs("fedmae", "a", [0.76, 0.75, 0.77]),
        ("fedmae", "dirichlet-0.1"): runs("fedmae", "b", [0.72, 0.70, 0.74]),
        # No IID run of fedavg-mae: nothing to pair it with, so no row.
        ("fedavg-mae", "dirichlet-0.1"): runs("fedavg-mae", "c", [0.60, 0.61, 0.62]),
        ("random-init", "pooled"): runs("random-init", "d", [0.76, 0.76, 0.76]),
    }
    bounds = {FINETUNE_KEY: 0.02, "linear-probe-accuracy": 0.02, "knn-accuracy": None}
    lines = heterogeneity_comparisons(grid, bounds)
    rows = [line for line in lines if line.startswith("| fedmae") or line.startswith("| fedavg")]
    assert rows[0] == (
        "| fedmae | dirichlet-0.1 | fine-tune | s0 -4.0, s1 -5.0, s2 -3.0 | -4.0 | 0.02 | 2.0 "
        "| behind at every seed |"
    )
    # Equal probes at every seed: no sign, not shown.
    assert rows[1].endswith("| +0.0 | 1 | 2.0 | not shown |")
    assert not any(r.startswith("| fedavg-mae") for r in rows)
    # Only IID and pooled runs: no section at all.
    assert heterogeneity_comparisons({k: v for k, v in grid.items() if k[1] != "dirichlet-0.1"},
                                     bounds) == []  # fmt: skip


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


def protocol_record(algorithm: str, subsets: list[float], seconds: float, protocol=None) -> dict:
    """A ``finetune-protocol.json`` as benchmarks.grid_finetune writes it."""
    import statistics

    from benchmarks.harness import FINETUNE_PROTOCOL

    result = {
        "accuracy": statistics.fmean(subsets),
        "accuracy_std": statistics.stdev(subsets),
        "train_accuracy": 0.9,
        "subsets": [{"subset": k, "accuracy": a, "lr": 0.001} for k, a in enumerate(subsets)],
    }
    return {"protocol": dict(FINETUNE_PROTOCOL if protocol is None else protocol),
            "results": {algorithm: result}, "seconds": seconds,
            "machine": "the test machine"}  # fmt: skip


def test_the_grid_report_reads_its_times_and_fine_tunes_from_the_run_files(tmp_path):
    """Wall time, start-up, the fine-tune column and its minutes: from summary.json, the
    harness' bench-run.json and the grid_finetune cache; change a file and the text follows."""
    from benchmarks import quality, quality_grid
    from benchmarks.grid_finetune import CACHE
    from benchmarks.harness import (
        ALGORITHMS,
        EVALUATION,
        FINETUNE_PROTOCOL,
        GRID_EVALUATION,
        PARTITIONS,
        RUN_RECORD,
    )

    out_root = tmp_path / "runs"
    names = [
        write_run_dir(out_root, "fedmae", "iid", 0, 0.7, GRID_EVALUATION, wall_seconds=1500.0),
        write_run_dir(out_root, "random-init", "iid", 0, 0.6, GRID_EVALUATION, wall_seconds=900.0),
    ]
    for name, seconds in zip(names, (1520.0, 930.0), strict=True):  # start-up 20 and 30 s
        (out_root / name / RUN_RECORD).write_text(json.dumps({"flwr-run-seconds": seconds}))
    records = [
        protocol_record("fedmae", [0.64, 0.66, 0.65], 600.0),
        protocol_record("random-init", [0.57, 0.58, 0.59], 1200.0),
    ]
    for name, record in zip(names, records, strict=True):
        (out_root / name / CACHE).write_text(json.dumps(record))

    def report() -> str:
        grid = {}
        for algorithm in ("fedmae", "random-init"):
            run = quality_grid.run_one(algorithm, "iid", 0, out_root, report_only=True)
            grid[(algorithm, "pooled" if algorithm == "random-init" else "iid")] = [run]
        bounds = {key: None for key, _, _ in quality.ACCURACY_LABELS}
        docs = tmp_path / "docs"
        return quality.write_report(grid, "cmd", docs, out_root, bounds=bounds).read_text()

    text = report()
    # 1500 + 900 s = 40 min; (20 + 30) / 2 = 25 s; 600 + 1200 s = 30 min
    assert "wall time adds up to 40 min, plus 25 s start-up per run, on" in text
    assert "it ran for every run, 30 min on the test machine." in text
    assert "| fedmae | iid | 0 | 65.0 | 70.0 | 60.0 |" in text  # the mean over the 3 subsets
    assert "| random-init | pooled | 0 | 58.0 | 70.0 |" in text
    assert "- fedmae-iid-s0: 64.0, 66.0, 65.0 (65.0 ± 1.0; kept lr 0.001; train top-1 90.0)" in text
    assert "| iid | random-init | fine-tune | s0 +7.0 | +7.0 | - | no noise bound measured " in text
    summary = json.loads((out_root / names[0] / "summary.json").read_text())
    (out_root / names[0] / "summary.json").write_text(
        json.dumps({**summary, "wall-seconds": 1200.0})
    )
    (out_root / names[1] / RUN_RECORD).unlink()  # a run the harness did not time
    # ... and whose fine-tune was made under another protocol: not this column's value.
    other = {**FINETUNE_PROTOCOL, "finetune-epochs": FINETUNE_PROTOCOL["finetune-epochs"] + 1}
    stale = protocol_record("random-init", [0.1, 0.2, 0.3], 1200.0, protocol=other)
    (out_root / names[1] / CACHE).write_text(json.dumps(stale))
    text = report()
    # 1200 + 900 s = 35 min; start-up 1520 - 1200 = 320 s, from the one run timed
    assert "adds up to 35 min, plus 320 s start-up per run (1 of 2 runs timed), on" in text
    assert "it ran for 1 of 2 runs, 10 min on the test machine: fedmae-iid-s0 ('-' where" in text
    assert "| random-init | pooled | 0 | - | 70.0 |" in text
    # Settings in the prose come from the schema and the evaluation dicts, not from the text.
    assert "Fashion-MNIST (28x28, patch 4, ViT width 192)" in text
    for key, value in FINETUNE_PROTOCOL.items():
        assert f"{key}={value}" in text
    runs = quality_grid.grid_size(list(ALGORITHMS), list(PARTITIONS), quality.DEFAULT_SEEDS)
    assert f"to keep the {runs} runs of the full grid within a few hours" in text
    assert f"({EVALUATION['finetune-labels']:,} labels, one subset, " in text
    assert f"{EVALUATION['finetune-epochs']} epochs)" in text
    assert "finetune-labels=0" in text and "finetune-epochs=" not in text.split("Fine-tune col")[0]


def tiny_run_dir(out_root, tiny_overrides: dict, seed: int = 0):
    """A finished random-init run folder as the app leaves it: config.yaml, summary.json and the
    exported (random-init) backbone."""
    from fedmae_flwr.config import resolve_config, to_yaml
    from fedmae_flwr.models.export import export_backbone
    from fedmae_flwr.server_app import random_init_state

    cfg = resolve_config(
        {**tiny_overrides, "algorithm": "random-init", "seed": seed, "device": "cpu",
         "output-dir": str(out_root), "run-name": f"random-init-pooled-s{seed}"}
    )  # fmt: skip
    run_dir = out_root / cfg.run_name
    export_backbone(cfg.model, random_init_state(cfg), run_dir)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "summary.json").write_text("{}")
    return run_dir


def direct_finetune(run_dir, protocol: dict) -> dict:
    """What a run with ``protocol``'s eval keys computes: the library's own fine-tune call on the
    run's config with those keys (its random-init backbone)."""
    from benchmarks import grid_finetune
    from fedmae_flwr.data import load_dataset
    from fedmae_flwr.evaluation.downstream import finetune_backbones, labelled_subsets
    from fedmae_flwr.models.export import load_backbone

    cfg = grid_finetune.protocol_config(run_dir, protocol)
    splits = load_dataset(cfg)
    direct = finetune_backbones(cfg.eval, {"random-init": load_backbone(run_dir)},
                                labelled_subsets(cfg.eval, splits, cfg.seed), splits,
                                seed=cfg.seed, device="cpu")  # fmt: skip
    return direct["random-init"]


def test_grid_finetune_caches_per_protocol_and_recomputes_when_it_changes(
    tmp_path, tiny_overrides, monkeypatch
):
    from benchmarks import grid_finetune

    run_dir = tiny_run_dir(tmp_path / "grid", tiny_overrides)
    (tmp_path / "grid" / "unfinished").mkdir()  # no summary.json: not a run to fine-tune
    assert grid_finetune.finished_runs(tmp_path / "grid") == [run_dir.name]
    protocol = {"finetune-labels": 24, "finetune-epochs": 1, "finetune-subsets": 2,
                "finetune-val-fraction": 0.25, "finetune-lr-grid": "1e-3,3e-3",
                "finetune-head-norm": "batchnorm", "test-images": 30}  # fmt: skip
    record, fresh = grid_finetune.finetune_run(run_dir, "cpu", protocol)
    assert fresh and record["protocol"] == protocol and record["seconds"] > 0
    result = record["results"]["random-init"]
    assert len(result["subsets"]) == 2 and result["subsets"][0]["train_labels"] == 18
    # What a run with those eval keys computes: the library's own call on the same config.
    cfg = grid_finetune.protocol_config(run_dir, protocol)
    assert cfg.eval.finetune_epochs == 1 and cfg.eval.lr_grid == (1e-3, 3e-3)
    assert cfg.model.embed_dim == tiny_overrides["embed-dim"]  # the run's own settings stay
    assert direct_finetune(run_dir, protocol)["accuracy"] == result["accuracy"]
    # Same protocol: read back, not computed again.
    again, fresh = grid_finetune.finetune_run(run_dir, "cpu", protocol)
    assert not fresh and again == record
    assert grid_finetune.read_cache(run_dir) is None  # not FINETUNE_PROTOCOL's result
    # Another protocol: computed again, and the cache now holds that one.
    changed = {**protocol, "finetune-lr-grid": "1e-3"}
    record2, fresh = grid_finetune.finetune_run(run_dir, "cpu", changed)
    assert fresh and record2["protocol"] == changed
    assert grid_finetune.read_cache(run_dir, protocol) is None
    assert grid_finetune.read_cache(run_dir, changed) == record2
    # ... and the first protocol's measured record is kept beside it, not overwritten.
    assert grid_finetune.earlier_records(run_dir) == [record]
    record3, fresh = grid_finetune.finetune_run(run_dir, "cpu", {**changed, "test-images": 20})
    assert fresh and grid_finetune.earlier_records(run_dir) == [record, record2]

    # The first protocol again: its set-aside record is read back, nothing is trained, and
    # every record stays on disk exactly once (the cache's set aside after the others).
    def no_training(*args, **kwargs):
        raise AssertionError("a protocol a set-aside record holds was fine-tuned again")

    monkeypatch.setattr(grid_finetune, "finetune_backbones", no_training)
    again, fresh = grid_finetune.finetune_run(run_dir, "cpu", protocol)
    assert not fresh and again == record == grid_finetune.read_cache(run_dir, protocol)
    assert grid_finetune.earlier_records(run_dir) == [record2, record3]
    assert sorted(p.name for p in run_dir.glob("finetune-protocol*")) == [
        "finetune-protocol.2.json",
        "finetune-protocol.3.json",
        "finetune-protocol.json",
    ]


def test_grid_finetune_widens_an_lr_grid_by_fine_tuning_only_the_new_lrs(
    tmp_path, tiny_overrides, monkeypatch
):
    """A run fine-tuned at 1e-3 and asked for 1e-3,3e-3 trains at 3e-3 only; the merged record
    holds exactly what one fine-tune over both gives, and every measured record is kept."""
    from benchmarks import grid_finetune
    from fedmae_flwr.evaluation.downstream import finetune_backbones

    run_dir = tiny_run_dir(tmp_path / "grid", tiny_overrides)
    base = {"finetune-labels": 24, "finetune-epochs": 2, "finetune-subsets": 2,
            "finetune-val-fraction": 0.25, "finetune-lr-grid": "1e-3",
            "finetune-head-norm": "batchnorm", "test-images": 30}  # fmt: skip
    narrow, _ = grid_finetune.finetune_run(run_dir, "cpu", base)
    grids = []

    def spy(cfg, *args, **kwargs):
        grids.append(cfg.lr_grid)
        return finetune_backbones(cfg, *args, **kwargs)

    monkeypatch.setattr(grid_finetune, "finetune_backbones", spy)
    wide = {**base, "finetune-lr-grid": "1e-3,3e-3"}
    record, fresh = grid_finetune.finetune_run(run_dir, "cpu", wide)
    assert fresh and grids == [(3e-3,)]  # 1e-3 read from the earlier record
    assert record["protocol"] == wide
    assert [p["finetune-lr-grid"] for p in record["merged-from"]] == ["0.003", "1e-3"]
    part = grid_finetune.earlier_records(run_dir)[-1]
    assert record["seconds"] == pytest.approx(narrow["seconds"] + part["seconds"])
    assert grid_finetune.earlier_records(run_dir) == [narrow, part]
    # Exactly the library's one call over the whole grid.
    assert record["results"]["random-init"] == direct_finetune(run_dir, wide)
    again, fresh = grid_finetune.finetune_run(run_dir, "cpu", wide)
    assert not fresh and again == record and grids == [(3e-3,)]
    # Another protocol key than the lr grid: nothing to merge with, the whole grid is trained.
    grid_finetune.finetune_run(run_dir, "cpu", {**wide, "test-images": 20})
    assert grids == [(3e-3,), (1e-3, 3e-3)]


def test_noise_bounds_come_from_a_noise_floor_measured_under_this_protocol(tmp_path):
    import math
    import statistics
    from dataclasses import asdict

    from benchmarks.harness import BUDGET, FINETUNE_PROTOCOL, GRID_EVALUATION
    from benchmarks.quality import noise_bounds
    from fedmae_flwr.config import from_flat
    from fedmae_flwr.evaluation.downstream import PROTOCOL_RECIPE

    path = tmp_path / "results.json"
    none = {FINETUNE_KEY: None, "linear-probe-accuracy": None, "knn-accuracy": None}
    assert noise_bounds(path) == none  # nothing measured
    cfg = from_flat({**BUDGET, **GRID_EVALUATION, **FINETUNE_PROTOCOL})
    protocol = {
        "model": asdict(cfg.model),
        "finetune-labels": FINETUNE_PROTOCOL["finetune-labels"],
        "subsets": 2,
        "val-fraction": FINETUNE_PROTOCOL["finetune-val-fraction"],
        "lr-grid": list(cfg.eval.lr_grid),
        "finetune-epochs": FINETUNE_PROTOCOL["finetune-epochs"],
        "finetune-recipe": PROTOCOL_RECIPE,
        "finetune-head-norm": FINETUNE_PROTOCOL["finetune-head-norm"],
        "finetune-augment": FINETUNE_PROTOCOL["finetune-augment"],
        "probe-train-images": GRID_EVALUATION["probe-train-images"],
        "probe-epochs": GRID_EVALUATION["probe-epochs"],
        "probe-lr-grid": list(cfg.eval.probe_lrs),
        "test-images": GRID_EVALUATION["test-images"],
    }
    tune = {"0": [0.55, 0.57], "1": [0.60, 0.58]}
    probe = {"0": [0.750, 0.752], "1": [0.756, 0.754]}
    lr = cfg.eval.lr_grid[0]

    def write(protocol: dict) -> None:
        seeds = {
            s: {
                "finetune": {"subsets": [{"accuracy": a, "train_accuracy": 0.6, "lr": lr,
                                          "val_accuracy": {repr(lr): a}} for a in tune[s]]}
                if protocol["finetune-labels"] else None,
                "linear-probe": [{"accuracy": a, "train_accuracy": 0.8} for a in probe[s]],
            }
            for s in tune
        }  # fmt: skip
        path.write_text(json.dumps({"protocol": protocol, "seeds": seeds}))

    write(protocol)
    k = FINETUNE_PROTOCOL["finetune-subsets"]
    tune_std = statistics.stdev([v for row in tune.values() for v in row])
    probe_std = statistics.stdev([v for row in probe.values() for v in row])
    bounds = noise_bounds(path)
    assert bounds[FINETUNE_KEY] == pytest.approx(2 * tune_std * math.sqrt(2 / k))
    assert bounds["linear-probe-accuracy"] == pytest.approx(2 * probe_std * math.sqrt(2))
    assert bounds["knn-accuracy"] is None
    # A fine-tune measured under other epochs is not this column's noise; the probe's still is.
    write({**protocol, "finetune-epochs": protocol["finetune-epochs"] + 1})
    assert noise_bounds(path)[FINETUNE_KEY] is None
    assert noise_bounds(path)["linear-probe-accuracy"] == pytest.approx(
        bounds["linear-probe-accuracy"]
    )
    write({**protocol, "probe-epochs": 1})
    assert noise_bounds(path)["linear-probe-accuracy"] is None
    # a fine-tune floor measured with crop + flip (or before the augment key: it augmented) is
    # not the noise of today's un-augmented fine-tune
    write({**protocol, "finetune-augment": True})
    assert noise_bounds(path)[FINETUNE_KEY] is None
    write({k: v for k, v in protocol.items() if k != "finetune-augment"})
    assert noise_bounds(path)[FINETUNE_KEY] is None
    # a floor from before the probe's lr grid probed at lr 0.1 alone: not the tuned probe's noise
    write({k: v for k, v in protocol.items() if k != "probe-lr-grid"})
    assert noise_bounds(path)["linear-probe-accuracy"] is None
    # a probe-only floor (eval_protocol --labels 0): the probe's bound, no fine-tune bound
    write({**protocol, "finetune-labels": 0})
    assert noise_bounds(path) == {**none, "linear-probe-accuracy": bounds["linear-probe-accuracy"]}
    # runs that probed at lr 0.1 alone (summaries from before the grid) get no tuned-probe bound
    from benchmarks.quality import probe_lr_text, runs_probe_lrs

    old_run = fake_run("fedmae", 0, 0.7, tmp_path / "runs")
    new_run = fake_run("random-init", 0, 0.7, tmp_path / "runs")
    new_run["summary"]["downstream"] = {"protocol": {"probe-lr-grid": list(cfg.eval.probe_lrs)}}
    assert runs_probe_lrs({("random-init", "pooled"): [new_run]}) == list(cfg.eval.probe_lrs)
    assert runs_probe_lrs({("fedmae", "iid"): [old_run]}) == [0.1]
    mixed = {("fedmae", "iid"): [old_run], ("random-init", "pooled"): [new_run]}
    assert runs_probe_lrs(mixed) is None
    assert "0.1 in every run" in probe_lr_text({("fedmae", "iid"): [old_run]})
    assert "chosen per backbone from 0.1, 0.3, 1 " in probe_lr_text({("x", "y"): [new_run]})
    assert "not the same in every run" in probe_lr_text(mixed)
    assert noise_bounds(path, probe_lrs=[0.1])["linear-probe-accuracy"] is None


def test_the_tracked_noise_floor_bounds_tuned_probes_only(tmp_path):
    """docs/data/eval-protocol.json is versioned, so a clone's reports draw the bounds the
    committed pages state (the tuned probe's 1.7 points); runs that chose their probe's lr in
    different ways get none."""
    from benchmarks.eval_protocol import RESULTS
    from benchmarks.quality import grid_noise_bounds, noise_bounds

    assert RESULTS.is_file() and "docs" in RESULTS.parts
    assert 100 * noise_bounds()["linear-probe-accuracy"] == pytest.approx(1.7, abs=0.05)
    tuned = fake_run("random-init", 0, 0.7, tmp_path / "runs")
    tuned["summary"]["downstream"] = {"protocol": {"probe-lr-grid": [0.1, 0.3, 1.0]}}
    fixed = fake_run("fedmae", 0, 0.7, tmp_path / "runs")  # probed at lr 0.1 alone
    assert (
        grid_noise_bounds({("r", "pooled"): [tuned]})["linear-probe-accuracy"]
        == (noise_bounds()["linear-probe-accuracy"])
    )
    mixed = {("fedmae", "iid"): [fixed], ("random-init", "pooled"): [tuned]}
    assert grid_noise_bounds(mixed)["linear-probe-accuracy"] is None
    assert grid_noise_bounds({("fedmae", "iid"): [fixed]})["linear-probe-accuracy"] is None


def test_the_grid_random_init_row_gives_the_fine_tune_bound_when_no_floor_matches():
    """2 x stdev of random init's per-subset values over all seeds x sqrt(2 / subsets); none
    from a single fine-tuned seed."""
    import math
    import statistics

    from benchmarks.harness import FINETUNE_PROTOCOL
    from benchmarks.quality import grid_noise_bound
    from benchmarks.quality_grid import FINETUNE_RECORD

    per_seed = [[0.70, 0.72, 0.71], [0.68, 0.69, 0.73]]
    runs = [{"seed": s, FINETUNE_RECORD: protocol_record("random-init", v, 1.0)}
            for s, v in enumerate(per_seed)]  # fmt: skip
    grid = {("random-init", "pooled"): runs}
    k = FINETUNE_PROTOCOL["finetune-subsets"]
    values = [v for row in per_seed for v in row]
    expected = 2 * statistics.stdev(values) * math.sqrt(2 / k)
    assert grid_noise_bound(grid) == pytest.approx(expected)
    assert grid_noise_bound({("random-init", "pooled"): runs[:1]}) is None
    assert grid_noise_bound({("random-init", "pooled"): [{"seed": 0}, {"seed": 1}]}) is None
    assert grid_noise_bound({}) is None


def test_the_kept_lr_is_named_once_or_per_subset():
    from benchmarks.quality import _kept_lrs_text

    assert _kept_lrs_text([]) == ""
    assert _kept_lrs_text([1e-3, 1e-3, 1e-3]) == "; kept lr 0.001"
    assert _kept_lrs_text([1e-3, 2e-3, 1e-3]) == "; kept lr 0.001 / 0.002 / 0.001 by subset"


def test_a_broken_fine_tune_record_is_named_and_a_users_file_is_left_alone(tmp_path):
    from benchmarks import grid_finetune

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "finetune-protocol.old.json").write_text("{}")  # the user's: not read
    assert grid_finetune.earlier_records(run_dir) == []
    (run_dir / grid_finetune.CACHE).write_text('{"protocol": ')  # cut off mid-write
    with pytest.raises(ValueError, match=r"finetune-protocol.json is not a readable fine-tune"):
        grid_finetune.read_cache(run_dir)
    (run_dir / "finetune-protocol.1.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"finetune-protocol.1.json is not a fine-tune record"):
        grid_finetune.earlier_records(run_dir)


def test_the_report_counts_which_lr_validation_kept():
    from benchmarks.quality import kept_lr_tally
    from benchmarks.quality_grid import FINETUNE_RECORD

    def run(lrs, grid=("0.001", "0.002")):
        subsets = [{"lr": lr, "val_accuracy": {k: 0.5 for k in grid}} for lr in lrs]
        return {FINETUNE_RECORD: {"results": {"x": {"subsets": subsets}}}}

    grid = {("fedmae", "iid"): [run([1e-3, 2e-3, 1e-3]), {}],
            ("random-init", "pooled"): [run([1e-3, 1e-3, 1e-3])]}  # fmt: skip
    assert kept_lr_tally(grid) == (
        " Validation kept lr 0.001 on 5, 0.002 on 1 of the 6 subsets (fedmae: 0.001 on 2, "
        "0.002 on 1; random-init: 0.001 on 3)."
    )
    assert kept_lr_tally({("fedmae", "iid"): [run([1e-3], grid=("0.001",))]}) == ""  # no choice


def test_a_cell_measured_at_fewer_seeds_than_its_row_names_them(tmp_path):
    from benchmarks.quality import accuracy_cell

    runs = [_with(fake_run("local", s, 0.0, tmp_path), finetune=0.75 + s / 100) for s in (0, 1, 2)]
    del runs[1]["summary"][FINETUNE_KEY]  # seed 1 not fine-tuned yet
    assert accuracy_cell(runs, FINETUNE_KEY, "local") == "76.0 ± 1.4 (s0 s2 only)"
    assert accuracy_cell(runs, "linear-probe-accuracy", "local") == "70.0 ± 0.0"
    for r in runs:
        r["summary"].pop(FINETUNE_KEY, None)
    assert accuracy_cell(runs, FINETUNE_KEY, "local") == "-"
