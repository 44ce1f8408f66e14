"""Split a training set over nodes with flwr-datasets partitioners (labels used only to skew).

Four partitioners, chosen by name (config key ``partitioner``):

``iid``
    :class:`~flwr_datasets.partitioner.IidPartitioner` over a seeded shuffle of the index table
    (flwr-datasets takes contiguous blocks, so the shuffle is what makes it random). Sizes differ
    by at most one image; needs no labels.
``dirichlet``
    :class:`~flwr_datasets.partitioner.DirichletPartitioner`: each class is spread over the
    partitions with proportions drawn from Dirichlet(``dirichlet-alpha``); small alpha, strong
    label skew (and possibly empty partitions, since no minimum size is imposed).
``pathological``
    :class:`~flwr_datasets.partitioner.PathologicalPartitioner` in ``first-deterministic`` mode:
    partition ``i`` gets class ``i mod C`` plus ``classes-per-partition - 1`` seeded random
    others; each class is split evenly over the partitions holding it. With at least as many
    partitions as classes every image is used; with fewer, classes no partition drew are left
    out (a warning says how many images).
``shards``
    :class:`~flwr_datasets.partitioner.ShardPartitioner` (McMahan et al.): the label-sorted table
    is cut into shards of ``floor(N / (num-partitions * shards-per-partition))`` images and each
    partition gets ``shards-per-partition`` seeded random shards. The remainder
    ``N mod (num-partitions * shards-per-partition)`` (fewer than one shard per partition) is
    left out.

Everything happens on an in-memory :class:`datasets.Dataset` (no cache files: a table built with
``from_dict`` has none, so ``shuffle``/``sort``/``select`` keep their index maps in memory), and
every random draw comes from NumPy generators seeded with ``seed``: the same arguments give the
same partitions in any process, whatever ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import warnings

import datasets
import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

PARTITIONERS = ("iid", "dirichlet", "pathological", "shards")
# Partitioners that shape the split by label; they cannot run on unlabelled data.
LABEL_PARTITIONERS = ("dirichlet", "pathological", "shards")

# Progress bars for in-memory index tables are noise in every client log.
datasets.disable_progress_bars()


def _num_classes(labels: np.ndarray) -> int:
    return len(np.unique(labels))


def _check_common_args(
    labels: np.ndarray, num_partitions: int, partitioner: str, seed: int
) -> None:
    """The checks every partitioner needs: its name, the labels, the node count and the seed."""
    if partitioner not in PARTITIONERS:
        raise ValueError(
            f"partitioner: unknown '{partitioner}'. Allowed: {', '.join(PARTITIONERS)}."
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    n = len(labels)
    if n == 0:
        raise ValueError("Cannot partition an empty training set (0 labels).")
    if not 1 <= num_partitions <= n:
        raise ValueError(
            f"num-partitions must be in [1, {n}] (at least one image per node), "
            f"got {num_partitions}"
        )
    # numpy's default_rng (used by datasets' shuffle and every partitioner) rejects negatives.
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def _check_label_args(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    classes_per_partition: int,
    shards_per_partition: int,
) -> None:
    """The checks of a label partitioner: fully labelled data and its own option's range."""
    if (labels < 0).any():
        what = "unlabelled (all labels -1)" if (labels < 0).all() else "partly unlabelled"
        raise ValueError(
            f"partitioner '{partitioner}' splits by label, but the training set is {what}; "
            f"only 'iid' works without labels."
        )
    if partitioner == "dirichlet":
        if not (np.isfinite(alpha) and alpha > 0):
            raise ValueError(f"dirichlet-alpha must be a number in (0, inf), got {alpha}")
    elif partitioner == "pathological":
        num_classes = _num_classes(labels)
        if not 1 <= classes_per_partition <= num_classes:
            raise ValueError(
                f"classes-per-partition must be in [1, {num_classes}] (the number of distinct "
                f"labels), got {classes_per_partition}"
            )
    elif partitioner == "shards":
        n = len(labels)
        max_shards = n // num_partitions
        if not 1 <= shards_per_partition <= max_shards:
            raise ValueError(
                f"shards-per-partition must be in [1, {max_shards}] (shards of at least one "
                f"image: {n} images // num-partitions {num_partitions}), "
                f"got {shards_per_partition}"
            )


def validate_partition_args(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
    classes_per_partition: int = 2,
    shards_per_partition: int = 2,
) -> None:
    """Raise ``ValueError`` (naming the config key and its allowed range) for impossible splits.

    Only the arguments the chosen ``partitioner`` uses are checked, so e.g. a Dirichlet alpha
    left at any value does not break an IID run.
    """
    _check_common_args(labels, num_partitions, partitioner, seed)
    if partitioner in LABEL_PARTITIONERS:
        _check_label_args(
            labels, num_partitions, partitioner, alpha, classes_per_partition, shards_per_partition
        )


def make_partitioner(
    name: str,
    num_partitions: int,
    alpha: float,
    seed: int,
    classes_per_partition: int = 2,
    shards_per_partition: int = 2,
) -> Partitioner:
    """The flwr-datasets partitioner called ``name`` (see the module docstring), seeded."""
    seed = int(seed)
    if name == "iid":
        # Deterministic contiguous blocks; randomness comes from the seeded table shuffle.
        return IidPartitioner(num_partitions)
    if name == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=0,
            seed=seed,
        )
    if name == "pathological":
        # "first-deterministic" (the paper's mode) uses every class once there are at least as
        # many partitions as classes; "random" may leave classes, hence images, unused.
        return PathologicalPartitioner(
            num_partitions,
            partition_by="label",
            num_classes_per_partition=int(classes_per_partition),
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
    if name == "shards":
        # shard_size=None: derived as floor(N / (num_partitions * shards_per_partition)), so
        # every partition gets the same number of equal shards.
        return ShardPartitioner(
            num_partitions,
            partition_by="label",
            num_shards_per_partition=int(shards_per_partition),
            seed=seed,
        )
    raise ValueError(f"partitioner: unknown '{name}'. Allowed: {', '.join(PARTITIONERS)}.")


def _read_partitions(part: Partitioner) -> list[np.ndarray]:
    """The ``index`` column of every partition, through the public ``load_partition``.

    Each ``load_partition`` is a ``Dataset.select``, which hashes its index list for the
    dataset fingerprint: ~1-3 s for 60,000 images (label partitioners), once per process since
    the partitions are cached. A numpy-formatted slice reads the column in one Arrow batch;
    ``np.asarray(ds["index"])`` would iterate a datasets 4 ``Column`` row by row.
    """
    with warnings.catch_warnings():
        # PathologicalPartitioner's own "classes will NOT be used" warning names a parameter
        # that does not exist (first_class_deterministic_assignment); partition_indices' is
        # accurate.
        warnings.filterwarnings("ignore", message=r"Classes: .* will NOT be used")
        # pyarrow >= 25 deprecates the null_placement that ShardPartitioner's sort passes on;
        # the labels have no nulls, so it changes nothing here.
        warnings.filterwarnings(
            "ignore", message=r"Specifying null_placement", category=FutureWarning
        )
        return [
            np.asarray(part.load_partition(i).with_format("numpy")["index"][:], dtype=np.int64)
            for i in range(part.num_partitions)
        ]


def _shuffled_table(labels: np.ndarray, seed: int) -> Dataset:
    """The in-memory ``index``/``label`` table, its rows in a seeded random order.

    The same permutation as ``Dataset.shuffle(seed=seed)`` (default_rng(seed).permutation),
    applied before building the table: no index map to flatten with ``map`` (~0.4 s), and the
    partitioners' full-column label reads take datasets' batched path.
    """
    order = np.random.default_rng(int(seed)).permutation(len(labels))
    return Dataset.from_dict({"index": order, "label": labels[order].astype(np.int64)})


def _split(
    part: Partitioner,
    partitioner: str,
    num_images: int,
    num_partitions: int,
    classes_per_partition: int,
    shards_per_partition: int,
) -> list[np.ndarray]:
    """:func:`_read_partitions`, a partitioner's ``ValueError`` restated with the config keys."""
    try:
        return _read_partitions(part)
    except ValueError as err:
        raise ValueError(
            f"partitioner '{partitioner}' cannot split {num_images} images into "
            f"num-partitions={num_partitions} (classes-per-partition="
            f"{classes_per_partition}, shards-per-partition={shards_per_partition}): {err}"
        ) from err


def _warn_left_out(num_images: int, parts: list[np.ndarray], num_partitions: int) -> None:
    """Warn when the pathological split left images out (fewer partitions than classes)."""
    left_out = num_images - sum(len(p) for p in parts)
    if left_out:
        warnings.warn(
            f"partitioner 'pathological': {left_out} of {num_images} images are in no "
            f"partition (num-partitions={num_partitions} is below the number of classes, "
            f"so some classes were drawn by no partition)",
            # 3: point at partition_indices' caller, past this helper.
            stacklevel=3,
        )


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioner: str,
    alpha: float,
    seed: int,
    *,
    classes_per_partition: int = 2,
    shards_per_partition: int = 2,
) -> list[np.ndarray]:
    """Indices into ``labels`` of each partition; the same arguments give the same split.

    Args:
        labels: 1-D integer labels of the training set; ``-1`` marks unlabelled images (then only
            ``iid`` is allowed). Labels only shape the split; they never reach training.
        num_partitions: Number of partitions, in ``[1, len(labels)]``.
        partitioner: One of :data:`PARTITIONERS`.
        alpha: Dirichlet concentration (``dirichlet`` only), > 0.
        seed: Seed (>= 0) of the table shuffle and of the partitioner's generator.
        classes_per_partition: Distinct classes per partition (``pathological`` only).
        shards_per_partition: Shards per partition (``shards`` only).

    Returns:
        ``num_partitions`` disjoint int64 index arrays. They cover every index for ``iid`` and
        ``dirichlet``; see the module docstring for what ``pathological`` and ``shards`` leave out.
        Partitions may be empty for ``dirichlet`` with small alpha.

    The index table is shuffled with ``seed`` first: flwr-datasets' IID partitioner takes
    contiguous blocks, and the label-based ones take contiguous runs within a class.
    """
    labels = np.asarray(labels)
    options = dict(
        classes_per_partition=classes_per_partition, shards_per_partition=shards_per_partition
    )
    validate_partition_args(labels, num_partitions, partitioner, alpha, seed, **options)
    table = _shuffled_table(labels, seed)
    part = make_partitioner(partitioner, num_partitions, alpha, seed, **options)
    part.dataset = table
    parts = _split(part, partitioner, len(labels), num_partitions, **options)
    if partitioner == "pathological":
        _warn_left_out(len(labels), parts, num_partitions)
    return parts
