"""Data sources and their partition over nodes; loaded once per process and cached.

The Flower idiom (a module-level ``fds``): a client process serves many virtual nodes, so a source
is decoded and partitioned once per process, not once per call. Sources:

- ``fashion-mnist``: the idx files of Debian's ``dataset-fashion-mnist`` (offline);
- ``imagefolder``: a local folder (class sub-folders = labelled, flat = unlabelled);
- ``huggingface``: a hub id or a ``save_to_disk`` folder, through ``datasets``.

On a deployed SuperNode, ``--node-config "data-path='/its/own/images'"`` makes the node read
only its own folder (all of it is the node's partition).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fedmae_flwr.config import FedMAEConfig
from fedmae_flwr.data.fashion_mnist import DEFAULT_DIR, load_fashion_mnist
from fedmae_flwr.data.images import DatasetSplits, ImageSet
from fedmae_flwr.data.partition import partition_indices

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


@dataclass(frozen=True)
class NodeData:
    """One node's images: ``train`` for local MAE steps, ``heldout`` for federated evaluation."""

    train: ImageSet
    heldout: ImageSet
    splits: DatasetSplits


def _split_heldout(local: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    num_heldout = round(len(local) * fraction)
    order = torch.randperm(len(local), generator=torch.Generator().manual_seed(seed))
    return local.subset(order[num_heldout:]), local.subset(order[:num_heldout])


def load_node_data(
    cfg: FedMAEConfig, partition_id: int, num_partitions: int, node_data_path: str = ""
) -> NodeData:
    """A node's images, split train/held-out.

    Args:
        partition_id, num_partitions: the node's partition of the run's source (simulation).
        node_data_path: a deployed node's own image folder (its ``--node-config data-path``):
            when set, the whole folder is this node's data and no partitioning happens.
    """
    if node_data_path:
        splits = _load(SourceSpec.from_config(cfg, path=node_data_path))
        train, heldout = _split_heldout(splits.train, cfg.data.heldout_fraction, cfg.seed)
        return NodeData(train, heldout, splits)
    total = cfg.data.num_partitions or num_partitions
    if not 0 <= partition_id < total:
        raise ValueError(f"partition-id {partition_id} is outside [0, {total})")
    splits = load_dataset(cfg)
    local = splits.train.subset(partitions(cfg, num_partitions)[partition_id])
    train, heldout = _split_heldout(local, cfg.data.heldout_fraction, cfg.seed + partition_id)
    return NodeData(train, heldout, splits)
