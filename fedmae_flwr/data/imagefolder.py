"""A local folder of image files, decoded once into memory at the model's size.

Three layouts, checked in this order:

(a) ``path/train/...`` plus one of ``path/test``, ``path/val``, ``path/validation`` (the first
    that holds images; a second one is logged, not read): those splits as given. Each split is
    itself laid out as (b) or (c), both the same. Without a test folder, the test set is split
    off ``train`` as in (b)/(c).
(b) ``path/<class>/**/*.ext``: labelled, as torchvision's ``ImageFolder`` (files in the order of
    its ``make_dataset``, links followed, but each real folder entered once:
    :mod:`.file_tree`): classes sorted by folder name, sub-folders of a class searched too;
    ``test_fraction`` of each class goes to the test set, seeded.
(c) ``path/*.ext`` (files directly in ``path``, no class folders): unlabelled, labels ``-1`` and
    ``num_classes`` 0; seeded split.

Only files with an extension of ``IMAGE_EXTENSIONS`` (any case) are tried; hidden files and
folders (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints/``) are ignored, and a class folder
without images is no class. A file that fails to decode is skipped and counted in the returned
:class:`DecodeStats`.
"""

from __future__ import annotations

import os
from logging import WARNING
from pathlib import Path

import torch
from flwr.common import log

from fedmae_flwr.data.decode import IMAGE_EXTENSIONS, DecodeStats, decode_train_test
from fedmae_flwr.data.file_tree import walk_files
from fedmae_flwr.data.images import DatasetSplits, channel_stats, train_first_order

__all__ = ["TEST_DIRS", "load_image_folder"]

TEST_DIRS = ("test", "val", "validation")


def _scan(folder: Path) -> tuple[list[Path], list[str] | None]:
    """Files of one split and their class names (``None``: flat folder, unlabelled).

    Loose files next to class folders are ignored, as torchvision does.
    """

    def is_image(path: str) -> bool:
        relative = Path(path).relative_to(folder)
        hidden = any(part.startswith(".") for part in relative.parts)
        return not hidden and relative.suffix.lower() in IMAGE_EXTENSIONS

    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if subdirs:
        # torchvision's make_dataset, entering each real folder once (see .file_tree)
        roots = frozenset(os.path.realpath(folder / name) for name in subdirs)
        inside = (os.path.realpath(folder),)
        files, classes, looped = [], [], 0
        for name in subdirs:
            found, skipped = walk_files(folder / name, is_image, roots, True, inside)
            files += found
            classes += [name] * len(found)
            looped += skipped
        if looped:
            log(WARNING, "%s: %d linked folders skipped: each links back to a folder it is in "
                "(a loop) or to another class's folder, whose images would be listed (again) "
                "under the linking class", folder, looped)  # fmt: skip
        if files:
            return files, classes
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_image(str(p)))
    return files, None


def _scan_layout(folder: Path) -> tuple[list[Path], list[str] | None, int, str]:
    """All files (train first), their class names, how many are training files (0: no test
    split given, one is to be split off), and the layout's name."""
    train_dir = folder / "train"
    if not train_dir.is_dir():
        files, classes = _scan(folder)
        layout = "class sub-folders" if classes is not None else "flat (unlabelled)"
        return files, classes, 0, layout
    train_files, train_classes = _scan(train_dir)
    # The first of test/, val/, validation/ that holds images is the test split
    held = [(folder / d, *_scan(folder / d)) for d in TEST_DIRS if (folder / d).is_dir()]
    held = [entry for entry in held if entry[1]]
    test_dir, test_files, test_classes = held[0] if held else (None, [], None)
    if len(held) > 1:
        log(WARNING, "%s: %s/ is the test split; %s not read (a split of its own: move its "
            "images into train/ or %s/ to use them)", folder, held[0][0].name,
            ", ".join(f"{d.name}/" for d, _, _ in held[1:]), held[0][0].name)  # fmt: skip
    if not test_files:
        return train_files, train_classes, 0, "train/ (test split off it)"
    if (train_classes is None) != (test_classes is None):
        raise ValueError(
            f"'{train_dir}' and '{test_dir}' disagree: one has class sub-folders, the other not. "
            "Use class sub-folders in both, or in neither (unlabelled)."
        )
    classes = None if train_classes is None else train_classes + (test_classes or [])
    return train_files + test_files, classes, len(train_files), f"train/ + {test_dir.name}/"


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
    files, names, num_train, layout = _scan_layout(folder)
    class_names = sorted(set(names or []))
    class_index = {name: i for i, name in enumerate(class_names)}
    description = f"image folder '{folder}' ({layout}, {len(class_names)} classes)"
    extensions = " ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"No image file in {description}. Extensions (any case): {extensions}.")
    labels = torch.tensor([class_index[n] for n in names] if names else [-1] * len(files))
    if not num_train:
        order, num_train = train_first_order(labels, test_fraction, seed)
        files, labels = [files[i] for i in order.tolist()], labels[order]
    named_files = ((str(path), path) for path in files)
    try:
        train, test, stats = decode_train_test(
            named_files, labels, num_train, channels, size, description, num_workers
        )
    except ValueError as e:
        raise ValueError(f"{e} Extensions tried (any case): {extensions}.") from e
    mean, std = channel_stats(train.images)
    splits = DatasetSplits(train, test, mean, std, len(class_names), stats.loaded, stats.skipped)
    return splits, stats
