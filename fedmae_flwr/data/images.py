"""Labelled image sets held in memory as uint8 tensors, and their normalisation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ImageSet:
    """Images ``[N, C, H, W]`` uint8, labels ``[N]`` int64 (clients never train on labels)."""

    images: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")  # fmt: skip
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Tensor | list[int]) -> ImageSet:
        index = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[index], self.labels[index])


@dataclass(frozen=True)
class DatasetSplits:
    """A source's training and test sets plus the per-channel statistics used to normalise."""

    train: ImageSet
    test: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int  # 0 when unlabelled (labels are -1)
    loaded: int = 0  # images decoded from the source
    skipped: int = 0  # unreadable images skipped (and logged)

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` -> float32 normalised model input."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model-space float ``[N, C, H, W]`` -> pixel values in [0, 1] (clamped)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)
