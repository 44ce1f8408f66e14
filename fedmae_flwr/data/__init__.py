"""Data sources and their partition over nodes; loaded once per process and cached.

The Flower idiom (a module-level ``fds``): a client process serves many virtual nodes, so the
dataset and the partition table are built once per process, not once per call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fedmae_flwr.config import FedMAEConfig
from fedmae_flwr.data.fashion_mnist import load_fashion_mnist
from fedmae_flwr.data.images import DatasetSplits, ImageSet
from fedmae_flwr.data.partition import partition_indices

__all__ = ["DatasetSplits", "ImageSet", "NodeData", "load_dataset", "load_node_data"]


@functools.cache
def load_dataset(dataset: str, data_dir: str) -> DatasetSplits:
    """The whole source (train + test), cached per process."""
    if dataset == "fashion-mnist":
        return load_fashion_mnist(data_dir)
    raise ValueError(f"Unknown dataset '{dataset}'. Allowed: fashion-mnist.")


@functools.cache
def _partitions(
    dataset: str, data_dir: str, partitioner: str, alpha: float, num_partitions: int, seed: int
) -> list[torch.Tensor]:
    labels = load_dataset(dataset, data_dir).train.labels.numpy()
    parts = partition_indices(labels, num_partitions, partitioner, alpha, seed)
    return [torch.from_numpy(p) for p in parts]


@dataclass(frozen=True)
class NodeData:
    """One node's images: ``train`` for local MAE steps, ``heldout`` for federated evaluation."""

    train: ImageSet
    heldout: ImageSet
    splits: DatasetSplits


def load_node_data(cfg: FedMAEConfig, partition_id: int, num_partitions: int) -> NodeData:
    """The images of partition ``partition_id`` of ``num_partitions``, split train/held-out."""
    if cfg.num_partitions:
        num_partitions = cfg.num_partitions
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    splits = load_dataset(cfg.dataset, cfg.data_dir)
    parts = _partitions(
        cfg.dataset, cfg.data_dir, cfg.partitioner, cfg.dirichlet_alpha, num_partitions, cfg.seed
    )
    local = splits.train.subset(parts[partition_id])
    num_heldout = round(len(local) * cfg.heldout_fraction)
    order = torch.randperm(
        len(local), generator=torch.Generator().manual_seed(cfg.seed + partition_id)
    )
    return NodeData(
        train=local.subset(order[num_heldout:]),
        heldout=local.subset(order[:num_heldout]),
        splits=splits,
    )
