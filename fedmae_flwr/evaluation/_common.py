"""Shared helpers of the evaluation recipes: input checks, seeded batching, schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def check_labeled(
    x: Tensor, y: Tensor, num_classes: int, name: str, sample_ndim: int | None = None
) -> None:
    """Validate one labeled split: ``x`` ``[N, ...]`` and integer labels ``y`` ``[N]``.

    Raises ValueError (naming the split ``name``) on empty or mismatched inputs, non-integer
    labels, or labels outside ``[0, num_classes)``: an out-of-range label would otherwise surface
    as an opaque index error deep inside ``cross_entropy`` or ``scatter``.
    """
    if sample_ndim is not None and x.ndim != sample_ndim:
        raise ValueError(f"{name}: expected a {sample_ndim}-D tensor, got shape {tuple(x.shape)}")
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must be 1-D [N], got shape {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{name}: {x.shape[0]} samples but {y.shape[0]} labels (lengths must match)"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor, got {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {num_classes}), got values in [{lo}, {hi}]"
        )


def check_positive(**values: float) -> None:
    """Raise ValueError for any keyword argument that is not > 0 (``num_classes=0`` etc.)."""
    for key, value in values.items():
        if not value > 0:
            raise ValueError(f"{key} must be > 0, got {value}")


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Yield index tensors covering a fresh random permutation of ``range(n)``.

    A trailing batch of a single sample is merged into the previous one: BatchNorm in training
    mode cannot normalize one sample ("Expected more than 1 value per channel").
    """
    perm = torch.randperm(n, generator=generator)
    chunks = list(perm.split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    yield from chunks


def num_batches(n: int, batch_size: int) -> int:
    """How many index tensors :func:`shuffled_batches` yields for ``n`` samples."""
    count = math.ceil(n / batch_size)
    return count - 1 if count > 1 and n % batch_size == 1 else count


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warmup over ``warmup_steps`` then half-cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def batched_accuracy(
    predict: Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    batch_size: int,
    device: torch.device,
) -> float:
    """Fraction of ``x`` ``[N, ...]`` whose ``predict`` logits ``[B, K]`` argmax equals ``y``."""
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        logits = predict(x[start : start + batch_size].to(device))
        pred = logits.argmax(dim=1).cpu()
        correct += int((pred == y[start : start + batch_size].cpu()).sum())
    return correct / x.shape[0]
