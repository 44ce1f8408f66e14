"""Frozen-feature extraction for the linear probe and kNN evaluations."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _module_device(module: nn.Module) -> torch.device | None:
    """The device of the module's first parameter or buffer; None for a stateless module."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return None


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Tensor,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> Tensor:
    """Embed ``images`` with a frozen ``backbone``, batch by batch.

    Args:
        backbone: maps ``[B, C, H, W]`` float to ``[B, D]`` (e.g. a timm model created with
            ``num_classes=0``, which returns the pooled pre-logits features).
        images: ``[N, C, H, W]`` float, already normalized; may stay on the CPU, each batch is
            moved to ``device`` on its own so the dataset never has to fit on the accelerator.
        batch_size: images per forward pass.
        device: where the forward passes run.

    Returns:
        ``[N, D]`` float32 on the CPU.

    The backbone runs in eval mode (dropout / drop-path off, BatchNorm on running statistics).
    Its previous train/eval mode and device are restored afterwards, so the call has no visible
    side effect on the module.
    """
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W], got {tuple(images.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    device = torch.device(device)
    was_training = backbone.training
    original_device = _module_device(backbone)
    backbone.eval().to(device)
    try:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start : start + batch_size].to(device=device, dtype=torch.float32)
            feats = backbone(batch)
            if feats.ndim != 2 or feats.shape[0] != batch.shape[0]:
                raise ValueError(
                    f"backbone must return [B, D] features, got {tuple(feats.shape)} for a batch "
                    f"of {batch.shape[0]} (token features [B, T, D] need pooling first)"
                )
            chunks.append(feats.float().cpu())
        return torch.cat(chunks)
    finally:
        backbone.train(was_training)
        if original_device is not None:
            backbone.to(original_device)
