"""A Hugging Face dataset (hub id or ``save_to_disk`` copy), decoded once into memory.

``name`` is one of:

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: read with
  ``datasets.load_from_disk`` (memory-mapped Arrow, nothing written anywhere), which
  ``FederatedDataset`` does not offer;
* a hub id (``uoft-cs/cifar10``): ``flwr_datasets.FederatedDataset(dataset=name)``, cached in the
  usual HF cache (``HF_HOME`` / ``HF_DATASETS_CACHE``), so a dataset downloaded once loads
  offline later. Splits load unshuffled: the app decodes the whole source once per process and
  partitions the in-memory tensors itself (:mod:`fedmae_flwr.data.partition`).

A local folder of image files is the ``imagefolder`` source's (one loader for image folders).
Offline, a hub id not in the HF cache fails in seconds (:mod:`fedmae_flwr.data.hub`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from flwr.common import log

from fedmae_flwr.data.decode import DecodeStats, decode_train_test
from fedmae_flwr.data.hub import load_hub_dataset
from fedmae_flwr.data.images import DatasetSplits, channel_stats, train_first_order

__all__ = ["IMAGE_COLUMN_NAMES", "LABEL_COLUMN_NAMES", "load_hf_dataset"]

# Conventional names, in order of preference, used when the features do not decide.
IMAGE_COLUMN_NAMES = ("image", "img", "picture")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target")
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _open(name: str, train_split: str) -> tuple[DatasetDict, str]:
    """The dataset's splits and a description of the source, for logs and errors."""
    local = Path(name).expanduser()
    if local.is_dir():
        # save_to_disk writes dataset_dict.json (DatasetDict) or state.json (Dataset).
        if not any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
            raise ValueError(
                f"'{local}' is a folder but not one written by save_to_disk. For a folder of "
                "image files set dataset='imagefolder'; for a hub dataset, use its id or a "
                "save_to_disk copy of it."
            )
        data = datasets.load_from_disk(str(local))
        if isinstance(data, Dataset):  # a single saved Dataset is the train split
            data = DatasetDict({train_split: data})
        return data, f"save_to_disk folder '{local}'"
    if local.exists() or not _REPO_ID.match(name) or name.startswith((".", "~")):
        raise FileNotFoundError(
            f"'{name}' is neither a folder written by save_to_disk nor a hub id (org/name)"
        )
    return load_hub_dataset(name, train_split), f"hub dataset '{name}'"


def _pick_column(
    ds: Dataset, requested: str, kind: type, names: tuple[str, ...], key: str, required: bool
) -> str | None:
    """The column holding images (``kind`` ``Image``) or labels (``ClassLabel``).

    ``requested`` if given; else the single column of ``kind``; else the first conventional name
    (``names``) among the columns. Several ``kind`` columns are ambiguous, except for labels,
    where a conventional name among them decides (CIFAR-100's ``fine_label`` over
    ``coarse_label``): a wrong label column only skews partitions, a wrong image column would
    train on the wrong pixels. ``None`` when not ``required`` and none fits.
    """
    what = "image" if required else "label"
    columns = list(ds.column_names)
    listing = ", ".join(f"{c} ({type(ds.features[c]).__name__})" for c in columns)
    if requested:
        if requested not in columns:
            raise ValueError(
                f"Config key '{key}' = '{requested}' is not a column. Columns: {listing}."
            )
        return requested
    typed = [c for c in columns if isinstance(ds.features[c], kind)]
    if len(typed) == 1:
        return typed[0]
    named = [n for n in names if n in (typed or columns)]
    if len(typed) > 1 and (required or not named):
        raise ValueError(
            f"Ambiguous {what} column: {', '.join(typed)} are all {kind.__name__} features. "
            f"Set config key '{key}' to one of them. Columns: {listing}."
        )
    if named:
        return named[0]
    if required:
        raise ValueError(
            f"No {what} column found (no {kind.__name__} feature, none named "
            f"{'/'.join(names)}). Set config key '{key}'. Columns: {listing}."
        )
    return None


def _encode_labels(splits: list[Dataset], column: str | None) -> tuple[list[torch.Tensor], int]:
    """Integer labels of each split (``-1`` where it has no label column), and the class count.

    ``ClassLabel``: its ids and ``num_classes``; strings: indices into their sorted set over all
    splits; integers as they are (``max + 1`` classes; negative ids are unlabelled images, and
    ids sparser than half of that range are renumbered 0..n-1). ``column`` is one of
    ``splits[0]``'s.
    """
    if column is None:
        return [torch.full((len(ds),), -1, dtype=torch.long) for ds in splits], 0
    # A numpy-formatted slice reads the column in one Arrow batch, not row by row.
    values = [
        np.asarray(ds.with_format("numpy")[column][:]) if column in ds.column_names else None
        for ds in splits
    ]
    known = [v for v in values if v is not None]
    feature = splits[0].features[column]
    if isinstance(feature, ClassLabel):
        num_classes = feature.num_classes
    elif getattr(feature, "dtype", "") in ("string", "large_string"):
        names, codes = np.unique(np.concatenate(known).astype(str), return_inverse=True)
        per_split = iter(np.split(codes, np.cumsum([len(v) for v in known])[:-1]))
        values = [None if v is None else next(per_split) for v in values]
        num_classes = len(names)
    else:
        values = [None if v is None else _class_ids(v, column, feature) for v in values]
        ids = np.unique(np.concatenate([v[v >= 0] for v in values if v is not None] or [[]]))
        num_classes = int(ids[-1]) + 1 if len(ids) else 0
        if num_classes > 2 * len(ids):  # sparse ids ({0, 5, 1000}): a head of 1001 classes
            log(INFO, "Label column '%s': %d distinct ids up to %d, renumbered 0..%d",
                column, len(ids), num_classes - 1, len(ids) - 1)  # fmt: skip
            values = [None if v is None else np.where(v < 0, -1, np.searchsorted(ids, v))
                      for v in values]  # fmt: skip
            num_classes = len(ids)
    labels = [
        torch.as_tensor(np.full(len(ds), -1) if v is None else v, dtype=torch.long)
        for ds, v in zip(splits, values, strict=True)
    ]
    return labels, num_classes


def _class_ids(values: np.ndarray, column: str, feature: Any) -> np.ndarray:
    """Integer class ids of a numeric label column: whole-number floats (1.0) and booleans as
    ids, negative ids and NaN as -1 (hidden, as in many hub test splits: images without a
    label); ValueError, naming the column's type, for fractional or infinite values."""
    if values.dtype == bool:
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.integer):
        return np.where(values < 0, -1, values).astype(np.int64)
    numbers = values.astype(np.float64)
    known = numbers[~np.isnan(numbers)]
    if not (np.isfinite(known).all() and (known == np.round(known)).all()):
        raise ValueError(
            f"Label column '{column}' ({getattr(feature, 'dtype', feature)}) holds values that "
            "are no class ids (fractions or inf): labels must be whole numbers, strings or a "
            "ClassLabel. Set config key 'label-column' to a column of class ids"
        )
    return np.where(np.isnan(numbers) | (numbers < 0), -1, numbers).astype(np.int64)


def _image_rows(ds: Dataset, column: str, split: str, rows: list[int]) -> Iterator[tuple[str, Any]]:
    """``(name, encoded image)`` per row, read in batches (never the whole column at once).

    ``rows`` are the original row numbers, used in the names of skipped images. The ``Image``
    feature is cast to ``decode=False`` so that a corrupt row is a counted skip in our decoder
    rather than an exception out of the Arrow reader.
    """
    if isinstance(ds.features[column], datasets.Image):
        ds = ds.cast_column(column, datasets.Image(decode=False))
    position = 0
    for batch in ds.select_columns([column]).iter(batch_size=256):
        for value in batch[column]:
            path = value.get("path") if isinstance(value, dict) else None
            yield (f"{split}[{rows[position]}]" + (f" ({path})" if path else "")), value
            position += 1


def _rows_and_labels(
    data: DatasetDict,
    splits: tuple[str, str],
    image_col: str,
    label_col: str | None,
    test_fraction: float,
    seed: int,
) -> tuple[Iterator[tuple[str, Any]], torch.Tensor, int, int]:
    """Image rows to decode (train first), their labels, the number of train rows and classes.

    Without the test split, ``test_fraction`` of the train split (per label, seeded) is the test
    set, chosen before decoding so that it does not depend on which rows fail.
    """
    train_split, test_split = splits
    train_ds, test_ds = data[train_split], data.get(test_split) if test_split else None
    if test_ds is None:
        (train_labels,), num_classes = _encode_labels([train_ds], label_col)
        order, num_train = train_first_order(train_labels, test_fraction, seed)
        rows = order.tolist()
        image_rows = _image_rows(train_ds.select(rows), image_col, train_split, rows)
        return image_rows, train_labels[order], num_train, num_classes
    if image_col not in test_ds.column_names:
        raise ValueError(f"Split '{test_split}' lacks the image column '{image_col}'")
    labels, num_classes = _encode_labels([train_ds, test_ds], label_col)
    if num_classes and not (labels[1] >= 0).any():
        # Hub test splits often hide their labels (-1 or no column): scoring on them fails, so
        # the test set comes from train instead, as for a dataset without a test split.
        log(WARNING, "Split '%s' has no label in column '%s': its images are not used; "
            "test-fraction=%s of '%s' is the test set", test_split, label_col, test_fraction,
            train_split)  # fmt: skip
        return _rows_and_labels(data, (train_split, ""), image_col, label_col, test_fraction, seed)
    image_rows = itertools.chain(
        _image_rows(train_ds, image_col, train_split, list(range(len(train_ds)))),
        _image_rows(test_ds, image_col, test_split, list(range(len(test_ds)))),
    )
    return image_rows, torch.cat(labels), len(train_ds), num_classes


def _columns(
    data: DatasetDict, source: str, train_split: str, image_column: str, label_column: str
) -> tuple[str, str | None]:
    """The image and label columns of ``train_split`` (see :func:`_pick_column`).

    Raises ``ValueError`` when the dataset has no ``train_split``.
    """
    if train_split not in data:
        raise ValueError(f"{source} has no split '{train_split}'. Splits: {', '.join(data)}.")
    columns = data[train_split]
    image_col = _pick_column(
        columns, image_column, datasets.Image, IMAGE_COLUMN_NAMES, "image-column", required=True
    )
    label_col = _pick_column(
        columns, label_column, ClassLabel, LABEL_COLUMN_NAMES, "label-column", required=False
    )
    assert image_col is not None
    if label_col is None and (others := [c for c in columns.column_names if c != image_col]):
        # A label column under another name (species, class_name) would otherwise leave the
        # run without downstream scores, and say so only in the summary.
        log(WARNING, "%s: no label column found (no ClassLabel feature, none named %s): its "
            "images are unlabelled, pretrained on but not scored downstream. If one of %s holds "
            "the labels, set config key 'label-column'", source, "/".join(LABEL_COLUMN_NAMES),
            ", ".join(others))  # fmt: skip
    return image_col, label_col


def _decode_splits(
    rows: Iterator[tuple[str, Any]],
    labels: torch.Tensor,
    num_train: int,
    num_classes: int,
    description: str,
    channels: int,
    size: int,
    num_workers: int,
) -> tuple[DatasetSplits, DecodeStats]:
    """Decode ``rows`` (the first ``num_train`` are train); the splits carry train mean/std."""
    train, test, stats = decode_train_test(
        rows, labels, num_train, channels, size, description, num_workers
    )
    mean, std = channel_stats(train.images)
    splits = DatasetSplits(train, test, mean, std, num_classes, stats.loaded, stats.skipped)
    return splits, stats


def load_hf_dataset(
    name: str,
    channels: int,
    size: int,
    image_column: str = "",
    label_column: str = "",
    train_split: str = "train",
    test_split: str = "test",
    seed: int = 0,
    test_fraction: float = 0.1,
    num_workers: int = 0,
) -> tuple[DatasetSplits, DecodeStats]:
    """Decode a Hugging Face image dataset into train/test ``ImageSet`` s, uint8 ``[N, C, s, s]``.

    Args:
        name: Hub id or ``save_to_disk`` folder (see the module docstring).
        channels: 1 (luminance) or 3 (RGB).
        size: Output side; shorter side resized to it, centre crop.
        image_column: Column of the images; "" = detect (the single ``Image`` feature, else a
            column named image/img/picture).
        label_column: Column of the labels; "" = detect (the single ``ClassLabel``, else
            label/labels/fine_label/target; none = unlabelled: labels -1, ``num_classes`` 0).
        train_split: Split to pretrain on.
        test_split: Held-out split; when the dataset lacks it, ``test_fraction`` of
            ``train_split`` (per label, seeded with ``seed``) is used instead.
        seed: Seed of that split.
        test_fraction: Share split off when there is no ``test_split``.
        num_workers: Decoding threads; 0 = one per available CPU (at most 16).

    Returns:
        The splits (``mean``/``std`` of the train images) and what was decoded and skipped.

    Raises:
        RuntimeError: A hub id that cannot be loaded (hub unreachable and not cached, unknown).
        FileNotFoundError: ``name`` looks like a path but does not exist.
        ValueError: A folder not written by save_to_disk, a missing split, ambiguous/missing
            columns, nothing decodable.
    """
    data, source = _open(name, train_split)
    image_col, label_col = _columns(data, source, train_split, image_column, label_column)
    rows, labels, num_train, num_classes = _rows_and_labels(
        data, (train_split, test_split), image_col, label_col, test_fraction, seed
    )
    label = f"'{label_col}'" if label_col else "none"
    description = f"{source} (image '{image_col}', label {label}, {num_classes} classes)"
    return _decode_splits(
        rows, labels, num_train, num_classes, description, channels, size, num_workers
    )
