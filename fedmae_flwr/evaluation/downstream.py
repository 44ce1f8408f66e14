"""Downstream accuracy of backbones under one protocol: linear probe and few-label fine-tuning.

Every backbone gets the same labelled subsets, epochs, learning rates and augmentation, so the
numbers compare. Raw pixels get the probe too, as a floor a backbone should clear.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import asdict
from logging import INFO
from typing import Any

import torch
from flwr.common import log
from torch import Tensor, nn

from fedmae_flwr.config import EvalConfig
from fedmae_flwr.data.images import DatasetSplits, ImageSet
from fedmae_flwr.evaluation.features import extract_features
from fedmae_flwr.evaluation.finetune import finetune
from fedmae_flwr.evaluation.linear_probe import knn_accuracy, tuned_linear_probe
from fedmae_flwr.evaluation.protocol import disjoint_subsets, finetune_protocol

# What EvalConfig leaves fixed, at finetune()'s own defaults (read from its signature, so the
# single run and the protocol cannot drift apart).
PROTOCOL_RECIPE: dict[str, Any] = {
    key: inspect.signature(finetune).parameters[key].default
    for key in ("batch_size", "weight_decay", "label_smoothing", "warmup_fraction")
}


def labelled_subsets(cfg: EvalConfig, splits: DatasetSplits, seed: int) -> dict[str, ImageSet]:
    """Seeded subsets: probe training images, fine-tuning labels (within them), test images.

    Each is capped at what the source has (``test-images`` 0 = the whole test set).
    """
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(seed))
    probe = splits.train.subset(order[: cfg.probe_train_images])
    tune = splits.train.subset(order[: cfg.finetune_labels])
    num_test = min(cfg.test_images or len(splits.test), len(splits.test))
    return {"probe": probe, "finetune": tune, "test": splits.test.subset(range(num_test))}


@torch.no_grad()
def block_features(
    model: nn.Module, images: Tensor, batch_size: int = 256, device: torch.device | str = "cpu"
) -> list[Tensor]:
    """Mean-pooled patch tokens after each block of a timm ViT: one ``[N, D]`` per block (CPU)."""
    was_training, original_device = model.training, next(model.parameters()).device
    model.eval().to(device)
    batches = [
        [
            t.mean(1).cpu()
            for t in model.forward_intermediates(
                batch.to(device),
                indices=len(model.blocks),
                output_fmt="NLC",
                intermediates_only=True,
            )
        ]
        for batch in images.split(batch_size)
    ]
    model.train(was_training).to(original_device)
    return [torch.cat([b[i] for b in batches]) for i in range(len(model.blocks))]


class _Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)


def _protocol_subsets(
    cfg: EvalConfig, splits: DatasetSplits, seed: int
) -> list[tuple[Tensor, Tensor]]:
    """The ``finetune-subsets`` disjoint labelled subsets, normalized (subset 0 = ``finetune``)."""
    indices = disjoint_subsets(len(splits.train), cfg.finetune_labels, cfg.finetune_subsets, seed)
    subsets = [splits.train.subset(index) for index in indices]
    return [(splits.normalize(s.images), s.labels) for s in subsets]


def _single_run(cfg: EvalConfig) -> bool:
    """One subset, no validation share, one lr: plain :func:`finetune`, as before the protocol."""
    return cfg.finetune_subsets == 1 and cfg.finetune_val_fraction == 0 and len(cfg.lr_grid) == 1


def finetune_backbones(
    cfg: EvalConfig,
    backbones: dict[str, nn.Module],
    sets: dict[str, ImageSet],
    splits: DatasetSplits,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Fine-tune each backbone on the labelled subset(s); top-1 on ``test``.

    A single run gives FinetuneResult's keys; several subsets or an lr grid give the same keys
    as means over the subsets plus ``accuracy_std`` and ``subsets`` (:mod:`.protocol`).
    """
    test = (splits.normalize(sets["test"].images), sets["test"].labels)
    recipe = {"num_classes": splits.num_classes, "epochs": cfg.finetune_epochs, "device": device,
              "layer_decay": cfg.finetune_layer_decay, "augment": cfg.finetune_augment,
              "head_norm": str(cfg.finetune_head_norm)}  # fmt: skip
    subsets = None if _single_run(cfg) else _protocol_subsets(cfg, splits, seed)
    results = {}
    for name, backbone in backbones.items():
        start = time.perf_counter()
        if subsets is None:
            results[name] = asdict(finetune(
                backbone, backbone.num_features, splits.normalize(sets["finetune"].images),
                sets["finetune"].labels, *test, lr=cfg.finetune_lr, seed=seed, **recipe,
            ))  # fmt: skip
        else:
            results[name] = finetune_protocol(
                backbone, subsets, test, val_fraction=cfg.finetune_val_fraction,
                lrs=cfg.lr_grid, seed=seed, feature_dim=backbone.num_features,
                **PROTOCOL_RECIPE, **recipe,
            )  # fmt: skip
        log(INFO, "fine-tune %s: %.4f (%.1fs)",
            name, results[name]["accuracy"], time.perf_counter() - start)  # fmt: skip
    return results


def _probe_backbones(
    report: dict[str, Any],
    cfg: EvalConfig,
    splits: DatasetSplits,
    sets: dict[str, ImageSet],
    candidates: dict[str, nn.Module],
    seed: int,
    device: torch.device,
) -> None:
    """Fill ``report`` with each candidate's linear probe, k-NN and (if asked) per-block probe."""
    probe_x = splits.normalize(sets["probe"].images)
    test_x = splits.normalize(sets["test"].images)
    probe_y, test_y = sets["probe"].labels, sets["test"].labels

    def probe(train_x: Tensor, test_x: Tensor) -> Any:
        # The probe trains where its features are.
        return tuned_linear_probe(
            train_x.to(device), probe_y, test_x.to(device), test_y, splits.num_classes,
            cfg.probe_epochs, cfg.probe_lrs, cfg.probe_val_fraction, seed=seed,
        )  # fmt: skip

    for name, backbone in candidates.items():
        start = time.perf_counter()
        train_f = extract_features(backbone, probe_x, device=device)
        test_f = extract_features(backbone, test_x, device=device)
        result = probe(train_f, test_f)
        report["linear-probe"][name] = asdict(result)
        report["knn"][name] = knn_accuracy(train_f, probe_y, test_f, test_y, splits.num_classes)
        log(INFO, "linear probe %s: %.4f, k-NN %.4f (%.1fs)",
            name, result.accuracy, report["knn"][name], time.perf_counter() - start)  # fmt: skip
        if cfg.probe_per_block and name != "pixels":
            train_b = block_features(backbone, probe_x, device=device)
            test_b = block_features(backbone, test_x, device=device)
            accuracies = [probe(a, b).accuracy for a, b in zip(train_b, test_b, strict=True)]
            report.setdefault("linear-probe-per-block", {})[name] = accuracies


def _protocol(cfg: EvalConfig, sets: dict[str, ImageSet]) -> dict[str, Any]:
    """The protocol as run: subset sizes as used (capped at what the source has)."""
    return {
        "probe-train-images": len(sets["probe"]),
        "probe-epochs": cfg.probe_epochs,
        "probe-lr-grid": list(cfg.probe_lrs),
        "probe-val-fraction": cfg.probe_val_fraction if len(cfg.probe_lrs) > 1 else 0.0,
        "probe-head": "BatchNorm1d(affine=False) + Linear on mean-pooled final-norm tokens",
        "finetune-labels": len(sets["finetune"]) if cfg.finetune_labels else 0,
        "finetune-epochs": cfg.finetune_epochs,
        "finetune-lr": cfg.finetune_lr,
        "finetune-layer-decay": cfg.finetune_layer_decay,
        "finetune-head-norm": str(cfg.finetune_head_norm),
        "finetune-augment": cfg.finetune_augment,
        "finetune-subsets": cfg.finetune_subsets if cfg.finetune_labels else 0,
        "finetune-val-fraction": cfg.finetune_val_fraction,
        "finetune-lr-grid": list(cfg.lr_grid),
        "test-images": len(sets["test"]),
    }


def evaluate_backbones(
    cfg: EvalConfig,
    splits: DatasetSplits,
    backbones: dict[str, nn.Module],
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Linear-probe and fine-tuning top-1 (fractions) of each backbone, plus a pixel probe.

    Args:
        cfg: the evaluation section (subset sizes, epochs, learning rates).
        backbones: name -> timm ViT returning ``[N, D]`` features (``num_classes=0``).
        seed: seed of the labelled subsets, probe and fine-tuning.
        device: where features are extracted and heads trained.

    Returns:
        ``{"linear-probe": {name: ProbeResult dict}, "finetune": {name: FinetuneResult dict},
        "protocol": {...}}``.
    """
    sets = labelled_subsets(cfg, splits, seed)
    # Key order of the report: these three, then per-block probes (if any), then protocol.
    report: dict[str, Any] = {"linear-probe": {}, "knn": {}, "finetune": {}}
    candidates: dict[str, nn.Module] = {**backbones, "pixels": _Flatten()}
    _probe_backbones(report, cfg, splits, sets, candidates, seed, device)
    if cfg.finetune_labels > 0:
        report["finetune"] = finetune_backbones(cfg, backbones, sets, splits, seed, device)
    report["protocol"] = _protocol(cfg, sets)
    return report
