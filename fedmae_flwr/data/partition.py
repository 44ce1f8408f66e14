"""Split a training set over nodes with flwr-datasets partitioners (labels used only to skew)."""

from __future__ import annotations

import datasets
import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

PARTITIONERS = ("iid", "dirichlet")

# Progress bars for in-memory index tables are noise in every client log.
datasets.disable_progress_bars()


def make_partitioner(name: str, num_partitions: int, alpha: float, seed: int) -> Partitioner:
    if name == "iid":
        return IidPartitioner(num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions, partition_by="label", alpha=alpha, min_partition_size=0, seed=seed
        )
    raise ValueError(f"Unknown partitioner '{name}'. Allowed: {', '.join(PARTITIONERS)}.")


def partition_indices(
    labels: np.ndarray, num_partitions: int, partitioner: str, alpha: float, seed: int
) -> list[np.ndarray]:
    """Indices into ``labels`` of each partition; the same arguments give the same split.

    The index table is shuffled with ``seed`` first because flwr-datasets' IID partitioner takes
    contiguous shards.
    """
    if num_partitions < 1 or num_partitions > len(labels):
        raise ValueError(
            f"num_partitions must be in [1, {len(labels)}] (one image per node at least), "
            f"got {num_partitions}"
        )
    table = Dataset.from_dict({"index": np.arange(len(labels)), "label": labels.astype(np.int64)})
    table = table.shuffle(seed=seed).flatten_indices()
    part = make_partitioner(partitioner, num_partitions, alpha, seed)
    part.dataset = table
    return [
        np.asarray(part.load_partition(i)["index"], dtype=np.int64) for i in range(num_partitions)
    ]
