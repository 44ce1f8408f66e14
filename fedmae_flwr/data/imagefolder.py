"""A local folder of image files, decoded once into memory at the model's size.

Three layouts, checked in this order:

(a) ``path/train/...`` plus one of ``path/test``, ``path/val``, ``path/validation`` (first that
    exists): those splits as given. Each split is itself laid out as (b) or (c), both the same.
    Without a test folder, the test set is split off ``train`` as in (b)/(c).
(b) ``path/<class>/**/*.ext``: labelled, classes sorted by folder name (torchvision
    ``ImageFolder``'s convention; sub-folders of a class are searched too); ``test_fraction`` of
    each class goes to the test set, seeded.
(c) ``path/*.ext`` (files directly in ``path``, no class folders): unlabelled, labels ``-1`` and
    ``num_classes`` 0; seeded split.

Only files with an extension of ``IMAGE_EXTENSIONS`` (any case) are tried; other and hidden files
(``.DS_Store``, ``._x.jpg``) are ignored. A file that fails to decode is skipped and counted in
the returned :class:`DecodeStats`.
"""

from __future__ import annotations

import os
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.common import log

from fedmae_flwr.data.decode import (
    IMAGE_EXTENSIONS,
    DecodeStats,
    channel_stats,
    decode_many,
    split_train_test,
)
from fedmae_flwr.data.images import DatasetSplits, ImageSet

__all__ = ["TEST_DIRS", "load_image_folder"]

TEST_DIRS = ("test", "val", "validation")


def _is_image_file(path: Path) -> bool:
    return (
        not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()
    )


def _images_below(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden folders pruned), in sorted order."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(p for p in (Path(root) / f for f in sorted(files)) if _is_image_file(p))
    return found


def _scan(folder: Path) -> tuple[list[Path], list[str] | None]:
    """Files of one split and their class names (``None``: flat folder, unlabelled).

    A sub-folder counts as a class when it holds at least one image file, so an empty or
    non-image folder (``__MACOSX``-like clutter aside, which is hidden-pruned) does not shift
    class indices. Loose files next to class folders are ignored, as torchvision does.
    """
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[Path] = []
    classes: list[str] = []
    for sub in subdirs:
        below = _images_below(sub)
        files.extend(below)
        classes.extend([sub.name] * len(below))
    if files:
        return files, classes
    return sorted(p for p in folder.iterdir() if _is_image_file(p)), None


def load_image_folder(
    path: str | Path,
    channels: int,
    size: int,
    test_fraction: float = 0.1,
    seed: int = 0,
    num_workers: int = 0,
) -> tuple[DatasetSplits, DecodeStats]:
    """Decode a local image folder into train/test ``ImageSet`` s of uint8 ``[N, C, size, size]``.

    Args:
        path: The folder (layouts in the module docstring).
        channels: 1 (luminance) or 3 (RGB).
        size: Output side; shorter side resized to it, centre crop.
        test_fraction: Share of each class (or of all images, unlabelled) kept for the test set
            when the folder has no test split of its own.
        seed: Seed of that split.
        num_workers: Decoding threads; 0 = one per available CPU (at most 16).

    Returns:
        The splits (``mean``/``std`` of the train images) and what was decoded and skipped.

    Raises:
        FileNotFoundError: ``path`` is not a folder.
        ValueError: No file decoded (or the train split is empty), or train and test disagree on
            being labelled.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder not found: '{folder}' is not a directory")

    train_dir = folder / "train"
    test_dir = next((folder / d for d in TEST_DIRS if (folder / d).is_dir()), None)
    if train_dir.is_dir():
        train_files, train_classes = _scan(train_dir)
        test_files, test_classes = _scan(test_dir) if test_dir else ([], None)
        if test_dir and test_files and (train_classes is None) != (test_classes is None):
            raise ValueError(
                f"'{train_dir}' and '{test_dir}' disagree: one has class sub-folders, the other "
                "not. Use class sub-folders in both, or in neither (unlabelled)."
            )
        layout = f"train/ + {test_dir.name}/" if test_dir else "train/ (test split off it)"
    else:
        train_files, train_classes = _scan(folder)
        test_files, test_classes = [], None
        layout = "class sub-folders" if train_classes is not None else "flat (unlabelled)"

    labelled = train_classes is not None
    class_names = sorted(set(train_classes or []) | set(test_classes or []))
    class_index = {name: i for i, name in enumerate(class_names)}
    files = train_files + test_files
    names = (train_classes or []) + (test_classes or [])
    labels = torch.tensor(
        [class_index[n] for n in names] if labelled else [-1] * len(files), dtype=torch.long
    )
    if test_files:
        num_train = len(train_files)
    else:
        # Split by file before decoding, so the split does not depend on which files fail, and
        # order train before test so both sets are views of one buffer (no copy of all images).
        train_idx, test_idx = split_train_test(labels, test_fraction, seed)
        order = torch.cat([train_idx, test_idx])
        files, labels = [files[i] for i in order.tolist()], labels[order]
        num_train = len(train_idx)

    stats = DecodeStats()
    start = time.perf_counter()
    images, kept = decode_many(
        ((str(p), p) for p in files), len(files), channels, size, stats, num_workers
    )
    seconds = time.perf_counter() - start
    if not kept:
        extensions = " ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        first = "; ".join(stats.skipped_files[:3])
        raise ValueError(
            f"No decodable image in '{folder}': tried {len(files)} files, skipped "
            f"{stats.skipped}{f' (first: {first})' if first else ''}. Allowed extensions "
            f"(any case): {extensions}."
        )
    log(
        INFO,
        "Image folder '%s' (%s): %s in %.1f s (%.0f images/s), %d classes",
        folder, layout, stats.summary(), seconds, len(files) / max(seconds, 1e-9),
        len(class_names),
    )  # fmt: skip

    labels = labels[torch.tensor(kept, dtype=torch.long)]
    num_train_kept = sum(1 for i in kept if i < num_train)
    if num_train_kept == 0:
        raise ValueError(f"No decodable training image in '{folder}' ({stats.summary()})")
    train = ImageSet(images[:num_train_kept], labels[:num_train_kept])
    test = ImageSet(images[num_train_kept:], labels[num_train_kept:])
    mean, std = channel_stats(train.images)
    return DatasetSplits(train, test, mean, std, num_classes=len(class_names)), stats
