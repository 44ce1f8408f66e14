"""End-to-end fine-tuning of a pretrained backbone with a fresh, normalized linear head.

A compact, CPU-friendly version of MAE's ``main_finetune.py`` recipe (AdamW, warmup + cosine,
label smoothing, no weight decay on biases / norms / position embeddings, optional layer-wise lr
decay, a normalization of the pooled features before the head), without the ImageNet-scale
extras (mixup, cutmix, RandAugment, drop path) that do not pay off on small images and short
schedules. The recipe is fixed by the arguments alone, so every backbone compared sees exactly
the same one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmae_flwr.config import HeadNorm
from fedmae_flwr.evaluation._common import (
    batched_accuracy,
    check_labeled,
    check_positive,
    cosine_lr,
    num_batches,
    shuffled_batches,
)
from fedmae_flwr.seeding import seeded_global_rng

# MAE initializes the fine-tuning head with std 2e-5: the logits start at ~0, so the first,
# warmup-sized steps do not push large random gradients back into the pretrained backbone.
HEAD_INIT_STD = 2e-5


@dataclass
class FinetuneResult:
    """Outcome of :func:`finetune`.

    Attributes:
        accuracy: top-1 accuracy on the test split, a fraction in [0, 1].
        train_accuracy: top-1 accuracy on the (un-augmented) training split in eval mode.
        final_loss: mean training loss over the minibatches of the last epoch (label-smoothed,
            so it never reaches 0).
        epochs: epochs trained.
    """

    accuracy: float
    train_accuracy: float
    final_loss: float
    epochs: int


# The feature normalization between backbone and linear head. Mean-pooled final-norm tokens of
# a random or lightly pretrained ViT have a small, uneven scale, so a bare linear head (started
# at ~0, see HEAD_INIT_STD) learns slowly: 15 epochs left a random-init backbone at ~59 % train
# top-1 on 1,000 labels. MAE normalizes there too (fine-tuning: LayerNorm ``fc_norm``; linear
# probe: BatchNorm without affine); docs/finetune-recipe.md measures the choice.
HEAD_NORMS = tuple(str(kind) for kind in HeadNorm)  # the run-config key's values, one list


def head_norm_layer(kind: str, dim: int) -> nn.Module:
    """The ``kind`` of :data:`HEAD_NORMS` for ``dim`` features (ValueError for any other)."""
    if kind == "batchnorm":
        return nn.BatchNorm1d(dim, affine=False)
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {kind!r}")


class _Classifier(nn.Module):
    """``backbone`` (``[B, C, H, W]`` -> ``[B, D]``), a feature ``norm``, then a linear ``head``."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.norm = norm if norm is not None else nn.Identity()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        feats = self.backbone(x)
        if feats.ndim != 2 or feats.shape[1] != self.head.in_features:
            raise ValueError(
                f"backbone must return [B, feature_dim={self.head.in_features}] features, "
                f"got {tuple(feats.shape)}"
            )
        return self.head(self.norm(feats))


def _param_groups(model: _Classifier, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: no weight decay on biases, norm weights and the backbone's own exemptions.

    Decaying 1-D parameters (biases, LayerNorm/BatchNorm scales) or position embeddings and class
    tokens only shrinks them towards 0 without regularizing anything; timm models list the
    latter in ``no_weight_decay()``, which is honoured when present.

    ``layer_decay`` < 1 (MAE fine-tuning: 0.75) uses timm's layer-decay groups (key
    ``lr_scale``): with ``L`` blocks, block ``i`` gets ``layer_decay ** (L - 1 - i)`` (the last
    block and final norm full lr), the stem ``layer_decay ** L``, the head 1; early pretrained
    blocks move less than late ones.
    """
    if layer_decay < 1.0:
        from timm.optim import param_groups_layer_decay

        skip_names = getattr(model.backbone, "no_weight_decay", lambda: set())()
        groups = param_groups_layer_decay(
            model.backbone, weight_decay, no_weight_decay_list=skip_names, layer_decay=layer_decay
        )
        # The head norm's parameters (LayerNorm only) are 1-D: no decay, full lr, like the bias.
        head = [*model.norm.parameters(), *model.head.parameters()]
        return [
            *groups,
            {"params": [p for p in head if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0},
        ]
    skip: set[str] = set()
    if hasattr(model.backbone, "no_weight_decay"):
        skip = {f"backbone.{name}" for name in model.backbone.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.ndim <= 1 or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _random_crop_flip(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding, then random horizontal flip, per sample.

    Args:
        images: ``[B, C, H, W]``, already normalized, so the zero padding is the dataset mean.
        generator: a CPU generator; draws 3 numbers per sample.

    Returns:
        ``[B, C, H, W]``: each image shifted by up to ``max(1, H // 8)`` pixels in each direction
        (uncovered border zero) and mirrored left-right with probability 1/2.
    """
    b, _, h, w = images.shape
    pad = max(1, h // 8)
    padded = F.pad(images, (pad, pad, pad, pad))
    # Per-sample crop offsets in [0, 2 * pad]; drawing on the CPU generator keeps the stream
    # identical whatever device the images are on.
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(images.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(images.device)
    rows = dy[:, None] + torch.arange(h, device=images.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=images.device)  # [B, W]
    # Advanced indexing on dims 0, 2, 3 around the channel slice yields [B, H, W, C].
    batch_idx = torch.arange(b, device=images.device)[:, None, None]
    crops = padded[batch_idx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], crops.flip(-1), crops)


def _check_inputs(
    feature_dim: int,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    **sizes: float,
) -> None:
    """The ValueErrors :func:`finetune` documents, before any work."""
    layer_decay, warmup_fraction = sizes.pop("layer_decay"), sizes.pop("warmup_fraction")
    check_positive(feature_dim=feature_dim, num_classes=num_classes, **sizes)
    check_labeled(train_images, train_labels, num_classes, "train", sample_ndim=4)
    check_labeled(test_images, test_labels, num_classes, "test", sample_ndim=4)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"train and test images differ in shape: {tuple(train_images.shape[1:])} vs "
            f"{tuple(test_images.shape[1:])}"
        )
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")


def _train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    generator: torch.Generator,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    augment: bool,
    warmup_fraction: float,
    label_smoothing: float,
) -> float:
    """The training epochs (per-step warmup + cosine lr); returns the last epoch's mean loss."""
    device = next(model.parameters()).device
    total_steps = epochs * num_batches(images.shape[0], batch_size)
    warmup_steps = math.floor(warmup_fraction * total_steps)
    step, final_loss = 0, math.nan
    model.train()
    for _ in range(epochs):
        loss_sum, seen = 0.0, 0
        for idx in shuffled_batches(images.shape[0], batch_size, generator):
            x = images[idx].to(device=device, dtype=torch.float32)
            y = labels[idx].to(device=device, dtype=torch.long)
            if augment:
                x = _random_crop_flip(x, generator)
            for group in optimizer.param_groups:
                scale = group.get("lr_scale", 1.0)
                group["lr"] = scale * cosine_lr(lr, step, total_steps, warmup_steps)
            loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * idx.numel()
            seen += idx.numel()
            step += 1
        final_loss = loss_sum / seen
    return final_loss


def finetune(
    backbone: nn.Module,
    feature_dim: int,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    epochs: int = 30,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 0.05,
    augment: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    label_smoothing: float = 0.1,
    warmup_fraction: float = 0.1,
    layer_decay: float = 1.0,
    head_norm: str = "batchnorm",
) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` plus a new linear head on all parameters.

    The caller's ``backbone`` is deep-copied and never modified (its parameters, buffers, mode
    and device stay as they were). The copy gets a ``head_norm`` feature normalization and a
    ``Linear(feature_dim, num_classes)`` head (truncated-normal weight with std
    :data:`HEAD_INIT_STD`, zero bias) and every parameter is trained, including any the caller
    had frozen.

    Recipe: AdamW (betas 0.9 / 0.999) with no weight decay on 1-D parameters and on the
    backbone's ``no_weight_decay()`` names; per-step learning rate with linear warmup over the
    first ``warmup_fraction`` of the steps, then cosine decay to 0; cross-entropy with
    ``label_smoothing``. With ``augment``, each training batch is randomly cropped after
    ``max(1, H // 8)`` px of zero padding and randomly flipped left-right.

    Determinism: shuffling, augmentation and head init come from a ``torch.Generator`` seeded
    with ``seed``; the global RNG (used by dropout / drop path inside the backbone) is seeded with
    ``seed`` for the call, and the caller's RNG state is restored afterwards. On the
    CPU the same inputs and seed give identical results.

    Args:
        backbone: maps ``[B, C, H, W]`` float to ``[B, feature_dim]``.
        feature_dim: width D of the backbone's output.
        train_images: ``[N, C, H, W]`` float, already normalized; stays where it is, each batch
            is moved to ``device``.
        train_labels: ``[N]`` integer labels in ``[0, num_classes)``.
        test_images: ``[M, C, H, W]`` float, already normalized.
        test_labels: ``[M]`` integer labels in ``[0, num_classes)``.
        num_classes: number of classes.
        epochs: passes over the training split.
        lr: peak learning rate.
        batch_size: training and evaluation batch size.
        weight_decay: AdamW weight decay of the matrices.
        augment: random crop + flip on the training batches.
        seed: seeds everything random in the run.
        device: where training and evaluation run.
        label_smoothing: cross-entropy label smoothing.
        warmup_fraction: fraction of the total steps spent in linear warmup.
        layer_decay: per-block learning-rate decay for ViT backbones (1 = off; MAE uses 0.75).
        head_norm: one of :data:`HEAD_NORMS`, the normalization of the features before the head
            (``batchnorm``: without affine, as MAE's probe; ``layernorm``: as MAE's ``fc_norm``).

    Returns:
        A :class:`FinetuneResult`; the test accuracy is measured in eval mode, batched.

    Raises:
        ValueError: mismatched lengths, non-integer or out-of-range labels, non-4-D images,
            train / test image shapes that differ, non-positive sizes, an unknown
            ``head_norm``, or a backbone whose output is not ``[B, feature_dim]``.
    """
    _check_inputs(feature_dim, train_images, train_labels, test_images, test_labels, num_classes,
                  epochs=epochs, lr=lr, batch_size=batch_size, layer_decay=layer_decay,
                  warmup_fraction=warmup_fraction)  # fmt: skip
    head_norm_layer(head_norm, feature_dim)  # the ValueError for an unknown kind, before any work
    model, final_loss = finetuned_model(
        backbone, feature_dim, train_images, train_labels, num_classes, epochs=epochs, lr=lr,
        batch_size=batch_size, weight_decay=weight_decay, augment=augment, seed=seed,
        device=device, label_smoothing=label_smoothing, warmup_fraction=warmup_fraction,
        layer_decay=layer_decay, head_norm=head_norm,
    )  # fmt: skip
    train_acc = classifier_accuracy(model, train_images, train_labels, batch_size)
    test_acc = classifier_accuracy(model, test_images, test_labels, batch_size)
    return FinetuneResult(
        accuracy=test_acc, train_accuracy=train_acc, final_loss=final_loss, epochs=epochs
    )


def finetuned_model(
    backbone: nn.Module,
    feature_dim: int,
    train_images: Tensor,
    train_labels: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    augment: bool,
    seed: int,
    device: str | torch.device,
    label_smoothing: float,
    warmup_fraction: float,
    layer_decay: float,
    head_norm: str = "batchnorm",
) -> tuple[nn.Module, float]:
    """The training half of :func:`finetune` (same recipe and seeding), unchecked.

    Returned apart from any scoring so that a caller choosing between runs (validation-based
    selection in :mod:`~fedmae_flwr.evaluation.protocol`) can keep the chosen model and score
    the test set with it alone. Returns the classifier (eval mode, on ``device``) and the last
    epoch's mean training loss.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with seeded_global_rng(seed, device):
        head = nn.Linear(feature_dim, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(head.weight, std=HEAD_INIT_STD, generator=generator)
            head.bias.zero_()
        norm = head_norm_layer(head_norm, feature_dim)
        model = _Classifier(copy.deepcopy(backbone), head, norm).to(device)
        model.requires_grad_(True)

        optimizer = torch.optim.AdamW(_param_groups(model, weight_decay, layer_decay), lr=lr)
        final_loss = _train(
            model, optimizer, train_images, train_labels, generator,
            epochs=epochs, lr=lr, batch_size=batch_size, augment=augment,
            warmup_fraction=warmup_fraction, label_smoothing=label_smoothing,
        )  # fmt: skip
    return model.eval(), final_loss


def classifier_accuracy(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int) -> float:
    """Top-1 of a :func:`finetuned_model` classifier, batched on the model's device."""
    device = next(model.parameters()).device
    return batched_accuracy(lambda x: model(x.float()), images, labels, batch_size, device)
