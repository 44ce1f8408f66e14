"""The budget study and the ablations: naming, verdicts and reports from run summaries."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest

from benchmarks import ablations, budget, quality
from benchmarks.harness import run_name
from benchmarks.quality_grid import FINETUNE_KEY, FINETUNE_RECORD
from tests.test_bench_report import fake_run


def test_run_names_list_only_the_changed_keys_sorted_and_pool_partition_free_algorithms():
    assert run_name("fedmae", "iid", 0) == "fedmae-iid-s0"
    assert (
        run_name("fedmae", "dirichlet-0.1", 1, {"rounds-per-stage": 10, "local-epochs": 4})
        == "fedmae-dirichlet-0.1-s1-local-epochs4-rounds-per-stage10"
    )
    assert run_name("random-init", "dirichlet-0.1", 0) == "random-init-pooled-s0"


def test_budget_parsing_accepts_r_x_e_and_names_what_is_wrong():
    assert budget.parse_budget("5x4") == (5, 4)
    assert budget.parse_budget("10X1") == (10, 1)
    with pytest.raises(argparse.ArgumentTypeError, match="is not RxE"):
        budget.parse_budget("5")
    with pytest.raises(argparse.ArgumentTypeError, match=">= 1"):
        budget.parse_budget("0x3")


def _fedmae(finetune: float, tmp_path, seed: int = 0) -> dict:
    return fake_run("fedmae", seed, finetune, tmp_path / "runs")


def _budget_runs(tmp_path) -> tuple[dict, list[dict]]:
    """Random init at seeds 0-2; fedmae 5 x 1 at seeds 0-1 and 5 x 4 at 0-2, with their
    protocol fine-tune (FINETUNE_KEY) and, for 5 x 4, a probe that differs from the floor's."""
    runs = tmp_path / "runs"

    def run(algorithm, seed, finetune, folder, probe=0.7):
        result = fake_run(algorithm, seed, 0.0, folder)
        result["summary"][FINETUNE_KEY] = {algorithm: finetune}
        result["summary"]["linear-probe-accuracy"] = {algorithm: probe}
        return result

    floor = [run("random-init", s, v, runs) for s, v in enumerate((0.72, 0.73, 0.70))]
    finetune_probe = ((0.70, 0.72), (0.71, 0.71), (0.69, 0.73))
    by_budget = {
        (5, 4): [run("fedmae", s, f, runs / "b", p) for s, (f, p) in enumerate(finetune_probe)],
        (5, 1): [
            run("fedmae", 0, 0.74, runs / "a", 0.71),
            run("fedmae", 1, 0.75, runs / "a", 0.69),
        ],
    }
    return by_budget, floor


BOUNDS = {FINETUNE_KEY: 0.014, "linear-probe-accuracy": 0.007, "knn-accuracy": None}


def test_smallest_paying_budget_needs_the_results_verdict_ahead_at_every_seed(tmp_path):
    by_budget, floor = _budget_runs(tmp_path)
    # probe 5 x 1: +1, -1 (not shown); 5 x 4: +2, +1, +3 points, mean 2.0 > bound 0.7.
    assert budget.smallest_paying_budget(by_budget, floor, "linear-probe-accuracy", 0.007) == (
        5,
        4,
    )
    # ... but not beyond a bound of 2.5 points.
    assert budget.smallest_paying_budget(by_budget, floor, "linear-probe-accuracy", 0.025) is None
    # fine-tune 5 x 1: +2, +2, beyond 1.4 but at 2 seeds, too few for a verdict; 5 x 4 behind.
    assert budget.smallest_paying_budget(by_budget, floor, FINETUNE_KEY, 0.014) is None
    assert budget.smallest_paying_budget(by_budget, floor, FINETUNE_KEY, None) is None
    # k-NN: every fake run scores 0.6, the floor's value: equal is not ahead.
    assert budget.smallest_paying_budget(by_budget, floor, "knn-accuracy", None) is None
    assert quality.paired_differences(by_budget[(5, 1)], floor, FINETUNE_KEY, "random-init") == (
        pytest.approx({0: 0.02, 1: 0.02})
    )


def test_budget_report_pairs_each_seed_with_its_random_init_and_states_the_verdicts(tmp_path):
    by_budget, floor = _budget_runs(tmp_path)
    command = "python -m benchmarks.budget --budgets 5x1 5x4 --seeds 0 1 2"
    path = budget.write_report(by_budget, floor, command, "iid", tmp_path, bounds=BOUNDS,
                               budgets=[(5, 4), (5, 1)], seeds=[0, 1, 2])  # fmt: skip
    text = path.read_text()
    assert f"Command: `{command}` (seeds [0, 1, 2];" in text
    assert "**Missing** from the seeds asked ([0, 1, 2]): fedmae 5 x 1 seed 2 (no run); " in text
    assert "| fine-tune 1,000 labels (protocol) | linear probe | k-NN | masked PSNR (dB) |" in text
    # floor fine-tune 72, 73, 70: mean 71.7, sample std 1.5
    assert "| random-init (floor) | 0 | [0, 1, 2] | 71.7 ± 1.5 | 70.0 ± 0.0 | 60.0 ± 0.0 |" in text
    # 5 x 4: 20 server rounds; client seconds = 1.0 s per round x 5 rounds x 4 stages
    assert (
        "| 5 x 4 | 20 | [0, 1, 2] | 70.0 ± 1.0 | 72.0 ± 1.0 | 60.0 ± 0.0 | 12.00 | 20 | 100 |"
        in text
    )
    assert "| 5 x 1 | 20 | [0, 1] | 74.5 ± 0.7 | 70.0 ± 1.4 |" in text
    assert (
        "| 5 x 4 | fine-tune | s0 -2.0, s1 -2.0, s2 -1.0 | -1.7 | 0.038 | 1.4 "
        "| behind at every seed |" in text
    )
    assert (
        "| 5 x 4 | linear probe | s0 +2.0, s1 +1.0, s2 +3.0 | +2.0 | 0.074 | 0.7 "
        "| ahead at every seed |" in text
    )
    assert (
        "| 5 x 1 | linear probe | s0 +1.0, s1 -1.0 | +0.0 | 1 | 0.7 | 2 seeds: not shown |" in text
    )
    assert (
        "| 5 x 4 | k-NN | s0 +0.0, s1 +0.0, s2 +0.0 | +0.0 | 1 | no noise bound measured "
        "| not shown |" in text
    )
    assert (
        "- fine-tune: 5 x 1: 2 seeds: not shown; 5 x 4: behind at every seed; smallest "
        "budget ahead at every seed: none" in text
    )
    assert (
        "- k-NN: 5 x 1: 2 seeds: not shown; 5 x 4: not shown; smallest budget ahead at every "
        "seed: none" in text
    )
    assert "`git show 17655eb:docs/budget.md`" in text
    assert (tmp_path / "budget-accuracy.png").stat().st_size > 0


def test_budget_fine_tune_bound_defaults_to_the_random_init_runs_own_subsets(tmp_path):
    by_budget, floor = _budget_runs(tmp_path)
    # Each floor run fine-tuned on 3 subsets; their std over all 9 values gives the bound.
    subsets = ((0.71, 0.72, 0.73), (0.72, 0.73, 0.74), (0.69, 0.70, 0.71))
    for run, values in zip(floor, subsets, strict=True):
        result = {
            "accuracy": sum(values) / 3,
            "subsets": [{"accuracy": v, "lr": 1e-3} for v in values],
        }
        run[FINETUNE_RECORD] = {"results": {"random-init": result}, "seconds": 60.0}
    del by_budget[(5, 4)][2]["summary"][FINETUNE_KEY]  # not fine-tuned yet
    text = budget.write_report(
        by_budget, floor, "cmd", "iid", tmp_path, budgets=[(5, 4)], seeds=[0, 1, 2]
    ).read_text()
    assert "([0, 1, 2]): fedmae 5 x 4 seed 2 (no protocol fine-tune); the table" in text
    assert (
        "| 5 x 4 | fine-tune | s0 -2.0, s1 -2.0 | -2.0 | < 0.001 | 2.6 | 2 seeds: not shown |"
        in text
    )
    # std of the 9 values 1.58 points; 2 x 1.58 x sqrt(2/3) = 2.6, the bound in both rows
    assert (
        "| 5 x 1 | fine-tune | s0 +2.0, s1 +2.0 | +2.0 | < 0.001 | 2.6 | 2 seeds: not shown |"
        in text
    )
    # the fake records name no machine: the page says so rather than name the one writing it
    assert "; the protocol fine-tunes add up to 3 min on machine not recorded; report" in text
    assert "- random-init-s0: 71.0, 72.0, 73.0 (72.0 ± 0.0; kept lr 0.001)" in text


def test_ablation_report_has_the_reference_and_one_row_per_changed_setting(tmp_path):
    reference = [_fedmae(0.60, tmp_path, 0)]
    variants = {
        ("mask-ratio", 0.9): [_fedmae(0.55, tmp_path, 1)],
        ("depth", 2): [_fedmae(0.50, tmp_path, 2)],
    }
    command = "python -m benchmarks.ablations"
    path = ablations.write_report(reference, variants, command, "iid", tmp_path)
    text = path.read_text()
    assert "| reference | - | 60.0 | 70.0 | 60.0 | 12.00 | 56 | 2.00 | 100 |" in text
    assert "| mask-ratio | 0.9 | 55.0 |" in text
    assert "| depth | 2 | 50.0 |" in text
    assert (tmp_path / "ablations.png").stat().st_size > 0


def test_post_hoc_studies_refit_the_exported_backbone_exactly_as_the_run_did(tiny_overrides):
    from pathlib import Path

    from benchmarks import label_efficiency
    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.server_app import run

    from .conftest import LocalGrid

    overrides = {
        **tiny_overrides,
        "algorithm": "random-init",
        "run-name": "floor",
        "probe-per-block": True,
    }
    cfg = resolve_config(overrides)
    summary = run(LocalGrid(6, overrides), cfg)
    run_dir = Path(cfg.output_dir) / "floor"

    # Same backbone (exported, loaded strictly by timm), subset, recipe and seed as the run's
    # own 50-label fine-tuning: the same accuracy, to the last digit (CPU is deterministic).
    record = label_efficiency.finetune_run(run_dir, 50)
    assert record["labels"] == 50 and record["test-images"] == 100
    assert record["accuracy"] == summary["finetune-accuracy"]["random-init"]
    assert label_efficiency.cache_path(run_dir, 50).is_file()
    assert label_efficiency.cache_path(run_dir, 50).name.startswith("finetune-50-ld1-e")
    assert label_efficiency.finetune_run(run_dir, 0)["labels"] == 800  # "all": the train split

    path = label_efficiency.write_report(
        {"floor": {50: record}}, [50, 5000], "python -m benchmarks.label_efficiency", run_dir
    )
    assert f"| floor | {100 * record['accuracy']:.1f} (" in path.read_text()
    assert " | - |" in path.read_text()

    # The per-block probe of the export matches the run's own per-block probe exactly.
    from benchmarks import feature_depth

    per_block = feature_depth.probe_per_block(run_dir)
    expected = summary["downstream"]["linear-probe-per-block"]["random-init"]
    assert [r["accuracy"] for r in per_block] == expected
    text = feature_depth.write_report({"floor": per_block}, "cmd", run_dir).read_text()
    assert "| backbone (run) | block 1 | block 2 |" in text


def test_label_counts_parse_and_name_what_is_allowed():
    from benchmarks.label_efficiency import parse_labels

    assert parse_labels("all") == 0 and parse_labels("5000") == 5000
    with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'all'"):
        parse_labels("-3")


def test_a_finished_run_with_other_settings_is_refused_not_mixed_in(tmp_path):
    from benchmarks.harness import check_same_config

    run_dir = tmp_path / "fedmae-iid-s0"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(
        "finetune_epochs: 15\ntest_images: 5000\noutput_dir: /elsewhere\nrun_name: other\n"
    )
    check_same_config(run_dir, {"finetune-epochs": 15, "output-dir": "/here", "run-name": "x"})
    with pytest.raises(RuntimeError, match=r"finetune-epochs=15 \(asked 5\)"):
        check_same_config(run_dir, {"finetune-epochs": 5, "test-images": 5000})


def _gpu_summaries(folder, wall_seconds=(100.0, 140.0), depth=4, rounds=40) -> None:
    protocol = {"finetune-labels": 1000, "finetune-epochs": 15, "probe-train-images": 5000,
                "test-images": 5000}  # fmt: skip
    for seed, (ours, floor) in enumerate([(0.62, 0.60), (0.58, 0.61)]):
        summary = {
            "run-name": f"fmnist-gpu-s{seed}",
            "depth": depth,
            "rounds": rounds,
            "finetune-accuracy": {"fedmae": ours, "random-init": floor},
            "linear-probe-accuracy": {"fedmae": 0.7, "random-init": 0.6},
            "knn-accuracy": {"fedmae": 0.7, "random-init": 0.6},
            "final-psnr": 14.0,
            "wall-seconds": wall_seconds[seed],
            "communication": {"client-train-seconds-mean": 0.2},
            "downstream": {"protocol": protocol},
            "data": {"partitions": {"num-partitions": 100}},
        }
        (folder / f"fmnist-gpu-s{seed}-summary.json").write_text(json.dumps(summary))


def test_gpu_report_pairs_each_seed_with_its_random_init(tmp_path):
    from benchmarks import gpu_report

    _gpu_summaries(tmp_path)
    runs = gpu_report.load_runs(tmp_path)
    text = gpu_report.write_report(runs, "the command", tmp_path / "docs").read_text()
    assert "| 0 | 62.0 / 60.0 (+2.0) |" in text and "| 1 | 58.0 / 61.0 (-3.0) |" in text
    assert "fine-tune 1k labels -0.5 (ahead at 1 of 2 seeds, p 0.87)" in text
    assert "linear probe +10.0 (ahead at 2 of 2 seeds, p < 0.001)" in text
    assert (tmp_path / "docs" / "gpu-pretraining-pays.png").stat().st_size > 0
    # One fine-tune subset per run (the runs of the time): that column gives no verdict.
    assert "so its column gives no verdict" in text
    assert "fedmae_flwr.inprocess" not in text  # that note is the 2026-11-26 runs' alone


def test_gpu_report_takes_settings_from_the_runs_config_and_times_from_the_summaries(tmp_path):
    """No number of the report is typed into it: settings from the run's config (its preset,
    or a config.yaml kept beside the summary), times from wall-seconds and the CPU runs."""
    from benchmarks import gpu_report
    from benchmarks.harness import EVALUATION, RUN_RECORD
    from fedmae_flwr.config import resolve_config, to_yaml

    from .test_bench_report import write_run_dir

    # Without a config.yaml: the preset the run-name names (fmnist-gpu: R=10 x E=4, K=4).
    _gpu_summaries(tmp_path)
    text = gpu_report.write_report(gpu_report.load_runs(tmp_path), "cmd", tmp_path).read_text()
    assert text.startswith("# fmnist-gpu on a GPU: does pretraining pay at R=10 x E=4?")
    assert "(Fashion-MNIST, 100 IID nodes, 10 per round, K=4 blocks) at R=10 rounds x E=4" in text
    # (100 + 140) / 2 s = 2.0 min
    assert (
        "A whole run takes 2.0 min of ServerApp wall time on one NVIDIA H200 (100 to 140 s)" in text
    )
    _gpu_summaries(tmp_path, wall_seconds=(300.0, 420.0))
    text = gpu_report.write_report(gpu_report.load_runs(tmp_path), "cmd", tmp_path).read_text()
    assert "takes 6.0 min of ServerApp wall time on one NVIDIA H200 (300 to 420 s)" in text

    # The budget study's CPU runs of the same budget, when there: their time and their verdict.
    cpu = tmp_path / "cpu"
    changes = {"rounds-per-stage": 10, "local-epochs": 4}
    name = write_run_dir(cpu, "fedmae", "iid", 0, 0.66, EVALUATION, changes, wall_seconds=1140)
    (cpu / name / RUN_RECORD).write_text(json.dumps({"machine": "2 test cores"}))
    write_run_dir(cpu, "random-init", "iid", 0, 0.60, EVALUATION)
    text = gpu_report.write_report(gpu_report.load_runs(tmp_path), "cmd", tmp_path, cpu).read_text()
    assert "against 19 min for the same budget on 2 test cores through `flwr run`" in text
    assert "which is why the CPU grid (docs/results.md) stays at R=5 x E=1." in text
    assert (
        "scored fine-tune 1k labels +6.0, linear probe +0.0, k-NN +0.0 points (seeds [0])" in text
    )

    # A config.yaml kept beside a summary wins over the preset, and must match the summary.
    for seed in (0, 1):
        cfg = resolve_config({"preset": "fmnist-gpu", "seed": seed, "rounds-per-stage": 3,
                              "local-epochs": 2})  # fmt: skip
        (tmp_path / f"fmnist-gpu-s{seed}-config.yaml").write_text(to_yaml(cfg))
    with pytest.raises(ValueError, match="depth 4, 40 rounds, but its config has depth 4, 12"):
        gpu_report.load_runs(tmp_path)
    _gpu_summaries(tmp_path, rounds=12)
    text = gpu_report.write_report(gpu_report.load_runs(tmp_path), "cmd", tmp_path, cpu).read_text()
    assert text.startswith("# fmnist-gpu on a GPU: does pretraining pay at R=3 x E=2?")
    assert "against" not in text  # the CPU study has no run of that budget


def test_ablation_report_cites_the_reference_runs_seed_to_seed_spread_from_their_files(tmp_path):
    from benchmarks.harness import EVALUATION

    from .test_bench_report import write_run_dir

    out, docs = tmp_path / "runs", tmp_path / "docs"
    write_run_dir(out, "fedmae", "iid", 0, 0.620, EVALUATION)
    write_run_dir(out, "fedmae", "iid", 1, 0.607, EVALUATION)
    write_run_dir(out, "fedmae", "iid", 0, 0.586, EVALUATION, {"depth": 2})
    argv = ["--report-only", "--factors", "depth", "--out", str(out), "--docs", str(docs)]
    assert ablations.main(argv) == 0
    text = (docs / "ablations.md").read_text()
    assert "| depth | 2 | 58.6 |" in text
    assert "Depth keeps 5 rounds per stage, so K=2 trains for 10 rounds." in text
    assert (
        "the reference configuration gave 62.0 and 60.7 at seeds 0 and 1 (a spread of 1.3" in text
    )
    write_run_dir(out, "fedmae", "iid", 1, 0.550, EVALUATION)
    ablations.main(argv)
    assert (
        "gave 62.0 and 55.0 at seeds 0 and 1 (a spread of 7.0 points)"
        in (docs / "ablations.md").read_text()
    )


def test_a_run_the_harness_makes_records_its_whole_flwr_run_time(tmp_path, monkeypatch):
    from benchmarks import harness

    def fake_run_or_load(name, overrides, out_root, tag, timeout):
        (out_root / name).mkdir(parents=True)
        (out_root / name / "summary.json").write_text("{}")
        return {"name": name, "summary": {}, "rows": []}

    monkeypatch.setattr(harness, "run_or_load", fake_run_or_load)
    run = harness.run_variant("fedmae", "iid", 0, tmp_path, "test")
    record = json.loads((tmp_path / "fedmae-iid-s0" / harness.RUN_RECORD).read_text())
    assert record["flwr-run-seconds"] >= 0 and record["machine"] == harness.machine_line()
    assert run["bench"] == record


def test_a_fine_tune_with_another_recipe_is_cached_apart(tmp_path):
    """Epochs, layer decay, lr, head norm and crop + flip each name a cache of their own."""
    from benchmarks.label_efficiency import cache_path
    from fedmae_flwr.config import resolve_config, to_yaml

    def name(keys, **overrides):
        (tmp_path / "config.yaml").write_text(to_yaml(resolve_config(keys)))
        return cache_path(tmp_path, 1000, **overrides).name

    base = {"finetune-epochs": 5, "finetune-head-norm": "batchnorm", "finetune-augment": False,
            "finetune-lr": 1e-3}  # fmt: skip
    assert name(base) == "finetune-1000-ld1-e5-lr0.001-batchnorm.json"
    assert name(base, epochs=5) == name(base)  # the run's own epochs
    assert name(base, epochs=15) == "finetune-1000-ld1-e15-lr0.001-batchnorm.json"
    assert name(base, layer_decay=0.75) == "finetune-1000-ld0.75-e5-lr0.001-batchnorm.json"
    assert name({**base, "finetune-augment": True}).endswith("-batchnorm-aug.json")
    assert name({**base, "finetune-head-norm": "none"}) == "finetune-1000-ld1-e5-lr0.001-none.json"
    assert name({**base, "finetune-lr": 2e-3}) == "finetune-1000-ld1-e5-lr0.002-batchnorm.json"


def test_full_recipe_takes_the_post_hoc_fine_tune_from_the_evaluation_protocol(tmp_path):
    """--full-recipe names no number: it reads EVALUATION's."""
    from benchmarks.harness import EVALUATION
    from benchmarks.label_efficiency import DEFAULT_LABELS, parse_args

    (tmp_path / "a-s0").mkdir()
    (tmp_path / "a-s0" / "backbone.safetensors").touch()
    base = ["--out", str(tmp_path), "--runs", "a-s0"]
    args = parse_args([*base, "--full-recipe"])
    assert args.labels == [EVALUATION["finetune-labels"]]
    assert args.epochs == EVALUATION["finetune-epochs"]
    args = parse_args([*base, "--full-recipe", "--epochs", "3", "--labels", "all"])
    assert (args.labels, args.epochs) == ([0], 3)  # what is given wins
    args = parse_args(base)
    assert (args.labels, args.epochs) == (list(DEFAULT_LABELS), None)  # each run's own epochs
    with pytest.raises(SystemExit):
        parse_args(["--out", str(tmp_path), "--runs", "b-s0"])  # no exported backbone


def test_probe_lr_study_makes_the_runs_own_lr_choice(tiny_overrides, tmp_path):
    from pathlib import Path

    from benchmarks import probe_lr
    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.server_app import run

    from .conftest import LocalGrid

    overrides = {**tiny_overrides, "algorithm": "random-init", "run-name": "floor",
                 "finetune-labels": 0}  # fmt: skip
    summary = run(LocalGrid(6, overrides), resolve_config(overrides))
    run_dir = Path(overrides["output-dir"]) / "floor"

    record = probe_lr.probe_run(run_dir, (0.1, 0.3, 1.0), val_fraction=0.2)
    # the run's default grid and share: exactly the run's own (tuned) probe
    assert record["tuned"] == summary["linear-probe-accuracy"]["random-init"]
    assert summary["downstream"]["linear-probe"]["random-init"]["lr"] == record["kept-lr"]
    assert (record["probe-images"], record["validation-images"]) == (200, 40)
    best_val = max(p["val"] for p in record["per-lr"].values())
    assert record["per-lr"][str(record["kept-lr"])]["val"] == best_val
    assert record["tuned"] == record["per-lr"][str(record["kept-lr"])]["test"]
    probe_lr.report([record], "cmd", tmp_path, (0.1, 0.3, 1.0))
    assert "| floor | " in (tmp_path / "probe-lr.md").read_text()
    assert (tmp_path / "probe-lr.png").is_file()


def test_node_keys_report_costs_the_difference_of_the_two_modes(tmp_path):
    from benchmarks import node_keys

    def result(n, mode, wall, keys=0.0):
        return {"supernodes": n, "sample-by": mode, "queried": n if keys else 0,
                "key-seconds": keys, "round-seconds": [wall / 2, 1.0, 1.0],
                "wall-seconds": wall, "date": "2026-01-02", "machine": "4 CPU cores"}  # fmt: skip

    results = [result(100, "node-key", 30.0, 5.0), result(100, "node-id", 26.0),
               result(100, "node-key", 34.0, 7.0), result(100, "node-id", 28.0)]  # fmt: skip
    node_keys.report(results, "cmd", tmp_path)
    text = (tmp_path / "node-keys.md").read_text()
    # medians: key queries 6.0, round 1 16.0 / 13.5, walls 32 / 27: cost +5.0 s, +50 ms a node
    assert "| 100 | 2 | 6.0 | 16.0 | 13.5 | 32 | 27 | +5.0 | +50 |" in text
    # the page names the day and machine that measured, not those that rewrote it, and the
    # Ray workers' niceness (results from before it was recorded ran at Ray's default)
    assert "(4 CPU cores; 2026-01-02; Ray workers at niceness 15 (Ray's default))" in text
    node_keys.report([{**r, "worker-niceness": "0"} for r in results], "cmd", tmp_path)
    assert "2026-01-02; Ray workers at niceness 0)" in (tmp_path / "node-keys.md").read_text()


def test_a_page_names_the_machines_its_records_name_with_their_counts():
    from benchmarks.harness import NOT_RECORDED, machines_text

    assert machines_text(["A", "A"]) == "A"
    assert machines_text(["A", None, "B", "A"], "fine-tune") == (
        f"A (2 fine-tunes); {NOT_RECORDED} (1 fine-tune); B (1 fine-tune)"
    )
    assert machines_text([]) == machines_text([None]) == NOT_RECORDED


def test_a_measuring_benchmarks_page_is_rewritten_from_its_tracked_results(tmp_path, capsys):
    """node_keys --report-only: results in --out are kept beside the pages (results fetched
    from another machine included); without them the tracked copy is read; neither: an error
    naming both places."""
    from benchmarks import node_keys

    out, docs = tmp_path / "out", tmp_path / "docs"
    out.mkdir()
    results = [{"supernodes": 10, "sample-by": mode, "queried": 10 * (mode == "node-key"),
                "key-seconds": 1.0 * (mode == "node-key"), "round-seconds": [3.0, 1.0, 1.0],
                "wall-seconds": 9.0, "date": "2026-01-02", "machine": "4 CPU cores"}
               for mode in ("node-key", "node-id")]  # fmt: skip
    (out / "results.json").write_text(json.dumps(results))
    (out / "command.txt").write_text("python -m benchmarks.node_keys --supernodes 10")
    node_keys.main(["--report-only", "--out", str(out), "--docs", str(docs)])
    page = (docs / "node-keys.md").read_text()
    tracked = docs / "data" / "node-keys"
    assert json.loads((tracked / "results.json").read_text()) == results
    assert f"tracked in `{tracked}`" in page and "--supernodes 10`" in page
    shutil.rmtree(out)
    node_keys.main(["--report-only", "--out", str(out), "--docs", str(docs)])
    assert (docs / "node-keys.md").read_text() == page
    shutil.rmtree(tracked)
    with pytest.raises(SystemExit, match=f"no results.json and command.txt in {out} nor in"):
        node_keys.main(["--report-only", "--out", str(out), "--docs", str(docs)])


def test_a_probe_only_noise_floor_is_measured_and_reported_without_fine_tunes(tmp_path, fmnist_dir):
    """``eval_protocol --labels 0`` probes real random-init backbones (tiny sizes) and writes a
    page that states the probe's spread and bound and says no fine-tune was measured."""
    import json

    from benchmarks import eval_protocol

    results, docs = tmp_path / "results.json", tmp_path / "docs"
    argv = ["--labels", "0", "--init-seeds", "0", "1", "--subsets", "2", "--probe-images", "60",
            "--probe-epochs", "2", "--probe-lr-grid", "0.1,1.0", "--test-images", "50",
            "--data-path", str(fmnist_dir), "--results", str(results),
            "--docs", str(docs)]  # fmt: skip
    assert eval_protocol.main(argv) == 0
    measured = json.loads(results.read_text())
    assert set(measured["seeds"]) == {"0", "1"}
    assert all(r["finetune"] is None and len(r["linear-probe"]) == 2
               for r in measured["seeds"].values())  # fmt: skip
    assert all(p["lr"] in (0.1, 1.0) for r in measured["seeds"].values()
               for p in r["linear-probe"])  # fmt: skip
    page = (docs / "eval-protocol.md").read_text()
    assert "**Probe only**" in page and "fine-tune, test top-1" not in page
    assert "linear probe, test top-1" in page and "2 x std x sqrt(2)" in page
    assert "Probe lr kept by validation top-1" in page
    assert (docs / "eval-protocol.png").is_file()


def test_probe_lr_scores_every_lr_keeps_the_validation_choice_and_pairs_with_random_init(
    tmp_path, tiny_overrides
):
    """``benchmarks.probe_lr`` on real (tiny) exported backbones: one row per run with every
    lr's validation / test top-1, the kept lr is the one ``tuned_linear_probe`` chose, and a
    run is paired with the random-init run of its seed."""
    import shutil

    from benchmarks import probe_lr
    from tests.test_bench_report import tiny_run_dir

    floor = tiny_run_dir(tmp_path / "grid", tiny_overrides, seed=0)
    other = tmp_path / "grid" / "fedmae-iid-s0"
    shutil.copytree(floor, other)  # a second backbone of the same seed, named as a FedMAE run
    out, docs = tmp_path / "out", tmp_path / "docs"
    probe_lr.main(["--runs", str(other), str(floor), "--lrs", "0.3", "1.0", "--out", str(out),
                   "--docs", str(docs)])  # fmt: skip
    results = json.loads((out / "probe-lr.json").read_text())
    assert [r["run"] for r in results] == ["fedmae-iid-s0", "random-init-pooled-s0"]
    for r in results:
        assert set(r["per-lr"]) == {"0.1", "0.3", "1.0"}  # the runs' own lr always included
        vals = {float(lr): v["val"] for lr, v in r["per-lr"].items()}
        assert r["kept-lr"] == max(vals, key=lambda lr: (vals[lr], -lr))
        assert r["fixed"] == r["per-lr"]["0.1"]["test"]
    page = (docs / "probe-lr.md").read_text()
    assert "| fedmae-iid-s0 |" in page and "conv." not in page
    assert "- fedmae-iid-s0: fixed lr +0.0, chosen lr +0.0" in page  # identical backbones
    assert (docs / "probe-lr.png").is_file()


def test_the_gpu_report_states_the_fine_tune_protocol_its_runs_used():
    from benchmarks.gpu_report import finetune_text
    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.evaluation.downstream import _protocol

    old = {"finetune-labels": 1000, "finetune-epochs": 15}  # a summary before the keys
    assert finetune_text(old) == "fine-tune 1000 labels for 15 epochs"
    ev = resolve_config({"preset": "fmnist-gpu"}).eval
    sets = {"probe": range(5000), "finetune": range(1000), "test": range(5000)}
    assert finetune_text(_protocol(ev, sets)) == (
        "fine-tune 3 disjoint subsets of 1000 labels for 30 epochs, the lr chosen from "
        "0.001 / 0.002 on a 20 % validation share of each, mean over the subsets"
    )


def test_fedprox_report_pairs_the_seeds_and_says_not_shown_for_mixed_signs(tmp_path):
    from benchmarks.fedprox import report

    def run(seed: int, probe: float, knn: float, psnr: float) -> dict:
        summary = {"linear-probe-accuracy": {"fedmae": probe}, "knn-accuracy": {"fedmae": knn},
                   "final-psnr": psnr}  # fmt: skip
        return {"name": f"r{seed}", "seed": seed, "summary": summary,
                "bench": {"machine": "2 CPU cores"}}  # fmt: skip

    fedavg = {s: run(s, 0.70, 0.60, 12.0) for s in (0, 1, 2)}
    values = {0: (0.71, 0.61, 12.5), 1: (0.69, 0.62, 12.4), 2: (0.72, 0.63, 12.1)}
    fedprox = {s: run(s, *v) for s, v in values.items()}
    # A second mu, finished at two seeds only: paired where both ran.
    other = {s: run(s, 0.60, 0.60, 11.0) for s in (0, 2)}
    text = report(fedavg, {0.01: fedprox, 0.1: other}, "python -m benchmarks.fedprox", tmp_path)
    rows = {" | ".join(line.split(" | ")[:2]): line for line in text.splitlines()
            if line.startswith("| ")}  # fmt: skip
    assert "mu 0.01 (the default), 0.1 against" in text
    assert "s0 +1.0, s1 -1.0, s2 +2.0 | +0.7" in rows["| 0.01 | linear probe (points)"]
    assert rows["| 0.01 | linear probe (points)"].endswith("not shown |")
    assert "s0 +1.0, s1 +2.0, s2 +3.0 | +2.0" in rows["| 0.01 | k-NN (points)"]
    assert rows["| 0.01 | k-NN (points)"].endswith(
        "no noise bound measured | ahead at every seed |"
    )
    assert "s0 +0.5, s1 +0.4, s2 +0.1 | +0.3" in rows["| 0.01 | masked PSNR (dB)"]
    assert "s0 -10.0, s2 -10.0 | -10.0" in rows["| 0.1 | linear probe (points)"]
    assert rows["| 0.1 | linear probe (points)"].endswith("2 seeds: not shown |")
    assert (tmp_path / "fedprox.md").is_file() and (tmp_path / "fedprox.png").is_file()
