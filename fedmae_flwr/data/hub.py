"""Hugging Face hub datasets through ``flwr_datasets.FederatedDataset``, failing fast offline.

The hub is asked only when it answers a HEAD request within 5 s; otherwise (and under
``HF_HUB_OFFLINE=1``) the dataset is looked up in the HF cache (``HF_HOME`` /
``HF_DATASETS_CACHE``) in offline mode. Not cached, it fails in seconds with a ``RuntimeError``
that says how to make the data available, instead of ~25 s to minutes of retries.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from logging import INFO

import datasets
import httpx
import huggingface_hub.constants
from datasets import DatasetDict
from flwr.common import log
from flwr_datasets import FederatedDataset

__all__ = ["load_hub_dataset"]

HUB_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")


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


def _federated_dataset(path: str, train_split: str) -> DatasetDict:
    """The dataset's ``train_split`` and whichever of test / validation / valid it has, through
    ``flwr_datasets.FederatedDataset`` (``datasets.load_dataset(path)``), unshuffled."""
    fds = FederatedDataset(dataset=path, partitioners={train_split: 1}, shuffle=False)
    splits = {}
    for split in dict.fromkeys((train_split, "test", "validation", "valid")):
        try:
            splits[split] = fds.load_split(split)
        except ValueError:  # the dataset has no such split
            continue
    return DatasetDict(splits)


def load_hub_dataset(name: str, train_split: str) -> DatasetDict:
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
