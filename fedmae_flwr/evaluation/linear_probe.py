"""Linear probe and weighted kNN on frozen features (MAE / DINO evaluation protocols)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmae_flwr.evaluation._common import (
    batched_accuracy,
    check_labeled,
    check_positive,
    cosine_lr,
    num_batches,
    shuffled_batches,
)


@dataclass
class ProbeResult:
    """Outcome of :func:`linear_probe`.

    Attributes:
        accuracy: top-1 accuracy on the test split, a fraction in [0, 1].
        train_accuracy: top-1 accuracy on the training split (eval mode), in [0, 1].
        final_loss: cross-entropy over the whole training split after the last epoch (eval
            mode, i.e. BN on its accumulated statistics).
        epochs: epochs trained.
        lr: the peak learning rate trained with (the one kept, under :func:`tuned_linear_probe`).
        val_accuracy: :func:`tuned_linear_probe`'s validation top-1 per lr tried (key: the lr
            as text); empty for a single lr.
    """

    accuracy: float
    train_accuracy: float
    final_loss: float
    epochs: int
    lr: float = 0.1
    val_accuracy: dict[str, float] = field(default_factory=dict)


def _check_features(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int
) -> None:
    check_positive(num_classes=num_classes)
    check_labeled(train_x, train_y, num_classes, "train", sample_ndim=2)
    check_labeled(test_x, test_y, num_classes, "test", sample_ndim=2)
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train and test feature dims differ: {train_x.shape[1]} vs {test_x.shape[1]}"
        )


@torch.no_grad()
def _dataset_loss(head: nn.Module, x: Tensor, y: Tensor, chunk: int = 4096) -> float:
    """Mean cross-entropy of ``head`` over all of ``x`` ``[N, D]``, in eval mode."""
    head.eval()
    total = sum(
        F.cross_entropy(head(xb), yb, reduction="sum").item()
        for xb, yb in zip(x.split(chunk), y.split(chunk), strict=True)
    )
    return total / x.shape[0]


def _probe_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """MAE's probe head: BatchNorm without affine, then a linear layer (small seeded init)."""
    # momentum=None: a cumulative average of the batch statistics. The features are frozen, so
    # their distribution is stationary and the plain average is the right estimate of the
    # population statistics; the default exponential average would still carry its (0, 1)
    # initialization after the few steps of a short probe.
    norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)
    # nn.Linear's constructor draws a default init from the global RNG; fork it so the caller's
    # random stream is not advanced (the init is overwritten from ``generator`` right after).
    with torch.random.fork_rng(devices=[]):
        linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
        linear.bias.zero_()
    return nn.Sequential(norm, linear)


def _train_probe(
    head: nn.Sequential,
    train_x: Tensor,
    train_y: Tensor,
    generator: torch.Generator,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
) -> None:
    """SGD with momentum and a per-step cosine lr, in place."""
    device = train_x.device
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    total_steps = epochs * num_batches(train_x.shape[0], batch_size)
    step = 0
    for _ in range(epochs):
        head.train()
        for idx in shuffled_batches(train_x.shape[0], batch_size, generator):
            idx = idx.to(device)
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, total_steps)
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> ProbeResult:
    """Train a linear classifier on frozen features and report its test accuracy.

    The head is MAE's linear-probe head: ``BatchNorm1d(D, affine=False)`` then
    ``Linear(D, num_classes)``. MAE features are badly conditioned (a few dimensions dominate the
    scale), and plain SGD on them is slow or unstable; the parameter-free BN standardizes each
    dimension and, being linear at test time, keeps the probe linear. The weight starts from a
    truncated normal with std 0.01 and the bias at 0, as in MAE's ``main_linprobe.py``.

    Optimization: SGD with momentum 0.9 (MAE uses LARS at batch 16k; at the small batches used
    here plain SGD is the standard equivalent), a per-step cosine schedule from ``lr`` to 0, and
    cross-entropy. Training runs on the device of ``train_x``.

    Determinism: the head initialization and every epoch's shuffle come from a
    ``torch.Generator`` seeded with ``seed``, and the global RNG is left untouched; on the CPU the
    same inputs and seed give bit-identical results.

    No convergence flag: the probe stops early by design (50 epochs of SGD sit far above the
    minimum of its unregularized objective, which overfits), so whether a probe trained enough
    is a question of its lr and epochs against others on held-out data, which
    :func:`tuned_linear_probe` answers.

    Args:
        train_x: ``[N, D]`` frozen training features.
        train_y: ``[N]`` integer labels in ``[0, num_classes)``.
        test_x: ``[M, D]`` frozen test features.
        test_y: ``[M]`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        epochs: passes over the training features.
        lr: peak learning rate.
        batch_size: minibatch size (a trailing batch of one is merged into the previous one,
            since BatchNorm cannot normalize a single sample).
        weight_decay: SGD weight decay.
        seed: seeds initialization and shuffling.

    Returns:
        A :class:`ProbeResult`; accuracies are fractions in [0, 1].

    Raises:
        ValueError: mismatched lengths or feature dims, non-integer or out-of-range labels,
            empty splits, or non-positive ``epochs`` / ``batch_size`` / ``lr``.
    """
    _check_features(train_x, train_y, test_x, test_y, num_classes)
    check_positive(epochs=epochs, batch_size=batch_size, lr=lr)
    if train_x.shape[0] < 2:
        raise ValueError("linear_probe needs at least 2 training samples (BatchNorm statistics)")

    device = train_x.device
    train_x = train_x.float()
    test_x = test_x.float()
    train_y = train_y.long().to(device)
    dim = train_x.shape[1]

    generator = torch.Generator().manual_seed(seed)
    head = _probe_head(dim, num_classes, generator).to(device)
    _train_probe(head, train_x, train_y, generator, epochs, lr, batch_size, weight_decay)

    head.eval()
    train_acc = batched_accuracy(head, train_x, train_y, 4096, device)
    test_acc = batched_accuracy(head, test_x, test_y, 4096, device)
    return ProbeResult(
        accuracy=test_acc,
        train_accuracy=train_acc,
        final_loss=_dataset_loss(head, train_x, train_y),
        epochs=epochs,
        lr=lr,
    )


def tuned_linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    epochs: int,
    lrs: Sequence[float],
    val_fraction: float,
    seed: int = 0,
) -> ProbeResult:
    """:func:`linear_probe` at the lr of ``lrs`` that a validation share picks.

    A seeded ``val_fraction`` of the training features is held out; a probe at each lr trains
    on the rest and is scored on it; the lr with the best validation top-1 (ties: the earliest
    in ``lrs``) is kept, its probe retrained on all the training features and scored once on
    the test features, which never steer the choice. Why: at a fixed lr 0.1 and 50 epochs the
    probe under-trains some backbones by up to 2 points (docs/probe-lr.md). One lr: the plain
    probe, no validation.
    """
    if len(lrs) == 1:
        return linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs, lr=lrs[0],
                            seed=seed)  # fmt: skip
    from fedmae_flwr.evaluation.protocol import split_validation

    fit, val = split_validation(torch.arange(len(train_y)), val_fraction, seed)
    scores = {
        repr(lr): linear_probe(train_x[fit], train_y[fit], train_x[val], train_y[val],
                               num_classes, epochs, lr=lr, seed=seed).accuracy
        for lr in lrs
    }  # fmt: skip
    kept = max(lrs, key=lambda lr: scores[repr(lr)])  # max() keeps the first of equal scores
    result = linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs, lr=kept,
                          seed=seed)  # fmt: skip
    return replace(result, val_accuracy=scores)


@torch.no_grad()
def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Weighted k-nearest-neighbour top-1 accuracy (the InstDisc / DINO protocol).

    Features are L2-normalized; each test sample takes its ``k`` most cosine-similar training
    samples, and each neighbour votes for its label with weight ``exp(similarity / temperature)``.

    Test samples are processed in chunks sized so that the ``[chunk, N]`` similarity matrix stays
    around 64 MiB of float32: 10k test x 60k train features would otherwise need 2.4 GB at once.

    Args:
        train_x: ``[N, D]`` training features.
        train_y: ``[N]`` integer labels in ``[0, num_classes)``.
        test_x: ``[M, D]`` test features.
        test_y: ``[M]`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        k: neighbours per test sample (capped at N).
        temperature: softmax-style temperature of the vote weights.

    Returns:
        Test accuracy, a fraction in [0, 1].
    """
    _check_features(train_x, train_y, test_x, test_y, num_classes)
    check_positive(k=k, temperature=temperature)

    device = train_x.device
    train_feats = F.normalize(train_x.float(), dim=1)
    train_labels = train_y.long().to(device)
    k = min(k, train_feats.shape[0])
    chunk = max(1, (64 * 2**20 // 4) // train_feats.shape[0])

    correct = 0
    for start in range(0, test_x.shape[0], chunk):
        feats = F.normalize(test_x[start : start + chunk].float().to(device), dim=1)
        sim, idx = (feats @ train_feats.T).topk(k, dim=1)  # [B, k] each
        weights = (sim / temperature).exp()
        votes = torch.zeros(feats.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_labels[idx], weights)  # [B, num_classes]
        pred = votes.argmax(dim=1).cpu()
        correct += int((pred == test_y[start : start + chunk].cpu()).sum())
    return correct / test_x.shape[0]
