"""Labelled image sets held in memory as uint8 tensors, their train/test split and normalisation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from logging import INFO

import torch
from flwr.common import log
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
        return normalize(images, self.mean, self.std)

    def labelled(self) -> DatasetSplits:
        """These splits without the images whose label is unknown (-1): a labelled source may
        hold some unlabelled images, which pretraining uses and the downstream scores cannot."""
        keep = {name: (getattr(self, name).labels >= 0).nonzero().flatten()
                for name in ("train", "test")}  # fmt: skip
        if all(len(keep[n]) == len(getattr(self, n)) for n in keep):
            return self
        log(INFO, "Downstream: scoring the labelled images only (train %d of %d, test %d of %d)",
            len(keep["train"]), len(self.train), len(keep["test"]), len(self.test))  # fmt: skip
        return dataclasses.replace(
            self, train=self.train.subset(keep["train"]), test=self.test.subset(keep["test"])
        )

    def denormalize(self, x: Tensor) -> Tensor:
        """Model-space float ``[N, C, H, W]`` -> pixel values in [0, 1] (clamped)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x * std + mean).clamp(0.0, 1.0)


@dataclass(frozen=True)
class NodeData:
    """One node's images: ``train`` for local MAE steps, ``heldout`` for federated evaluation.

    Self-contained (the source's normalisation and skip count, not the source itself), so a node
    can keep it on disk and read it back without the source (:mod:`fedmae_flwr.data.node_cache`).
    """

    train: ImageSet
    heldout: ImageSet
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int  # the source's; 0 when unlabelled
    skipped: int = 0  # unreadable images skipped when the source was decoded

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 ``[N, C, H, W]`` -> float32 normalised model input (the source's statistics)."""
        return normalize(images, self.mean, self.std)


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.tensor(mean).view(1, -1, 1, 1)
    std_t = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t


def channel_stats(images: Tensor, chunk: int = 256) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` in [0, 1] units.

    Exact and memory-safe: a 256-bin histogram per channel is accumulated over chunks of
    ``chunk`` images (no float copy of the set; ~4x faster than float sums on CPU), and the
    moments come from the histogram. A constant channel gets std 1.0 (not 0), so normalising
    never divides by zero.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"need a non-empty uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}"
        )
    channels = images.shape[1]
    hist = torch.zeros(channels, 256, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk]
        for c in range(channels):
            hist[c] += torch.bincount(part[:, c].reshape(-1), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    count = hist.sum(dim=1)
    mean = (hist * values).sum(dim=1) / count
    std = ((hist * values.square()).sum(dim=1) / count - mean.square()).clamp_min(0.0).sqrt()
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def split_train_test(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Seeded, per-label (stratified) split of indices: ``round(n * test_fraction)`` of each label.

    Unlabelled sets (all ``-1``) form one group. The same ``labels``, fraction and seed always
    give the same split.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        num_test = round(len(members) * test_fraction)
        test.append(members[:num_test])
        train.append(members[num_test:])
    train_idx = torch.cat(train).sort().values if train else torch.empty(0, dtype=torch.long)
    test_idx = torch.cat(test).sort().values if test else torch.empty(0, dtype=torch.long)
    return train_idx, test_idx


def train_first_order(labels: Tensor, test_fraction: float, seed: int) -> tuple[Tensor, int]:
    """Row order that puts a :func:`split_train_test` test split last, and the number of train rows.

    Sources split rows before decoding, so the split does not depend on which rows fail, and
    decode train rows first, so train and test are views of one buffer.
    """
    train_idx, test_idx = split_train_test(labels, test_fraction, seed)
    return torch.cat([train_idx, test_idx]), len(train_idx)
