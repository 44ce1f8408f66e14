"""The fine-tuning protocol: disjoint subsets, validation split, selection blind to the test set."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from fedmae_flwr.config import ConfigError, resolve_config
from fedmae_flwr.data.images import DatasetSplits, ImageSet
from fedmae_flwr.evaluation import protocol
from fedmae_flwr.evaluation.downstream import finetune_backbones, labelled_subsets
from fedmae_flwr.evaluation.protocol import (
    SubsetResult,
    disjoint_subsets,
    finetune_protocol,
    merge_lr_grids,
    split_validation,
    summarize_subsets,
)

torch.set_num_threads(1)
RECIPE = dict(feature_dim=8, num_classes=4, epochs=1, batch_size=32, weight_decay=0.05,
              augment=False, device="cpu", label_smoothing=0.1, warmup_fraction=0.1,
              layer_decay=1.0)  # fmt: skip


class TinyBackbone(nn.Module):
    """Flatten + linear: a stand-in with timm's ``num_features``."""

    def __init__(self, pixels: int = 64, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, dim), nn.GELU())
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def numbered(n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 images whose every pixel is the image's id (``offset + i``), 4 labels."""
    ids = torch.arange(offset, offset + n, dtype=torch.float32)
    return ids.view(n, 1, 1, 1).expand(n, 1, 8, 8).clone(), torch.arange(n) % 4


def ids_of(images: torch.Tensor) -> set[int]:
    return {int(v) for v in images[:, 0, 0, 0].tolist()}


def test_disjoint_subsets_are_disjoint_and_subset_0_is_the_single_run_subset():
    subsets = disjoint_subsets(100, 20, 4, seed=3)
    assert [len(s) for s in subsets] == [20] * 4
    assert len(set(torch.cat(subsets).tolist())) == 80
    n = 100
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    train, test = ImageSet(images, torch.arange(n)), ImageSet(images[:10], torch.arange(10))
    splits = DatasetSplits(train, test, (0.5,), (0.5,), num_classes=n)
    cfg = resolve_config({"finetune-labels": 20, "probe-train-images": 50}).eval
    single = labelled_subsets(cfg, splits, seed=3)["finetune"].labels
    assert torch.equal(single, subsets[0])
    assert len(disjoint_subsets(10, 20, 1, seed=0)[0]) == 10  # one subset: capped
    with pytest.raises(ValueError, match="3 disjoint subsets of 40 images need 120"):
        disjoint_subsets(100, 40, 3, seed=0)


@pytest.mark.parametrize("fraction, val_size", [(0.0, 0), (0.2, 10), (0.5, 25), (0.999, 49)])
def test_split_validation_partitions_the_subset(fraction, val_size):
    indices = torch.arange(100, 150)
    train, val = split_validation(indices, fraction, seed=1)
    assert len(val) == val_size and len(train) == 50 - val_size
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == indices.tolist()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_validation(indices, 1.0, seed=1)


def _instrument(monkeypatch) -> list[tuple[str, set[int]]]:
    """Record, in order, the image ids each fine-tune trains on and each score looks at."""
    calls: list[tuple[str, set[int]]] = []
    fit, score = protocol.finetuned_model, protocol.classifier_accuracy

    def fit_spy(backbone, **kwargs):
        calls.append(("fit", ids_of(kwargs["train_images"])))
        return fit(backbone, **kwargs)

    def score_spy(model, images, labels, batch_size):
        calls.append(("score", ids_of(images)))
        return score(model, images, labels, batch_size)

    monkeypatch.setattr(protocol, "finetuned_model", fit_spy)
    monkeypatch.setattr(protocol, "classifier_accuracy", score_spy)
    return calls


def test_selection_trains_and_validates_apart_and_scores_the_test_set_once_at_the_end(
    monkeypatch,
):
    calls = _instrument(monkeypatch)
    subset, test = numbered(40), numbered(30, offset=1000)
    test_ids = ids_of(test[0])
    result = finetune_protocol(TinyBackbone(), [subset], test, val_fraction=0.25,
                               lrs=(1e-3, 1e-2, 3e-2), seed=0, **RECIPE)  # fmt: skip
    kinds = [kind for kind, _ in calls]
    assert kinds == ["fit", "score"] * 3 + ["score", "score"]  # 3 x (fit, val); test; train
    fits = [ids for kind, ids in calls if kind == "fit"]
    vals = [ids for kind, ids in calls[:6] if kind == "score"]
    assert all(f == fits[0] for f in fits) and all(v == vals[0] for v in vals)
    assert fits[0].isdisjoint(vals[0]) and len(vals[0]) == 10 and len(fits[0]) == 30
    assert all(test_ids.isdisjoint(ids) for _, ids in calls[:6])  # selection never sees test
    assert calls[6][1] == test_ids and calls[7][1] == fits[0]
    assert result["subsets"][0]["train_labels"] == 30
    assert result["subsets"][0]["val_labels"] == 10


def test_the_kept_lr_is_the_best_on_validation_whatever_the_test_labels(monkeypatch):
    fake_val = {1e-3: 0.2, 1e-2: 0.9, 3e-2: 0.5}
    current: list[float] = []
    fit = protocol.finetuned_model

    def fit_spy(backbone, **kwargs):
        current.append(kwargs["lr"])
        return fit(backbone, **kwargs)

    def score(model, images, labels, batch_size):
        return fake_val[current[-1]] if len(labels) == 10 else 0.0

    monkeypatch.setattr(protocol, "finetuned_model", fit_spy)
    monkeypatch.setattr(protocol, "classifier_accuracy", score)
    subset, (test_x, test_y) = numbered(40), numbered(30, offset=1000)
    for labels in (test_y, (test_y + 1) % 4):
        result = finetune_protocol(TinyBackbone(), [subset], (test_x, labels), val_fraction=0.25,
                                   lrs=tuple(fake_val), seed=0, **RECIPE)  # fmt: skip
        assert result["subsets"][0]["lr"] == 1e-2
        assert result["subsets"][0]["val_accuracy"] == {repr(k): v for k, v in fake_val.items()}


def test_k_subsets_give_k_values_whose_mean_and_std_are_reported():
    subsets = [numbered(24, offset=100 * k) for k in range(3)]
    result = finetune_protocol(TinyBackbone(), subsets, numbered(20, offset=1000),
                               val_fraction=0.0, lrs=(1e-2,), seed=0, **RECIPE)  # fmt: skip
    per_subset = [r["accuracy"] for r in result["subsets"]]
    assert [r["subset"] for r in result["subsets"]] == [0, 1, 2]
    assert result["accuracy"] == pytest.approx(statistics.fmean(per_subset))
    assert result["accuracy_std"] == pytest.approx(statistics.stdev(per_subset))
    trains = [r["train_accuracy"] for r in result["subsets"]]
    assert result["train_accuracy"] == pytest.approx(statistics.fmean(trains))
    with pytest.raises(ValueError, match="validation share"):
        finetune_protocol(TinyBackbone(), subsets, numbered(20), val_fraction=0.0,
                          lrs=(1e-2, 1e-3), seed=0, **RECIPE)  # fmt: skip


def _noisy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_a_grid_merged_from_its_parts_is_the_grid_run_at_once():
    """Fine-tuning the lrs apart and merging gives exactly one run over the whole grid."""
    subsets, test = [_noisy(40, k) for k in range(3)], _noisy(30, 99)
    lrs = (1e-3, 3e-2, 3e-1)
    recipe = {**RECIPE, "epochs": 3}

    def run(grid):
        return finetune_protocol(TinyBackbone(), subsets, test, val_fraction=0.25, lrs=grid,
                                 seed=0, **recipe)  # fmt: skip

    whole = run(lrs)
    # different subsets keep different lrs (one by a tie): the merge has real choices to make
    assert len({r["lr"] for r in whole["subsets"]}) > 1
    parts = [[SubsetResult(**r) for r in run(grid)["subsets"]] for grid in [(3e-2,), (1e-3, 3e-1)]]
    assert summarize_subsets(merge_lr_grids(parts, lrs)) == whole


def _result(lr: float, val: float, test: float, subset: int = 0) -> SubsetResult:
    return SubsetResult(subset=subset, lr=lr, val_accuracy={repr(lr): val}, accuracy=test,
                        train_accuracy=1.0, final_loss=0.1, epochs=30, train_labels=800,
                        val_labels=200)  # fmt: skip


def test_a_validation_tie_between_parts_goes_to_the_earliest_lr_of_the_grid():
    parts = [[_result(2e-3, 0.8, 0.70)], [_result(1e-3, 0.8, 0.75)]]
    (kept,) = merge_lr_grids(parts, (1e-3, 2e-3))
    assert (kept.lr, kept.accuracy) == (1e-3, 0.75)
    assert kept.val_accuracy == {"0.001": 0.8, "0.002": 0.8}
    (kept,) = merge_lr_grids(parts, (2e-3, 1e-3))
    assert (kept.lr, kept.accuracy) == (2e-3, 0.70)


@pytest.mark.parametrize(
    "parts, lrs, message",
    [
        ([[_result(1e-3, 0.8, 0.7)]], (1e-3, 2e-3), "each of"),  # 2e-3 never measured
        ([[_result(1e-3, 0.8, 0.7)], [_result(1e-3, 0.8, 0.7)]], (1e-3,), "each of"),
        ([[_result(1e-3, 0.8, 0.7)], [_result(2e-3, 0.8, 0.7, subset=1)]], (1e-3, 2e-3),
         "different subsets"),
        ([[_result(1e-3, 0.8, 0.7)], []], (1e-3,), "different numbers"),
        ([], (1e-3,), "no measured parts"),
    ],
)  # fmt: skip
def test_parts_that_do_not_make_the_grid_are_refused(parts, lrs, message):
    with pytest.raises(ValueError, match=message):
        merge_lr_grids(parts, lrs)


def _splits(n_train: int = 120, n_test: int = 40) -> DatasetSplits:
    g = torch.Generator().manual_seed(0)

    def image_set(n: int) -> ImageSet:
        images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
        return ImageSet(images, torch.arange(n) % 4)

    return DatasetSplits(image_set(n_train), image_set(n_test), (0.5,), (0.25,), num_classes=4)


def test_downstream_finetune_entries_carry_the_spread_only_under_the_protocol():
    splits = _splits()
    backbones = {"tiny": TinyBackbone()}
    for overrides, has_spread in (({}, False), ({"finetune-subsets": 3}, True)):
        cfg = resolve_config({"finetune-labels": 30, "finetune-epochs": 1, "probe-train-images": 60,
                              **overrides}).eval  # fmt: skip
        sets = labelled_subsets(cfg, splits, seed=0)
        entry = finetune_backbones(cfg, backbones, sets, splits, 0, torch.device("cpu"))["tiny"]
        assert {"accuracy", "train_accuracy", "final_loss", "epochs"} <= set(entry)
        assert ("accuracy_std" in entry) is has_spread
        if has_spread:
            assert len(entry["subsets"]) == 3
            assert entry["accuracy"] == pytest.approx(
                statistics.fmean(r["accuracy"] for r in entry["subsets"])
            )


@pytest.mark.parametrize("augment", [False, True])
def test_the_finetune_augment_key_reaches_both_fine_tune_paths(monkeypatch, augment):
    from fedmae_flwr.evaluation import downstream

    seen = []

    def spy(real):
        def call(*args, **kwargs):
            seen.append(kwargs["augment"])
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(downstream, "finetune", spy(downstream.finetune))
    monkeypatch.setattr(downstream, "finetune_protocol", spy(downstream.finetune_protocol))
    splits = _splits()
    for subsets in (1, 2):  # a single run, then the protocol
        keys = {"finetune-labels": 30, "finetune-epochs": 1, "probe-train-images": 60}
        keys |= {"finetune-subsets": subsets, "finetune-augment": augment}
        cfg = resolve_config(keys).eval
        sets = labelled_subsets(cfg, splits, seed=0)
        finetune_backbones(cfg, {"tiny": TinyBackbone()}, sets, splits, 0, torch.device("cpu"))
    assert seen == [augment, augment]


@pytest.mark.parametrize(
    "overrides, key, allowed",
    [
        ({"finetune-subsets": 0}, "finetune-subsets", "an integer >= 1"),
        ({"finetune-val-fraction": 1.0}, "finetune-val-fraction", r"a number in \[0, 1\)"),
        ({"finetune-val-fraction": -0.1}, "finetune-val-fraction", r"a number in \[0, 1\)"),
        ({"finetune-lr-grid": "1e-3,fast"}, "finetune-lr-grid", "comma-separated numbers > 0"),
        ({"finetune-lr-grid": "1e-3,0"}, "finetune-lr-grid", "comma-separated numbers > 0"),
        ({"finetune-lr-grid": "1e-3,3e-3"}, "finetune-lr-grid", "finetune-val-fraction is 0"),
    ],
)
def test_bad_protocol_keys_name_the_key_and_what_is_allowed(overrides, key, allowed):
    with pytest.raises(ConfigError, match=rf"'{key}'.*Allowed: .*{allowed}"):
        resolve_config(overrides)


def test_the_full_eval_preset_fine_tunes_as_the_benchmarks_protocol_does():
    """A user's preset='full-eval' and the grid's FINETUNE_PROTOCOL give one fine-tune column."""
    from benchmarks.harness import FINETUNE_PROTOCOL

    preset = resolve_config({"preset": "full-eval"}).eval
    protocol = resolve_config(FINETUNE_PROTOCOL).eval
    fields = [f for f in vars(protocol) if f.startswith("finetune_")]
    assert {f: getattr(preset, f) for f in fields} == {f: getattr(protocol, f) for f in fields}
    assert preset.lr_grid == protocol.lr_grid == (1e-3, 2e-3)


def test_the_full_eval_preset_runs_the_whole_protocol():
    cfg = resolve_config({"preset": "full-eval"}).eval
    assert cfg.finetune_subsets >= 3 and cfg.finetune_val_fraction > 0
    assert len(cfg.lr_grid) >= 2 and cfg.finetune_lr in cfg.lr_grid
    default = resolve_config().eval
    assert default.finetune_subsets == 1 and default.lr_grid == (default.finetune_lr,)
    grid = resolve_config({"finetune-lr-grid": " 3e-4, 1e-3 ", "finetune-val-fraction": 0.2})
    assert grid.eval.lr_grid == (3e-4, 1e-3)


def test_a_run_under_the_protocol_reports_the_mean_as_its_finetune_accuracy(tiny_overrides):
    from fedmae_flwr.server_app import run
    from tests.conftest import LocalGrid

    overrides = {**tiny_overrides, "algorithm": "random-init", "run-name": "protocol",
                 "finetune-subsets": 2, "finetune-val-fraction": 0.2,
                 "finetune-lr-grid": "1e-3,3e-3"}  # fmt: skip
    summary = run(LocalGrid(6, overrides), resolve_config(overrides))
    entry = summary["downstream"]["finetune"]["random-init"]
    assert summary["finetune-accuracy"]["random-init"] == entry["accuracy"]
    assert [r["subset"] for r in entry["subsets"]] == [0, 1]
    assert all(r["lr"] in (1e-3, 3e-3) and len(r["val_accuracy"]) == 2 for r in entry["subsets"])
    assert all(r["train_labels"] == 40 and r["val_labels"] == 10 for r in entry["subsets"])
    protocol_record = summary["downstream"]["protocol"]
    assert protocol_record["finetune-subsets"] == 2
    assert protocol_record["finetune-lr-grid"] == [1e-3, 3e-3]


def test_the_tracked_probe_only_floor_regenerates_under_todays_defaults():
    """docs/data/eval-protocol.json predates finetune-augment (its recipe held crop + flip); a
    probe-only file is not bound by fine-tune keys, so its documented --report-only command
    reads it; a fine-tune file of another recipe is still refused."""
    from benchmarks import eval_protocol

    args = eval_protocol.parse_args(["--labels", "0", "--init-seeds", "0", "1", "2", "3", "4"])
    results = eval_protocol.load_results(eval_protocol.RESULTS, eval_protocol.protocol_of(args))
    assert len(results["seeds"]) == 5 and results["protocol"]["finetune-augment"] is True
    assert "augment" not in results["protocol"]["finetune-recipe"]
    tuned = eval_protocol.protocol_of(eval_protocol.parse_args([]))
    assert not eval_protocol.same_protocol({**tuned, "finetune-augment": True}, tuned)


def test_a_fine_tune_floor_of_another_recipe_says_so_crop_and_flip_included():
    """The page flags a floor measured under another fine-tune recipe, crop + flip counted."""
    from benchmarks import eval_protocol

    today = eval_protocol.protocol_of(eval_protocol.parse_args(["--labels", "1000"]))
    assert not any("Not today's" in n for n in eval_protocol._recipe_note(today))
    other = {**today, "finetune-augment": not today["finetune-augment"]}
    flipped = eval_protocol._recipe_note(other)
    assert any("Not today's fine-tune recipe" in n and "crop + flip" in n for n in flipped)
