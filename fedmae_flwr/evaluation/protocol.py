"""Fine-tuning under a protocol whose noise is known: K label subsets, lr chosen on validation.

One fine-tune on one labelled subset is one draw: which images carry labels and the training
randomness move its accuracy by about as much as the differences the benchmarks look for. So the
protocol fine-tunes on ``K`` disjoint seeded subsets and reports the mean, the std and every
subset's value; and where it chooses a learning rate, it chooses on a validation share held out
of each subset, so the test set is scored once, by the chosen model, and never steers a choice.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedmae_flwr.evaluation.finetune import classifier_accuracy, finetuned_model
from fedmae_flwr.seeding import derive_seed

Labelled = tuple[Tensor, Tensor]  # images [N, C, H, W] (normalized), labels [N]


@dataclass
class SubsetResult:
    """One subset's fine-tune under :func:`finetune_protocol`.

    Attributes:
        subset: index of the subset (0 = the one a single-subset run uses).
        lr: the learning rate kept (the grid's best on validation; the only one without a grid).
        val_accuracy: validation top-1 of each lr tried (key: the lr as text); empty without a
            validation share.
        accuracy: test top-1 of the kept model.
        train_accuracy: top-1 of the kept model on the images it trained on (eval mode).
        final_loss: the kept run's last-epoch mean training loss.
        epochs: epochs trained.
        train_labels: images trained on (the subset less its validation share).
        val_labels: images held out for validation.
    """

    subset: int
    lr: float
    val_accuracy: dict[str, float]
    accuracy: float
    train_accuracy: float
    final_loss: float
    epochs: int
    train_labels: int
    val_labels: int


def disjoint_subsets(num_images: int, size: int, count: int, seed: int) -> list[Tensor]:
    """``count`` disjoint index sets of ``size`` from one seeded permutation of ``num_images``.

    Subset ``k`` is ``order[k * size : (k + 1) * size]``, so subset 0 is exactly the fine-tuning
    subset a single-subset run draws with the same seed (numbers stay comparable across
    ``count``). Disjoint, so the spread over subsets is the spread over which images carry
    labels, not over overlapping resamples. A single subset is capped at ``num_images``; more
    subsets than fit raise ValueError.
    """
    if size < 1 or count < 1:
        raise ValueError(f"size and count must be >= 1, got {size} and {count}")
    if count > 1 and count * size > num_images:
        raise ValueError(
            f"{count} disjoint subsets of {size} images need {count * size}, the source has "
            f"{num_images}: lower finetune-subsets or finetune-labels"
        )
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return [order[k * size : (k + 1) * size] for k in range(count)]


def split_validation(indices: Tensor, val_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded split of ``indices`` into (train, validation), validation ``val_fraction`` of them.

    With ``val_fraction`` > 0 both parts keep at least one image; with 0 validation is empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = indices.numel()
    num_val = 0 if val_fraction == 0 else min(max(1, round(val_fraction * n)), n - 1)
    if val_fraction > 0 and num_val < 1:
        raise ValueError(f"a validation share needs at least 2 images, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return indices[perm[num_val:]], indices[perm[:num_val]]


def _select(
    backbone: nn.Module, train: Labelled, val: Labelled, lrs: tuple[float, ...], **recipe: Any
) -> tuple[nn.Module, float, float, dict[str, float]]:
    """Fine-tune at each lr, keep the best on validation (ties: earliest in the grid).

    Sees the training and validation parts only; only the kept model stays in memory.
    Returns (model, lr, final loss, validation top-1 per lr).
    """
    best: tuple[float, nn.Module, float, float] | None = None
    scores: dict[str, float] = {}
    batch_size = recipe["batch_size"]
    for lr in lrs:
        model, loss = finetuned_model(
            backbone, train_images=train[0], train_labels=train[1], lr=lr, **recipe
        )
        score = classifier_accuracy(model, *val, batch_size) if len(val[1]) else math.nan
        if len(val[1]):
            scores[repr(lr)] = score
        if best is None or score > best[0]:
            best = (score, model, lr, loss)
    assert best is not None
    return best[1], best[2], best[3], scores


def finetune_subset(
    backbone: nn.Module,
    subset: int,
    train: Labelled,
    val: Labelled,
    test: Labelled,
    lrs: tuple[float, ...],
    **recipe: Any,
) -> SubsetResult:
    """Select on ``val`` (:func:`_select`), then score the kept model on ``test`` and ``train``."""
    if len(lrs) > 1 and not len(val[1]):
        raise ValueError("choosing between several lrs needs a validation share")
    model, lr, loss, scores = _select(backbone, train, val, lrs, **recipe)
    batch_size = recipe["batch_size"]
    return SubsetResult(
        subset=subset,
        lr=lr,
        val_accuracy=scores,
        accuracy=classifier_accuracy(model, *test, batch_size),
        train_accuracy=classifier_accuracy(model, *train, batch_size),
        final_loss=loss,
        epochs=recipe["epochs"],
        train_labels=len(train[1]),
        val_labels=len(val[1]),
    )


def merge_lr_grids(
    parts: Sequence[Sequence[SubsetResult]], lrs: Sequence[float]
) -> list[SubsetResult]:
    """The per-subset results of the lr grid ``lrs`` from results measured on parts of it.

    Exact, not an estimate: a fine-tune at one lr does not depend on which other lrs share its
    grid (the same subset, validation split and seed), and :func:`_select` keeps the best on
    validation with ties going to the earliest lr; so among the parts' kept models, the best on
    validation (ties: earliest in ``lrs``) is the model one run over ``lrs`` keeps. On the CPU a
    fine-tune is bit-reproducible, so the merged values are that run's values.

    Args:
        parts: one list of subset results per measured part (same subsets in the same order).
        lrs: the whole grid; each part's lrs must be a part of it, in its order, the parts
            disjoint and together all of it.

    Raises:
        ValueError: naming what does not fit (a missing, repeated or foreign lr, a part in
        another order, subsets that differ, or a part without validation scores).
    """
    grid = [float(lr) for lr in lrs]
    if not parts:
        raise ValueError("no measured parts to merge")
    measured = [[float(lr) for lr in part[0].val_accuracy] if part else [] for part in parts]
    flat = [lr for part_lrs in measured for lr in part_lrs]
    if sorted(flat) != sorted(grid) or len(set(grid)) != len(grid):
        raise ValueError(f"the parts measured lrs {flat}; merging needs each of {grid} once")
    for part_lrs in measured:
        if part_lrs != [lr for lr in grid if lr in part_lrs]:
            raise ValueError(f"a part measured lrs {part_lrs} out of the grid's order {grid}")
    counts = {len(part) for part in parts}
    if len(counts) != 1:
        raise ValueError(f"the parts hold different numbers of subsets: {sorted(counts)}")
    merged = []
    for results in zip(*parts, strict=True):
        same = {(r.subset, r.epochs, r.train_labels, r.val_labels) for r in results}
        if len(same) != 1:
            raise ValueError(f"the parts fine-tuned different subsets: {sorted(same)}")
        if any(
            set(map(float, r.val_accuracy)) != set(m)
            for r, m in zip(results, measured, strict=True)
        ):
            raise ValueError("every part must hold a validation score for each of its lrs")
        scores = {float(lr): v for r in results for lr, v in r.val_accuracy.items()}
        kept = max(results, key=lambda r: (scores[float(r.lr)], -grid.index(float(r.lr))))
        merged.append(
            SubsetResult(**{**asdict(kept), "val_accuracy": {repr(lr): scores[lr] for lr in grid}})
        )
    return merged


def subset_seed(seed: int, subset: int) -> int:
    """Training seed of subset ``subset``: ``seed`` itself for subset 0 (a single-subset run)."""
    return seed if subset == 0 else derive_seed(seed, "finetune-subset", subset)


def summarize_subsets(results: list[SubsetResult]) -> dict[str, Any]:
    """Mean over subsets under FinetuneResult's keys (readers of one fine-tune keep working),
    plus the sample std (0 for one subset) and every subset's own result."""

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    test = [r.accuracy for r in results]
    train = [r.train_accuracy for r in results]
    return {
        "accuracy": statistics.fmean(test),
        "train_accuracy": statistics.fmean(train),
        "final_loss": statistics.fmean(r.final_loss for r in results),
        "epochs": results[0].epochs,
        "accuracy_std": spread(test),
        "train_accuracy_std": spread(train),
        "subsets": [asdict(r) for r in results],
    }


def finetune_protocol(
    backbone: nn.Module,
    subsets: list[Labelled],
    test: Labelled,
    *,
    val_fraction: float,
    lrs: tuple[float, ...],
    seed: int,
    **recipe: Any,
) -> dict[str, Any]:
    """Fine-tune ``backbone`` on each labelled subset; :func:`summarize_subsets` of the results.

    Each subset is split by :func:`split_validation` (seeded per subset), the lr is chosen by
    validation top-1 only, and the kept model alone is scored on ``test``.

    Args:
        backbone: maps ``[B, C, H, W]`` to ``[B, num_features]`` (left unmodified).
        subsets: the labelled subsets, normalized images and labels (e.g. from
            :func:`disjoint_subsets`).
        test: normalized test images and labels.
        val_fraction: share of each subset held out for validation (0: none; then ``lrs`` must
            hold one lr).
        lrs: the learning-rate grid.
        seed: subset ``k`` trains with :func:`subset_seed` ``(seed, k)``.
        recipe: the rest of :func:`~fedmae_flwr.evaluation.finetune.finetuned_model`'s
            arguments by keyword (feature_dim, num_classes, epochs, batch_size, ...).
    """
    results = []
    for k, (images, labels) in enumerate(subsets):
        train_idx, val_idx = split_validation(
            torch.arange(len(labels)), val_fraction, derive_seed(seed, "finetune-val", k)
        )
        train = (images[train_idx], labels[train_idx])
        val = (images[val_idx], labels[val_idx])
        results.append(
            finetune_subset(backbone, k, train, val, test, lrs, seed=subset_seed(seed, k), **recipe)
        )
    return summarize_subsets(results)
