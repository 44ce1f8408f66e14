"""Downstream accuracy of backbones under one protocol: linear probe and few-label fine-tuning.

Every backbone gets the same labelled subsets, epochs, learning rates and augmentation, so the
numbers compare. Raw pixels get the probe too, as a floor a backbone should clear.
"""

from __future__ import annotations

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
from fedmae_flwr.evaluation.linear_probe import knn_accuracy, linear_probe


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


def finetune_backbones(
    cfg: EvalConfig,
    backbones: dict[str, nn.Module],
    sets: dict[str, ImageSet],
    splits: DatasetSplits,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """Fine-tune each backbone on the labelled ``finetune`` subset; top-1 on ``test``."""
    tune_x = splits.normalize(sets["finetune"].images)
    test_x = splits.normalize(sets["test"].images)
    results = {}
    for name, backbone in backbones.items():
        start = time.perf_counter()
        result = finetune(
            backbone, backbone.num_features, tune_x, sets["finetune"].labels, test_x,
            sets["test"].labels, splits.num_classes, epochs=cfg.finetune_epochs,
            lr=cfg.finetune_lr, seed=seed, device=device, layer_decay=cfg.finetune_layer_decay,
        )  # fmt: skip
        results[name] = asdict(result)
        log(INFO, "fine-tune %s: %.4f (%.1fs)", name, result.accuracy, time.perf_counter() - start)
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
        return linear_probe(
            train_x.to(device), probe_y, test_x.to(device), test_y, splits.num_classes,
            cfg.probe_epochs, seed=seed,
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
        "probe-head": "BatchNorm1d(affine=False) + Linear on mean-pooled final-norm tokens",
        "finetune-labels": len(sets["finetune"]) if cfg.finetune_labels else 0,
        "finetune-epochs": cfg.finetune_epochs,
        "finetune-lr": cfg.finetune_lr,
        "finetune-layer-decay": cfg.finetune_layer_decay,
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
