"""MAE's pretraining augmentations on batches of tensors: random resized crop and horizontal flip.

Applied to the already-normalised float batch inside the local training loop, so images stay in
memory once as uint8 at the model's size and every epoch sees new crops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_resized_crop(
    x: Tensor,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per image: a crop of ``scale`` of the area and aspect ``ratio``, resized back to ``H x W``.

    As torchvision's ``RandomResizedCrop`` (10 tries, then the whole image), bicubic resize.

    Hand-written because torchvision's ``RandomResizedCrop.get_params`` (and v2's
    ``make_params``) takes no generator: it draws with ``torch.empty(1).uniform_`` and
    ``torch.randint`` from torch's global RNG. Here every draw comes from ``generator``, which
    each node seeds itself, so a node's crops are reproducible and do not depend on other nodes
    or on anything else in the process that uses the global RNG.

    Args:
        x: ``[N, C, H, W]`` float.
    """
    n, _, h, w = x.shape
    out = torch.empty_like(x)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for i in range(n):
        top, left, ch, cw = 0, 0, h, w
        for _ in range(10):
            area = h * w * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio, generator=generator).item())
            cw_try = round(math.sqrt(area * aspect))
            ch_try = round(math.sqrt(area / aspect))
            if 0 < cw_try <= w and 0 < ch_try <= h:
                top = int(torch.randint(0, h - ch_try + 1, (1,), generator=generator))
                left = int(torch.randint(0, w - cw_try + 1, (1,), generator=generator))
                ch, cw = ch_try, cw_try
                break
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out[i] = F.interpolate(crop, size=(h, w), mode="bicubic", align_corners=False)[0]
    return out


def random_horizontal_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image of ``[N, C, H, W]`` left-right with probability 0.5."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def mae_augment(
    x: Tensor, crop_scale_min: float, flip: bool, generator: torch.Generator | None = None
) -> Tensor:
    """MAE's pretraining pipeline: ``RandomResizedCrop(scale=(crop_scale_min, 1))`` then flip.

    ``crop_scale_min >= 1`` disables the crop.
    """
    if crop_scale_min < 1.0:
        x = random_resized_crop(x, (crop_scale_min, 1.0), generator=generator)
    if flip:
        x = random_horizontal_flip(x, generator)
    return x
