"""The budget study and the ablations: naming, verdicts and reports from run summaries."""

from __future__ import annotations

import argparse
import json

import pytest

from benchmarks import ablations, budget
from benchmarks.harness import run_name
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


def test_smallest_paying_budget_is_the_cheapest_that_wins_at_every_seed(tmp_path):
    runs = tmp_path / "runs"
    floor = [fake_run("random-init", 0, 0.60, runs), fake_run("random-init", 1, 0.64, runs)]
    by_budget = {
        # mean 0.63 beats the floor's mean 0.62, but seed 1 loses to its own random init
        (5, 1): [fake_run("fedmae", 0, 0.64, runs / "a"), fake_run("fedmae", 1, 0.62, runs / "a")],
        (10, 4): [fake_run("fedmae", 0, 0.70, runs / "b"), fake_run("fedmae", 1, 0.70, runs / "b")],
        (5, 4): [fake_run("fedmae", 0, 0.61, runs / "c"), fake_run("fedmae", 1, 0.65, runs / "c")],
    }
    assert budget.smallest_paying_budget(by_budget, floor, "finetune-accuracy") == (5, 4)
    assert budget.paired_differences(by_budget[(5, 1)], floor, "finetune-accuracy") == (
        pytest.approx([0.04, -0.02])
    )
    # probe: every fake run scores 0.7, equal to the floor's 0.7: equal is not beating it.
    assert budget.smallest_paying_budget(by_budget, floor, "linear-probe-accuracy") is None


def test_budget_report_states_the_floor_every_budget_and_the_verdict(tmp_path):
    floor = [fake_run("random-init", 0, 0.60, tmp_path / "runs")]
    runs = tmp_path / "runs"
    by_budget = {
        (5, 1): [fake_run("fedmae", 0, 0.58, runs / "a")],
        (5, 4): [fake_run("fedmae", 0, 0.62, runs / "b")],
    }
    path = budget.write_report(by_budget, floor, "python -m benchmarks.budget", "iid", tmp_path)
    text = path.read_text()
    assert "| random-init (floor) | 0 | 60.0 | 70.0 | 60.0 | - | 0 | - |" in text
    # 5 x 4: 20 server rounds; client seconds = 1.0 s per round x 5 rounds x 4 stages
    assert "| 5 x 4 | 20 | 62.0 | 70.0 | 60.0 | 12.00 | 20 | 100 | +2.0 / +0.0 / +0.0 |" in text
    assert "- fine-tune 1k labels: 5 x 4 (seeds [0])" in text
    assert "- linear probe: none of the measured budgets" in text
    assert (tmp_path / "budget-accuracy.png").stat().st_size > 0


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
    assert (run_dir / "finetune-50-ld1.json").is_file()
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


def test_gpu_report_pairs_each_seed_with_its_random_init(tmp_path):
    from benchmarks import gpu_report

    protocol = {"finetune-labels": 1000, "finetune-epochs": 15, "probe-train-images": 5000,
                "test-images": 5000}  # fmt: skip
    for seed, (ours, floor) in enumerate([(0.62, 0.60), (0.58, 0.61)]):
        summary = {
            "run-name": f"fmnist-gpu-s{seed}",
            "finetune-accuracy": {"fedmae": ours, "random-init": floor},
            "linear-probe-accuracy": {"fedmae": 0.7, "random-init": 0.6},
            "knn-accuracy": {"fedmae": 0.7, "random-init": 0.6},
            "final-psnr": 14.0,
            "wall-seconds": 100.0,
            "communication": {"client-train-seconds-mean": 0.2},
            "downstream": {"protocol": protocol},
        }
        (tmp_path / f"fmnist-gpu-s{seed}-summary.json").write_text(json.dumps(summary))
    runs = gpu_report.load_runs(tmp_path)
    text = gpu_report.write_report(runs, "the command", tmp_path / "docs").read_text()
    assert "| 0 | 62.0 / 60.0 (+2.0) |" in text and "| 1 | 58.0 / 61.0 (-3.0) |" in text
    assert "fine-tune 1k labels -0.5 (ahead at 1 of 2 seeds)" in text
    assert "linear probe +10.0 (ahead at 2 of 2 seeds)" in text
    assert (tmp_path / "docs" / "gpu-pretraining-pays.png").stat().st_size > 0


def test_a_posthoc_fine_tune_with_other_epochs_is_cached_apart_and_read_back(tmp_path):
    from benchmarks.label_efficiency import cache_path, posthoc_accuracy
    from fedmae_flwr.config import resolve_config, to_yaml

    (tmp_path / "config.yaml").write_text(to_yaml(resolve_config({"finetune-epochs": 5})))
    assert cache_path(tmp_path, 1000).name == "finetune-1000-ld1.json"
    assert cache_path(tmp_path, 1000, epochs=5).name == "finetune-1000-ld1.json"  # the run's own
    assert posthoc_accuracy(tmp_path, 1000, epochs=15) is None
    cache_path(tmp_path, 1000, epochs=15).write_text(json.dumps({"accuracy": 0.64}))
    assert cache_path(tmp_path, 1000, epochs=15).name == "finetune-1000-ld1-e15.json"
    assert posthoc_accuracy(tmp_path, 1000, epochs=15) == 0.64
