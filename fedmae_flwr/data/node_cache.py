"""A node's decoded images kept on disk, so that a ClientApp process per message decodes once.

A deployed SuperNode starts a fresh ClientApp process for every message (Flower 1.41), so the
in-memory caches of :mod:`fedmae_flwr.data` live for one message only. The ClientApp therefore
keeps the node's :class:`~fedmae_flwr.data.images.NodeData` (uint8 images and labels of its train
and held-out split, the source's mean/std, classes and skip count) in
``<cache-dir>/<key>.safetensors`` and later processes read it back: milliseconds, against seconds
of decoding (and of partitioning, for a node that holds a partition of a shared source).

Where (:func:`resolve_cache_dir`): the node-config ``cache-dir``
(``flower-supernode ... --node-config "data-path='/data/own' cache-dir='/var/cache/fedmae'"``),
else the environment variable ``FEDMAE_CACHE_DIR`` (how a simulation, whose node-config Flower
writes, sets it), else ``$XDG_CACHE_HOME/fedmae-flwr/node-data`` (``~/.cache/...``). The value
``off`` in either place turns the disk cache off.

The key is a SHA-256 of everything the node's images depend on: the cache format, the source
(kind, absolute path and, for local sources, every file's relative path, size and mtime, so an
added, removed or rewritten file gives a new key), the decoding (channels, size, columns, test
fraction, the torchvision and Pillow versions), the node's split (its own folder, or partition id,
number of partitions, partitioner, its arguments and flwr-datasets' version), the held-out
fraction and the seed. A Hugging Face hub id has no local files to stat: its key holds the id
only, so clear the folder after that dataset changes on the hub.

Safe to share and to crash in: files are safetensors (reading one runs no code, unlike pickle),
written to a temporary file in the same folder and renamed into place (a reader never sees half
a file; two processes writing one key both write the same content); the folder is created
private (mode 0700). A file that does not read back with the expected dtypes and shapes is
ignored (logged) and written again. Old keys are not pruned: delete the folder to free space (a
Fashion-MNIST node of 100 is ~0.5 MB, a node of 1,000 RGB images at 224 px ~150 MB).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from logging import DEBUG, INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.common import log

from fedmae_flwr.data.file_tree import walk_files
from fedmae_flwr.data.images import ImageSet, NodeData

__all__ = ["CACHE_VERSION", "ENV_VAR", "cached_node_data", "resolve_cache_dir"]

# Bump when decoding, splitting or the file layout changes (2: long strips cropped before
# resizing; hub test splits without labels replaced by a share of train; a device's own
# folder whole, its test split included; a share of a shared source reports 0 skipped files.
# 3: 32-bit integer images read at the range their values use. 4: the held-out share never takes
# a node's last training image).
CACHE_VERSION = 4
ENV_VAR = "FEDMAE_CACHE_DIR"
OFF = "off"
_TENSORS = ("train-images", "train-labels", "heldout-images", "heldout-labels")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fedmae-flwr/node-data`` (``~/.cache/fedmae-flwr/node-data``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fedmae-flwr" / "node-data"


def resolve_cache_dir(node_value: str = "") -> Path | None:
    """The cache folder: node-config ``cache-dir``, else ``$FEDMAE_CACHE_DIR``, else the default;
    ``None`` (no disk cache) when the first of them that is set says ``off``."""
    value = str(node_value).strip() or os.environ.get(ENV_VAR, "").strip()
    if value.lower() == OFF:
        return None
    return Path(value).expanduser() if value else default_cache_dir()


@functools.cache
def source_fingerprint(dataset: str, path: str) -> str:
    """What identifies the source's content: its files' paths, sizes and mtimes (hashed).

    Once per process, as the source itself is decoded once per process.
    """
    root = Path(path).expanduser()
    if not root.exists():  # a hub id, or a path that will fail to load anyway
        return hashlib.sha256(f"{dataset}\0{path}".encode()).hexdigest()
    # Names as the OS gives them (os.fsencode): a name that is no UTF-8 (a Latin-1 camera or
    # share) failed .encode() and made every node unusable.
    digest = hashlib.sha256(f"{dataset}\0".encode() + os.fsencode(root.resolve()))
    # Hidden files and folders are no images to any loader here; skipped, a cache-dir inside
    # data-path (or ~/.cache with data-path ~) changed the fingerprint with every entry it got.
    files = [root] if root.is_file() else walk_files(root, _not_hidden(root), skip_hidden=True)[0]
    for file in files:
        digest.update(b"\0" + os.fsencode(file.relative_to(root)))
        try:
            stat = file.stat()
        except OSError:  # vanished or a broken link: part of the content as "missing"
            digest.update(b"\0missing")
            continue
        digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _not_hidden(root: Path) -> Callable[[str], bool]:
    def keep(path: str) -> bool:
        return not any(part.startswith(".") for part in Path(path).relative_to(root).parts)

    return keep


def _decoder_versions() -> dict[str, str]:
    # Both are loaded already (timm imports torchvision, which imports PIL).
    import PIL
    import torchvision

    return {"torchvision": torchvision.__version__, "pillow": PIL.__version__}


def cache_key(parts: Mapping[str, Any]) -> str:
    """SHA-256 (hex, 32 characters) of ``parts`` plus the cache format and decoder versions."""
    payload = {"cache-version": CACHE_VERSION, **_decoder_versions(), **parts}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _check(images: torch.Tensor, labels: torch.Tensor, channels: int, size: int) -> ImageSet:
    if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (channels, size, size):
        raise ValueError(f"images are {images.dtype} {tuple(images.shape)}, "
                         f"expected uint8 [N, {channels}, {size}, {size}]")  # fmt: skip
    if labels.dtype != torch.int64:
        raise ValueError(f"labels are {labels.dtype}, expected int64")
    return ImageSet(images, labels)


def read(path: Path, channels: int, size: int) -> NodeData | None:
    """The node's data from ``path``; None when it is missing or does not read back whole."""
    if not path.is_file():
        return None
    from safetensors import safe_open  # deferred: only a node with a cache file needs it

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["fedmae-node-data"])
            tensors = {name: f.get_tensor(name) for name in _TENSORS}
        train = _check(tensors["train-images"], tensors["train-labels"], channels, size)
        heldout = _check(tensors["heldout-images"], tensors["heldout-labels"], channels, size)
        mean, std = tuple(map(float, meta["mean"])), tuple(map(float, meta["std"]))
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"{len(mean)} channel means for {channels} channels")
        return NodeData(train, heldout, mean, std, int(meta["num-classes"]), int(meta["skipped"]))
    except Exception as err:  # any damage: decode again and write the file anew
        log(WARNING, "Node data cache %s is unreadable (%s); decoding again", path, err)
        return None


def write(path: Path, node: NodeData, parts: Mapping[str, Any]) -> None:
    """``node`` to ``path``, atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file  # deferred: only a node that writes its cache

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    meta = {"mean": list(node.mean), "std": list(node.std), "num-classes": node.num_classes,
            "skipped": node.skipped, "key": dict(parts)}  # fmt: skip
    tensors = {
        "train-images": node.train.images, "train-labels": node.train.labels,
        "heldout-images": node.heldout.images, "heldout-labels": node.heldout.labels,
    }  # fmt: skip
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            tmp,
            metadata={"fedmae-node-data": json.dumps(meta, sort_keys=True)},
        )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_node_data(
    folder: Path | None,
    parts: Mapping[str, Any],
    channels: int,
    size: int,
    compute: Callable[[], NodeData],
) -> NodeData:
    """The node's data from ``folder`` when a file of its key is there, else ``compute()``,
    written there for the next process. ``folder`` None: ``compute()`` only."""
    if folder is None:
        return compute()
    path = folder / f"{cache_key(parts)}.safetensors"
    node = read(path, channels, size)
    if node is not None:
        log(DEBUG, "Node data read from cache %s", path)
        return node
    node = compute()
    try:
        write(path, node, parts)
        log(INFO, "Node data decoded once, kept in %s", path)
    except OSError as err:  # a read-only or full disk costs speed, not the run
        log(WARNING, "Could not write the node data cache %s (%s)", path, err)
    return node
