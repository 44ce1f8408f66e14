"""Reconstruction quality of a masked auto-encoder, in pixel space.

MAE's loss is computed on the masked patches only, so reconstruction quality is reported on the
masked pixels only as well: the visible pixels are copied from the input by construction and
would inflate any whole-image metric. :func:`mean_fill_baseline` is the trivial predictor that
any useful reconstruction has to beat.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedmae_flwr.atomic import atomic_write

if TYPE_CHECKING:  # matplotlib is imported only when a grid is drawn
    from matplotlib.figure import Figure


def _check_pixel_mask(images: Tensor, pixel_mask: Tensor) -> Tensor:
    """Validate ``pixel_mask`` ``[N, 1, H, W]`` against ``images`` ``[N, C, H, W]``.

    Returns the mask as a bool tensor ``[N, 1, H, W]`` on ``images.device``.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n, _, h, w = images.shape
    if pixel_mask.ndim != 4 or tuple(pixel_mask.shape) != (n, 1, h, w):
        raise ValueError(
            f"pixel_mask must be [N, 1, H, W] = {(n, 1, h, w)} to match images "
            f"{tuple(images.shape)}, got {tuple(pixel_mask.shape)}"
        )
    return pixel_mask.to(device=images.device).bool()


def masked_psnr(pred: Tensor, target: Tensor, pixel_mask: Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB over the masked pixels of a whole batch.

    Args:
        pred: reconstruction ``[N, C, H, W]`` in pixel space.
        target: ground truth ``[N, C, H, W]`` in pixel space.
        pixel_mask: ``[N, 1, H, W]``, bool or 0/1; 1 marks a masked pixel. Broadcast over C.
        data_range: the span of valid pixel values (1.0 for images in [0, 1]).

    Returns:
        ``10 * log10(data_range**2 / MSE)`` where MSE is the mean squared error over every masked
        pixel value of the batch (all images and channels pooled, so images with more masked
        pixels weigh more); ``math.inf`` when MSE is 0.

    Raises:
        ValueError: ``pred`` and ``target`` shapes differ, the mask shape does not match, or no
            pixel is masked.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}"
        )
    mask = _check_pixel_mask(target, pixel_mask)
    num_masked = int(mask.sum())
    if num_masked == 0:
        raise ValueError("pixel_mask selects no pixel: PSNR over masked pixels is undefined")
    # float64: a PSNR of 40+ dB means an MSE around 1e-4, where float32 sums over a large batch
    # lose digits.
    sq_err = (pred.detach().double() - target.detach().double().to(pred.device)) ** 2
    mse = float((sq_err * mask).sum()) / (num_masked * target.shape[1])
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse)


def mean_fill_baseline(images: Tensor, pixel_mask: Tensor) -> Tensor:
    """Replace every masked pixel by the mean of its image's visible pixels, per channel.

    Args:
        images: ``[N, C, H, W]``.
        pixel_mask: ``[N, 1, H, W]``, bool or 0/1; 1 marks a masked pixel.

    Returns:
        ``[N, C, H, W]`` in the dtype of ``images``: visible pixels unchanged, masked pixels of
        image ``n`` and channel ``c`` set to the mean of the visible pixels of ``images[n, c]``.

    Raises:
        ValueError: the mask shape does not match, or an image has no visible pixel (its mean is
            undefined, and a silent fill value would make the baseline look arbitrary).
    """
    mask = _check_pixel_mask(images, pixel_mask)
    visible = (~mask).to(images.dtype)  # [N, 1, H, W]
    num_visible = visible.sum(dim=(2, 3))  # [N, 1]
    if bool((num_visible == 0).any()):
        raise ValueError("mean_fill_baseline: an image has no visible pixel (fully masked)")
    means = (images * visible).sum(dim=(2, 3)) / num_visible  # [N, C]
    return torch.where(mask, means[:, :, None, None].expand_as(images), images)


def _to_numpy_image(image: Tensor):
    """``[C, H, W]`` in [0, 1] with C in {1, 3} -> numpy ``[H, W]`` or ``[H, W, 3]``."""
    image = image.detach().float().cpu().clamp(0.0, 1.0)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image.permute(1, 2, 0).numpy()


def _check_grid_shapes(originals: Tensor, masked: Tensor, reconstructions: Tensor) -> None:
    """Raise ``ValueError`` unless all three are the same ``[N, C, H, W]``, N >= 1, C in {1, 3}."""
    if not (originals.shape == masked.shape == reconstructions.shape):
        raise ValueError(
            "originals, masked and reconstructions must have the same shape, got "
            f"{tuple(originals.shape)}, {tuple(masked.shape)}, {tuple(reconstructions.shape)}"
        )
    if originals.ndim != 4 or originals.shape[0] == 0 or originals.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be [N, C, H, W] with N >= 1 and C in {{1, 3}}, "
            f"got {tuple(originals.shape)}"
        )


def _draw_grid(
    fig: Figure, columns: tuple[tuple[str, Tensor], ...], n: int, title: str | None
) -> None:
    """Fill ``fig`` with ``n`` rows of one panel per ``(header, images)`` column."""
    axes = fig.subplots(n, len(columns), squeeze=False)
    for row in range(n):
        for col, (header, images) in enumerate(columns):
            ax = axes[row][col]
            # vmin/vmax pin the gray colormap to [0, 1]; otherwise each panel is rescaled to its
            # own min/max and a flat reconstruction would look like full-contrast noise.
            ax.imshow(_to_numpy_image(images[row]), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(header, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()


def save_reconstruction_grid(
    path: str | Path,
    originals: Tensor,
    masked: Tensor,
    reconstructions: Tensor,
    title: str | None = None,
) -> None:
    """Write a PNG grid: one row per image, columns original / masked input / reconstruction.

    Args:
        path: output file; parent directories are created.
        originals: ``[N, C, H, W]`` in [0, 1] (values outside are clipped), C in {1, 3}.
        masked: ``[N, C, H, W]``, the encoder's view (masked patches blanked by the caller).
        reconstructions: ``[N, C, H, W]``, the decoder's output in pixel space.
        title: optional figure title.

    Rendering goes through matplotlib's Agg canvas on a standalone ``Figure``: this works
    headless and neither touches pyplot's global backend (which would break a caller's
    interactive session) nor leaks a figure into pyplot's registry, so nothing needs closing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_grid_shapes(originals, masked, reconstructions)
    n = originals.shape[0]
    columns = (
        ("original", originals),
        ("masked input", masked),
        ("reconstruction", reconstructions),
    )
    fig = Figure(figsize=(3 * 1.6, n * 1.6 + (0.4 if title else 0.0)), dpi=100)
    FigureCanvasAgg(fig)
    _draw_grid(fig, columns, n, title)

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
