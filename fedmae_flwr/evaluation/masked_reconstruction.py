"""Score a cascade's masked reconstructions in pixels, beside the trivial mean-fill predictor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedmae_flwr.data.images import DatasetSplits
from fedmae_flwr.evaluation.reconstruction import masked_psnr, mean_fill_baseline
from fedmae_flwr.models.cascade import CascadeMAE
from fedmae_flwr.models.mae import unpatchify


@dataclass(frozen=True)
class ReconstructionReport:
    """PSNR (dB) over masked pixels, the trivial predictor's, and the pictures ``[N, C, H, W]``."""

    psnr: float
    trivial_psnr: float
    loss: float
    originals: Tensor
    masked: Tensor
    reconstructions: Tensor


@torch.no_grad()
def evaluate_reconstruction(
    model: CascadeMAE, images: Tensor, splits: DatasetSplits, seed: int, batch_size: int = 256
) -> ReconstructionReport:
    """Mask ``images`` (uint8) with seeded masks, reconstruct, and compare in [0, 1] pixels.

    The reconstruction pastes the visible pixels back (as MAE's figures do); PSNR counts only the
    masked pixels, so the visible ones neither help nor hurt. The trivial predictor fills each
    masked pixel with the mean of the image's visible pixels.
    """
    model.eval()
    p, c = model.cfg.patch_size, model.cfg.in_chans
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    originals, recons, masks, losses = [], [], [], []
    for batch in images.split(batch_size):
        x = splits.normalize(batch)
        loss, pred, mask = model(x.to(device), generator=generator)
        pred, mask = pred.cpu(), mask.cpu()
        pred_pixels = splits.denormalize(unpatchify(model.predicted_pixels(x, pred), p, c))
        pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p), p, 1)
        original = batch.float() / 255.0
        recons.append(torch.where(pixel_mask.bool(), pred_pixels, original))
        originals.append(original)
        masks.append(pixel_mask)
        losses.append(loss.item() * len(batch))
    original, recon, pixel_mask = torch.cat(originals), torch.cat(recons), torch.cat(masks)
    return ReconstructionReport(
        psnr=masked_psnr(recon, original, pixel_mask),
        trivial_psnr=masked_psnr(mean_fill_baseline(original, pixel_mask), original, pixel_mask),
        loss=sum(losses) / len(images),
        originals=original,
        masked=original * (1 - pixel_mask) + 0.5 * pixel_mask,  # masked patches grey, as MAE
        reconstructions=recon,
    )
