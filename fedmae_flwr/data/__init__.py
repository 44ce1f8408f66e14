"""Data sources and their partition over nodes; loaded once per process and cached.

The Flower idiom (a module-level ``fds``): a client process serves many virtual nodes, so a source
is decoded and partitioned once per process, not once per call. Sources:

- ``fashion-mnist``: the idx files of Debian's ``dataset-fashion-mnist`` (offline);
- ``imagefolder``: a local folder (class sub-folders = labelled, flat = unlabelled);
- ``huggingface``: a hub id or a ``save_to_disk`` folder, through ``datasets``.

On a deployed SuperNode, ``--node-config "data-path='/its/own/images'"`` makes the node read
only its own folder (all of it is the node's partition).

A ClientApp passes ``cache_dir`` to :func:`load_node_data`: the node's images are then also kept
on disk (:mod:`fedmae_flwr.data.node_cache`), because Flower starts a process per message on a
deployed SuperNode and the in-memory caches would last one message.

Imports: this package is on the ClientApp's import path, so what only some sources or only the
server need is imported where it is used: flwr-datasets (partitioning; it loads ``datasets``,
pandas, pyarrow, seaborn and matplotlib, ~2 s), the image-folder and Hugging Face loaders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmae_flwr.config import FedMAEConfig
from fedmae_flwr.data.fashion_mnist import DEFAULT_DIR, load_fashion_mnist
from fedmae_flwr.data.images import DatasetSplits, ImageSet, NodeData
from fedmae_flwr.data.node_cache import cached_node_data, source_fingerprint

__all__ = ["DatasetSplits", "ImageSet", "NodeData", "load_dataset", "load_node_data"]


@dataclass(frozen=True)
class SourceSpec:
    """What identifies a decoded source (the cache key)."""

    dataset: str
    path: str
    channels: int
    size: int
    image_column: str = ""
    label_column: str = ""
    test_fraction: float = 0.1
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: FedMAEConfig, path: str | None = None) -> SourceSpec:
        return cls(
            dataset=cfg.data.dataset if path is None else "imagefolder",
            path=path
            or cfg.data.data_path
            or (DEFAULT_DIR if cfg.data.dataset == "fashion-mnist" else ""),
            channels=cfg.model.in_chans,
            size=cfg.model.img_size,
            image_column=cfg.data.image_column,
            label_column=cfg.data.label_column,
            test_fraction=cfg.data.test_fraction,
            seed=cfg.seed,
        )


@contextlib.contextmanager
def _needs_server_extra(what: str) -> Iterator[None]:
    """An ImportError of the libraries a device install leaves out, with what to do about it."""
    try:
        yield
    except ImportError as err:
        raise ImportError(
            f"{what} needs {err.name or 'a library'}, which the device install "
            "(`pip install fedmae-flwr`) leaves out: install `fedmae-flwr[server]`, or give "
            f"the node its own image folder (node-config data-path). ({err})"
        ) from err


@functools.cache
def _load(spec: SourceSpec) -> DatasetSplits:
    if spec.dataset == "fashion-mnist":
        splits = load_fashion_mnist(spec.path)
        shape = tuple(splits.train.images.shape[1:])
        if shape != (spec.channels, spec.size, spec.size):
            raise ValueError(
                f"Fashion-MNIST images are {shape}; set in-chans=1 img-size=28 "
                f"(got in-chans={spec.channels} img-size={spec.size})"
            )
        return splits
    if spec.dataset == "imagefolder":
        from fedmae_flwr.data.imagefolder import load_image_folder

        return load_image_folder(
            spec.path, spec.channels, spec.size, test_fraction=spec.test_fraction, seed=spec.seed
        )[0]
    if spec.dataset == "huggingface":
        with _needs_server_extra("A Hugging Face source"):
            from fedmae_flwr.data.huggingface import load_hf_dataset

        return load_hf_dataset(
            spec.path,
            spec.channels,
            spec.size,
            image_column=spec.image_column,
            label_column=spec.label_column,
            seed=spec.seed,
            test_fraction=spec.test_fraction,
        )[0]
    raise ValueError(f"Unknown dataset '{spec.dataset}'.")


def load_dataset(cfg: FedMAEConfig) -> DatasetSplits:
    """The run's whole source (train + test), decoded once per process."""
    return _load(SourceSpec.from_config(cfg))


@functools.cache
def _partitions(
    spec: SourceSpec,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_partition: int,
    shards_per_partition: int,
) -> list[torch.Tensor]:
    # Deferred: flwr-datasets (and through it datasets, pandas, pyarrow, matplotlib) is needed
    # only to split a shared source, not by a node that reads its own folder or its cache.
    with _needs_server_extra("Splitting the source over nodes (node-config partition-id)"):
        from fedmae_flwr.data.partition import partition_indices

    labels = _load(spec).train.labels.numpy()
    parts = partition_indices(
        labels,
        num_partitions,
        partitioner,
        alpha,
        spec.seed,
        classes_per_partition=classes_per_partition,
        shards_per_partition=shards_per_partition,
    )
    return [torch.from_numpy(p) for p in parts]


def partitions(cfg: FedMAEConfig, num_partitions: int) -> list[torch.Tensor]:
    """Training-set indices of every partition (seeded; identical in every process).

    ``num_partitions`` (the number of nodes) is used when the config's ``num-partitions`` is 0.
    """
    return _partitions(
        SourceSpec.from_config(cfg),
        cfg.data.num_partitions or num_partitions,
        str(cfg.data.partitioner),
        cfg.data.dirichlet_alpha,
        cfg.data.classes_per_partition,
        cfg.data.shards_per_partition,
    )


def _installed_version(distribution: str) -> str:
    """The installed version ("" when not installed), read without importing the package."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _split_heldout(local: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """``(train, heldout)``: ``fraction`` of the images held out, rounded, but never a node's
    last training image (a fraction near 1 on a node of a few images held out all of them: the
    node then trained on nothing and the stage failed at its end for want of a sound reply)."""
    num_heldout = min(round(len(local) * fraction), max(len(local) - 1, 0))
    order = torch.randperm(len(local), generator=torch.Generator().manual_seed(seed))
    return local.subset(order[num_heldout:]), local.subset(order[:num_heldout])


def _node_of(
    splits: DatasetSplits, local: ImageSet, fraction: float, seed: int, skipped: int
) -> NodeData:
    train, heldout = _split_heldout(local, fraction, seed)
    return NodeData(train, heldout, splits.mean, splits.std, splits.num_classes, skipped)


def load_node_data(
    cfg: FedMAEConfig,
    partition_id: int,
    num_partitions: int,
    node_data_path: str = "",
    cache_dir: Path | None = None,
) -> NodeData:
    """A node's images, split train/held-out.

    Args:
        partition_id, num_partitions: the node's partition of the run's source (simulation).
        node_data_path: a deployed node's own image folder (its ``--node-config data-path``):
            when set, the whole folder is this node's data and no partitioning happens.
        cache_dir: keep the node's images in this folder and read them from there in later
            processes (:mod:`fedmae_flwr.data.node_cache`); None: decode from the source (once
            per process).
    """
    if node_data_path:
        spec = SourceSpec.from_config(cfg, path=node_data_path)
        node: dict = {"own-folder": True}

        def compute() -> NodeData:
            # Every image of the folder is this node's: the source's test split (test-fraction,
            # or a test/ folder) is for scoring on the server, which never sees this folder.
            splits = _load(spec)
            whole = ImageSet(
                torch.cat([splits.train.images, splits.test.images]),
                torch.cat([splits.train.labels, splits.test.labels]),
            )
            return _node_of(splits, whole, cfg.data.heldout_fraction, cfg.seed, splits.skipped)

    else:
        total = cfg.data.num_partitions or num_partitions
        if not 0 <= partition_id < total:
            raise ValueError(f"partition-id {partition_id} is outside [0, {total})")
        spec = SourceSpec.from_config(cfg)
        node = {
            "partition-id": partition_id,
            "num-partitions": total,
            "partitioner": str(cfg.data.partitioner),
            "dirichlet-alpha": cfg.data.dirichlet_alpha,
            "classes-per-partition": cfg.data.classes_per_partition,
            "shards-per-partition": cfg.data.shards_per_partition,
            "flwr-datasets": _installed_version("flwr-datasets"),
        }

        def compute() -> NodeData:
            splits = load_dataset(cfg)
            local = splits.train.subset(partitions(cfg, num_partitions)[partition_id])
            # The shared source's unreadable files are skipped before it is split, so no share
            # can tell which were its own: the server counts them once (summary.json data
            # skipped-unreadable); each node reporting all of them counted them once per node.
            seed = cfg.seed + partition_id
            return _node_of(splits, local, cfg.data.heldout_fraction, seed, skipped=0)

    if cache_dir is None:
        return compute()
    content = source_fingerprint(spec.dataset, spec.path)
    parts = {
        "source": {**dataclasses.asdict(spec), "content": content},
        "node": node,
        "heldout-fraction": cfg.data.heldout_fraction,
    }
    return cached_node_data(cache_dir, parts, spec.channels, spec.size, compute)
