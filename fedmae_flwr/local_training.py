"""The client's work, free of Flower: local MAE epochs on the active block, and scoring.

Kept apart from the ClientApp so that other Flower apps (and the server's own evaluation) call the
same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor

from fedmae_flwr.config import TrainConfig
from fedmae_flwr.data.augment import mae_augment
from fedmae_flwr.evaluation.costs import saved_activation_bytes, training_state_bytes
from fedmae_flwr.models.cascade import CascadeMAE


@dataclass(frozen=True)
class LocalTrainResult:
    loss: float  # mean masked-patch loss over the last local epoch
    examples: int
    steps: int
    seconds: float
    peak_bytes: int  # training state + activations saved for backward (first batch)


def train_local(
    model: CascadeMAE, images: Tensor, cfg: TrainConfig, seed: int, proximal_mu: float = 0.0
) -> LocalTrainResult:
    """``cfg.local_epochs`` epochs of masked reconstruction on ``images`` (normalised float).

    Runs on the model's device; ``images`` may stay on the CPU (each batch is moved). Only
    parameters with ``requires_grad`` (the active block, norm, decoder, and the stem in stage
    0) are optimised; the frozen prefix runs under ``torch.no_grad()`` inside the model.
    ``proximal_mu > 0`` adds FedProx's ``mu / 2 * ||w - w_received||^2`` over those parameters
    (the reported loss stays the reconstruction loss).
    """
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    # As MAE: no weight decay on biases and norms (timm's grouping skips frozen parameters).
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    augment = cfg.crop_scale_min < 1.0 or cfg.horizontal_flip
    steps, epoch_loss, activation_bytes = 0, float("nan"), 0
    trained = [p for p in model.parameters() if p.requires_grad]
    received = [p.detach().clone() for p in trained] if proximal_mu > 0 else []
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(images), generator=generator)
        total, count = 0.0, 0
        for batch_ids in order.split(cfg.batch_size):
            batch = images[batch_ids].to(device, non_blocking=True)
            if augment:
                batch = mae_augment(batch, cfg.crop_scale_min, cfg.horizontal_flip, generator)
            if steps == 0:
                (loss, _, _), activation_bytes = saved_activation_bytes(
                    lambda b=batch: model(b, generator=generator)
                )
            else:
                loss, _, _ = model(batch, generator=generator)
            optimizer.zero_grad(set_to_none=True)
            objective = loss
            if received:  # FedProx: stay near the model this round started from
                drift = sum((p - p0).pow(2).sum() for p, p0 in zip(trained, received, strict=True))
                objective = loss + proximal_mu / 2 * drift
            objective.backward()
            optimizer.step()
            total += loss.item() * len(batch)
            count += len(batch)
            steps += 1
        epoch_loss = total / max(count, 1)
    peak = training_state_bytes(model) + activation_bytes
    return LocalTrainResult(epoch_loss, len(images), steps, time.perf_counter() - start, peak)


@torch.no_grad()
def reconstruction_loss(
    model: CascadeMAE, images: Tensor, seed: int, batch_size: int = 256
) -> float:
    """Mean masked-patch loss on ``images`` with seeded masks (comparable across rounds)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for batch in images.split(batch_size):
        loss, _, _ = model(batch.to(device), generator=generator)
        total += loss.item() * len(batch)
    return total / max(len(images), 1)
