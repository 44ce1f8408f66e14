"""A Hugging Face dataset (hub id or local copy), decoded once into memory at the model's size.

``name`` is one of:

* a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``: read with
  ``datasets.load_from_disk`` (memory-mapped Arrow, nothing written anywhere);
* any other local folder (of images): ``flwr_datasets.FederatedDataset(dataset=folder)``, which
  builds it with ``datasets``' image-folder builder; its Arrow cache goes to a temporary folder
  deleted after decoding;
* a hub id (``uoft-cs/cifar10``): ``flwr_datasets.FederatedDataset(dataset=name)``, cached in the
  usual HF cache (``HF_HOME`` / ``HF_DATASETS_CACHE``), so a dataset downloaded once loads
  offline later.

The last two are the same call, so the offline tests of a local folder exercise the code path a
hub name takes. All three give a ``DatasetDict`` that goes through the same column detection and
decoding. FederatedDataset loads unshuffled splits here: the app decodes the whole source once per
process and partitions the in-memory tensors itself (:mod:`fedmae_flwr.data.partition`, with
flwr-datasets partitioners). ``save_to_disk`` folders need ``load_from_disk``, which
FederatedDataset does not offer.

Offline: the hub is asked only when it answers a HEAD request within 5 s; otherwise (and under
``HF_HUB_OFFLINE=1``) the dataset is looked up in the HF cache in offline mode. Not cached, it
fails in seconds with a ``RuntimeError`` that says how to make the data available, instead of
~25 s to minutes of retries.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from logging import INFO
from pathlib import Path
from typing import Any

import datasets
import httpx
import huggingface_hub.constants
import torch
from datasets import ClassLabel, Dataset, DatasetDict
from flwr.common import log
from flwr_datasets import FederatedDataset

from fedmae_flwr.data.decode import DecodeStats, channel_stats, decode_many, split_train_test
from fedmae_flwr.data.images import DatasetSplits, ImageSet

__all__ = ["IMAGE_COLUMN_NAMES", "LABEL_COLUMN_NAMES", "load_hf_dataset"]

# Conventional names, in order of preference, used when the features do not decide.
IMAGE_COLUMN_NAMES = ("image", "img", "picture")
LABEL_COLUMN_NAMES = ("label", "labels", "fine_label", "target")
HUB_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _offline_requested() -> bool:
    """Offline mode asked for, read now (the libraries read the variables once, at import)."""
    env = any(
        os.environ.get(var, "").upper() in _TRUE
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    return env or huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE


def _hub_unreachable(timeout: float = HUB_TIMEOUT_S) -> str:
    """Why the hub endpoint gives no answer within ``timeout`` ("" = it answered, any status).

    Uses httpx like huggingface_hub, so ``HTTPS_PROXY`` and ``HF_ENDPOINT`` apply as they will to
    the download itself.
    """
    endpoint = huggingface_hub.constants.ENDPOINT
    try:
        httpx.head(endpoint, timeout=timeout)
    except httpx.TimeoutException:
        return f"{endpoint} did not answer within {timeout:g} s"
    except httpx.HTTPError as e:
        return f"{endpoint}: {type(e).__name__}: {e}"
    return ""


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """Put datasets and huggingface_hub in offline mode for one call: cache only, no retries.

    Both libraries read these module attributes at call time, so this works even when
    ``HF_HUB_OFFLINE`` was set after they were imported.
    """
    saved = huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


def _hub_error(name: str, error: Exception, offline: bool, reason: str) -> RuntimeError:
    how = (
        f"To use it, make it available locally: on a machine with internet access run "
        f"`datasets.load_dataset('{name}').save_to_disk(DIR)`, copy DIR here and set "
        f"dataset='huggingface' data-path='DIR'; or point dataset='imagefolder' data-path=... at a "
        f"local folder of images (class sub-folders for labels). A dataset already in the HF "
        f"cache (HF_HOME / HF_DATASETS_CACHE) is used without the hub."
    )
    what = (
        f"the Hugging Face hub could not be reached ({reason})"
        if offline
        else "loading it from the Hugging Face hub failed (a typo in the name? a gated dataset "
        "needs `hf auth login`)"
    )
    return RuntimeError(f"Dataset '{name}': {what}: {type(error).__name__}: {error}. {how}")


def _federated_dataset(path: str, train_split: str, **load_kwargs: Any) -> DatasetDict:
    """The dataset's splits through ``flwr_datasets.FederatedDataset`` (which calls
    ``datasets.load_dataset(path)``), unshuffled: the app partitions the decoded tensors itself.

    Every split the dataset has among ``train_split``, test, validation, is returned.
    """
    fds = FederatedDataset(
        dataset=path, partitioners={train_split: 1}, shuffle=False, **load_kwargs
    )
    splits = {}
    for split in dict.fromkeys((train_split, "test", "validation", "valid")):
        try:
            splits[split] = fds.load_split(split)
        except ValueError:  # the dataset has no such split
            continue
    return DatasetDict(splits)


def _load_hub(name: str, train_split: str) -> DatasetDict:
    """A hub dataset through FederatedDataset that fails fast, with a useful message, offline."""
    if _offline_requested():
        offline, reason = True, "offline mode is set (HF_HUB_OFFLINE) and it is not in the cache"
    else:
        reason = _hub_unreachable()
        offline = bool(reason)
        if offline:
            log(INFO, "Hugging Face hub unreachable; looking for '%s' in the HF cache", name)
    try:
        with _offline_mode() if offline else contextlib.nullcontext():
            return _federated_dataset(name, train_split)
    except (OSError, httpx.HTTPError) as e:  # ConnectionError, hub/datasets errors: all OSError
        raise _hub_error(name, e, offline, reason) from e


def _is_saved_dataset(folder: Path) -> bool:
    """A ``save_to_disk`` folder: of a DatasetDict (``dataset_dict.json``) or a Dataset."""
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def _pick_column(
    ds: Dataset,
    requested: str,
    feature_type: type,
    names: tuple[str, ...],
    key: str,
    what: str,
    required: bool,
) -> str | None:
    """The column holding ``what``.

    ``requested`` if given; else the single column of ``feature_type``; else the first
    conventional name (``names``) among the columns. Several ``feature_type`` columns are
    ambiguous, except for labels, where a conventional name among them decides (CIFAR-100's
    ``fine_label`` over ``coarse_label``): a wrong label column only skews partitions, a wrong
    image column would train on the wrong pixels. ``None`` when not ``required`` and none fits.
    """
    columns = list(ds.column_names)
    listing = ", ".join(f"{c} ({type(ds.features[c]).__name__})" for c in columns)
    if requested:
        if requested not in columns:
            raise ValueError(
                f"Config key '{key}' = '{requested}' is not a column. Columns: {listing}."
            )
        return requested
    typed = [c for c in columns if isinstance(ds.features[c], feature_type)]
    if len(typed) == 1:
        return typed[0]
    named = [n for n in names if n in (typed or columns)]
    if len(typed) > 1 and (required or not named):
        raise ValueError(
            f"Ambiguous {what} column: {', '.join(typed)} are all {feature_type.__name__} "
            f"features. Set config key '{key}' to one of them. Columns: {listing}."
        )
    if named:
        return named[0]
    if required:
        raise ValueError(
            f"No {what} column found (no {feature_type.__name__} feature, none named "
            f"{'/'.join(names)}). Set config key '{key}'. Columns: {listing}."
        )
    return None


def _labels(ds: Dataset, column: str | None, vocabulary: dict[str, int]) -> torch.Tensor:
    """Integer labels of ``ds``; -1 without a column; strings through ``vocabulary``."""
    if column is None:
        return torch.full((len(ds),), -1, dtype=torch.long)
    values = list(ds[column])
    if values and isinstance(values[0], str):
        values = [vocabulary[v] for v in values]
    return torch.as_tensor(values, dtype=torch.long)


def _vocabulary(datasets_: list[Dataset], column: str | None) -> dict[str, int]:
    """Sorted string label names -> indices, for a string-valued label column (else empty)."""
    if column is None:
        return {}
    present = [ds for ds in datasets_ if column in ds.column_names]
    if not all(getattr(ds.features[column], "dtype", "") in ("string", "large_string")
               for ds in present):  # fmt: skip
        return {}
    return {v: i for i, v in enumerate(sorted({v for ds in present for v in ds[column]}))}


def _rows(ds: Dataset, column: str, split: str, rows: list[int]) -> Iterator[tuple[str, Any]]:
    """``(name, image value)`` per row, read in batches (never the whole column at once).

    ``rows`` are the original row numbers of ``ds``'s rows, used in names of skipped images.
    """
    position = 0
    for batch in ds.select_columns([column]).iter(batch_size=256):
        for value in batch[column]:
            path = value.get("path") if isinstance(value, dict) else None
            yield (f"{split}[{rows[position]}]" + (f" ({path})" if path else "")), value
            position += 1


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
        name: Hub id, ``save_to_disk`` folder, or folder of images (see the module docstring).
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
        ValueError: Missing split, ambiguous/missing columns, nothing decodable.
    """
    local = Path(name).expanduser()
    with contextlib.ExitStack() as stack:
        if local.is_dir():
            if _is_saved_dataset(local):
                data = datasets.load_from_disk(str(local))
                source = f"save_to_disk folder '{local}'"
            else:
                # The builder writes Arrow files; keep them out of the user's HF cache and delete
                # them once decoded (rows refer to the image files, which stay where they are).
                cache = stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmae-hf-"))
                data = _federated_dataset(str(local), train_split, cache_dir=cache)
                source = f"imagefolder '{local}'"
        elif local.exists() or not _REPO_ID.match(name) or name.startswith((".", "~")):
            raise FileNotFoundError(
                f"'{name}' is neither a folder (save_to_disk output or images) nor a hub id "
                "(org/name)"
            )
        else:
            data = _load_hub(name, train_split)
            source = f"hub dataset '{name}'"
        return _decode_splits(
            data, source, channels, size, image_column, label_column, train_split, test_split,
            seed, test_fraction, num_workers,
        )  # fmt: skip


def _decode_splits(
    data: Dataset | DatasetDict,
    source: str,
    channels: int,
    size: int,
    image_column: str,
    label_column: str,
    train_split: str,
    test_split: str,
    seed: int,
    test_fraction: float,
    num_workers: int,
) -> tuple[DatasetSplits, DecodeStats]:
    if isinstance(data, Dataset):  # save_to_disk of a single Dataset: it is the train split
        data = DatasetDict({train_split: data})
    if train_split not in data:
        raise ValueError(f"{source} has no split '{train_split}'. Splits: {', '.join(data)}.")
    train_ds = data[train_split]
    image_col = _pick_column(
        train_ds, image_column, datasets.Image, IMAGE_COLUMN_NAMES, "image-column", "image", True
    )
    label_col = _pick_column(
        train_ds, label_column, ClassLabel, LABEL_COLUMN_NAMES, "label-column", "label", False
    )
    assert image_col is not None

    def prepare(ds: Dataset) -> Dataset:
        # Decode ourselves, not through the Image feature: a corrupt row is then a counted skip
        # rather than an exception out of the Arrow reader.
        if isinstance(ds.features[image_col], datasets.Image):
            ds = ds.cast_column(image_col, datasets.Image(decode=False))
        return ds

    has_test = bool(test_split) and test_split in data
    vocabulary = _vocabulary([train_ds, *([data[test_split]] if has_test else [])], label_col)
    labels_train = _labels(train_ds, label_col, vocabulary)
    if has_test:
        test_ds = data[test_split]
        if image_col not in test_ds.column_names:
            raise ValueError(f"Split '{test_split}' of {source} lacks column '{image_col}'")
        test_label_col = label_col if label_col in test_ds.column_names else None
        labels_test = _labels(test_ds, test_label_col, vocabulary)
        segments = [
            (prepare(train_ds), train_split, list(range(len(train_ds)))),
            (prepare(test_ds), test_split, list(range(len(test_ds)))),
        ]
        labels = torch.cat([labels_train, labels_test])
        num_train = len(train_ds)
    else:
        # Split rows before decoding, train rows first, so train and test are views of one
        # buffer (no copy) and the split does not depend on which rows fail to decode.
        train_idx, test_idx = split_train_test(labels_train, test_fraction, seed)
        order = torch.cat([train_idx, test_idx])
        rows_order = order.tolist()
        segments = [(prepare(train_ds).select(rows_order), train_split, rows_order)]
        labels = labels_train[order]
        num_train = len(train_idx)

    feature = train_ds.features[label_col] if label_col else None
    if isinstance(feature, ClassLabel):
        num_classes = feature.num_classes
    elif vocabulary:
        num_classes = len(vocabulary)
    else:
        num_classes = int(labels.max()) + 1 if len(labels) and int(labels.max()) >= 0 else 0

    def rows() -> Iterator[tuple[str, Any]]:
        for ds, split, row_numbers in segments:
            yield from _rows(ds, image_col, split, row_numbers)

    stats = DecodeStats()
    start = time.perf_counter()
    images, kept = decode_many(rows(), len(labels), channels, size, stats, num_workers)
    seconds = time.perf_counter() - start
    num_train_kept = sum(1 for i in kept if i < num_train)
    if num_train_kept == 0:
        raise ValueError(
            f"No decodable image in split '{train_split}' of {source} (column '{image_col}'): "
            f"{stats.summary()}; first failures: {'; '.join(stats.skipped_files[:3])}"
        )
    log(
        INFO,
        "%s (image '%s', label %s): %s in %.1f s (%.0f images/s), %d classes",
        source, image_col, f"'{label_col}'" if label_col else "none", stats.summary(), seconds,
        len(labels) / max(seconds, 1e-9), num_classes,
    )  # fmt: skip
    labels = labels[torch.tensor(kept, dtype=torch.long)]
    train = ImageSet(images[:num_train_kept], labels[:num_train_kept])
    test = ImageSet(images[num_train_kept:], labels[num_train_kept:])
    mean, std = channel_stats(train.images)
    return DatasetSplits(train, test, mean, std, num_classes=num_classes), stats
