"""Partitioners (flwr-datasets behind fedmae_flwr.data.partition) and the partition report.

Synthetic labels only: 6,000 images over 10 balanced classes, 20 partitions (300 images each
for IID). No images, no Flower run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedmae_flwr.data.partition import PARTITIONERS, partition_indices
from fedmae_flwr.data.partition_report import (
    ContiguousPartitioner,
    label_partitioner,
    partition_stats,
    save_partition_heatmap,
    write_partition_report,
)

N = 6_000
NUM_CLASSES = 10
NUM_PARTITIONS = 20
LOG2_CLASSES = math.log2(NUM_CLASSES)  # 3.32 bits: entropy of a balanced 10-class partition
# Arguments per partitioner; 6,000 = 20 partitions x 2 shards x 150, so shards drop nothing here.
KWARGS = {
    "iid": {},
    "dirichlet": {},
    "pathological": {"classes_per_partition": 2},
    "shards": {"shards_per_partition": 2},
}


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """Exactly 600 images per class, in a seeded random order."""
    return np.random.default_rng(0).permutation(np.arange(N) % NUM_CLASSES)


def split(labels: np.ndarray, name: str, seed: int = 0, alpha: float = 0.5, **kw) -> list:
    return partition_indices(labels, NUM_PARTITIONS, name, alpha, seed, **{**KWARGS[name], **kw})


def mean_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return partition_stats(labels, parts, NUM_CLASSES)["mean-label-entropy"]


def test_partitioners_listed() -> None:
    assert PARTITIONERS == ("iid", "dirichlet", "pathological", "shards")


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partition_is_disjoint_cover_and_seeded(labels: np.ndarray, name: str) -> None:
    parts = split(labels, name, seed=3)
    assert len(parts) == NUM_PARTITIONS
    assert all(p.dtype == np.int64 for p in parts)
    # Sizes sum to N and the union is every index exactly once: disjoint and covering.
    assert sum(len(p) for p in parts) == N
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(N))
    # Same arguments, same split (order within each partition included).
    again = split(labels, name, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    # Another seed, another split.
    other = split(labels, name, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


# sha256 (first 16 hex) of the partitions of the module's labels, 20 partitions, alpha 0.5, seed 3:
# the values the project has produced since partitions came from flwr-datasets 0.6.1. A change
# means a library upgrade or our code moved images between nodes: say so, then update.
GOLDEN = {
    "iid": "a1405ac161b903a7",
    "dirichlet": "b5b01ca52df59e0a",
    "pathological": "ba653f09febea5ca",
    "shards": "f5eadb959870c857",
}


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitions_are_the_recorded_ones(labels: np.ndarray, name: str) -> None:
    parts = split(labels, name, seed=3)
    digest = hashlib.sha256(b"".join(p.tobytes() + b"|" for p in parts)).hexdigest()[:16]
    assert digest == GOLDEN[name]


def test_iid_sizes_and_entropy(labels: np.ndarray) -> None:
    parts = split(labels, "iid")
    assert {len(p) for p in parts} == {N // NUM_PARTITIONS}
    # 300 images over 10 classes: sampling noise and the plug-in estimator's bias
    # (~(10 - 1) / (2 * 300 * ln 2) = 0.02 bit) keep IID within 0.1 bit of log2(10).
    assert mean_entropy(labels, parts) == pytest.approx(LOG2_CLASSES, abs=0.1)


def test_dirichlet_alpha_controls_skew(labels: np.ndarray) -> None:
    iid = mean_entropy(labels, split(labels, "iid"))
    skewed = mean_entropy(labels, split(labels, "dirichlet", alpha=0.1))
    mild = mean_entropy(labels, split(labels, "dirichlet", alpha=100.0))
    # alpha = 0.1: most of a class lands on a few nodes; at least 1 bit below IID (measured:
    # 1.43 bits per node against 3.31 at seed 0; 1.19-1.55 over seeds 0-4).
    assert skewed <= iid - 1.0, (skewed, iid)
    # alpha = 100: proportions within ~10 % of even; within 0.1 bit of IID.
    assert mild == pytest.approx(iid, abs=0.1)


def test_pathological_has_k_classes_per_partition(labels: np.ndarray) -> None:
    for k in (1, 2, 3):
        parts = split(labels, "pathological", classes_per_partition=k)
        distinct = [len(np.unique(labels[p])) for p in parts]
        assert max(distinct) <= k, distinct
        assert min(distinct) >= 1


def test_shards_drop_only_the_remainder(labels: np.ndarray) -> None:
    """Shard size floor(N / (P * s)); the remainder N mod (P * s) is in no partition."""
    n = N + 7  # 6,007 = 20 x 2 x 150 + 7
    more = np.concatenate([labels, np.arange(7) % NUM_CLASSES])
    parts = partition_indices(more, NUM_PARTITIONS, "shards", 0.5, 0, shards_per_partition=2)
    assert {len(p) for p in parts} == {300}
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) == n - 7
    stats = partition_stats(more, parts, NUM_CLASSES)
    assert stats["unassigned-images"] == 7
    # Shards are runs of the label-sorted table: 2 shards of 150 hold at most 4 labels.
    assert max(len(np.unique(more[p])) for p in parts) <= 4


def test_pathological_with_fewer_partitions_than_classes_warns(labels: np.ndarray) -> None:
    with pytest.warns(UserWarning, match="in no partition"):
        parts = partition_indices(labels, 3, "pathological", 0.5, 0, classes_per_partition=2)
    assert sum(len(p) for p in parts) < N


def test_unlabelled_data_only_iid() -> None:
    unlabelled = np.full(500, -1)
    parts = partition_indices(unlabelled, 5, "iid", 0.5, 0)
    assert sum(len(p) for p in parts) == 500
    for name in ("dirichlet", "pathological", "shards"):
        with pytest.raises(ValueError, match=rf"'{name}'.*only 'iid' works without labels"):
            partition_indices(unlabelled, 5, name, 0.5, 0)


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, "iid", 0.5, 0), {}, r"num-partitions must be in \[1, 6000\].*got 0"),
        ((N + 1, "iid", 0.5, 0), {}, r"num-partitions must be in \[1, 6000\].*got 6001"),
        ((5, "nope", 0.5, 0), {}, r"partitioner: unknown 'nope'. Allowed: iid, dirichlet"),
        ((5, "dirichlet", 0.0, 0), {}, r"dirichlet-alpha must be a number in \(0, inf\)"),
        ((5, "dirichlet", float("nan"), 0), {}, r"dirichlet-alpha"),
        ((5, "iid", 0.5, -1), {}, r"seed must be an integer >= 0"),
        (
            (5, "pathological", 0.5, 0),
            {"classes_per_partition": 11},
            r"classes-per-partition must be in \[1, 10\].*got 11",
        ),
        (
            (5, "pathological", 0.5, 0),
            {"classes_per_partition": 0},
            r"classes-per-partition must be in \[1, 10\]",
        ),
        (
            (1000, "shards", 0.5, 0),
            {"shards_per_partition": 7},
            r"shards-per-partition must be in \[1, 6\].*got 7",
        ),
    ],
)
def test_invalid_arguments_name_the_key(
    labels: np.ndarray, args: tuple, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        partition_indices(labels, *args, **kwargs)


def test_unused_arguments_are_not_checked(labels: np.ndarray) -> None:
    """An IID run does not fail on a Dirichlet alpha or k it never uses."""
    parts = partition_indices(labels, 4, "iid", 0.0, 0, classes_per_partition=99)
    assert len(parts) == 4


def test_same_split_in_a_fresh_process_without_writing_files(
    labels: np.ndarray, tmp_path: Path
) -> None:
    """No dependence on PYTHONHASHSEED; no cache files, temp files or progress bars."""
    script = (
        "import hashlib, numpy as np\n"
        "from fedmae_flwr.data.partition import PARTITIONERS, partition_indices\n"
        f"labels = np.random.default_rng(0).permutation(np.arange({N}) % {NUM_CLASSES})\n"
        "for name in PARTITIONERS:\n"
        f"    parts = partition_indices(labels, {NUM_PARTITIONS}, name, 0.5, 0)\n"
        "    h = hashlib.sha256(b''.join(p.tobytes() + b'|' for p in parts)).hexdigest()\n"
        "    print(name, h)\n"
    )
    dirs = {key: tmp_path / key.lower() for key in ("HF_HOME", "TMPDIR", "CWD")}
    for folder in dirs.values():
        folder.mkdir()
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONHASHSEED": "12345",
        "HF_HOME": str(dirs["HF_HOME"]),
        "HF_DATASETS_CACHE": str(dirs["HF_HOME"] / "datasets"),
        "TMPDIR": str(dirs["TMPDIR"]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=dirs["CWD"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    expected = ""
    for name in PARTITIONERS:
        parts = partition_indices(labels, NUM_PARTITIONS, name, 0.5, 0)
        digest = hashlib.sha256(b"".join(p.tobytes() + b"|" for p in parts)).hexdigest()
        expected += f"{name} {digest}\n"
    assert done.stdout == expected
    assert "it/s]" not in done.stderr and "%|" not in done.stderr, done.stderr
    for key, folder in dirs.items():
        assert not any(folder.iterdir()), f"{key}: {sorted(folder.rglob('*'))}"


def test_stats_on_hand_built_partitions(tmp_path: Path) -> None:
    labels = np.array([0, 1, 0, 1, 2, 2, 2, 2])
    parts = [np.array([0, 1, 2, 3]), np.array([4, 5, 6, 7])]  # 50/50 classes 0+1; pure class 2
    stats = partition_stats(labels, parts, num_classes=3)
    assert stats["images-per-partition"] == [4, 4]
    assert (stats["min-images"], stats["median-images"], stats["max-images"]) == (4, 4.0, 4)
    assert stats["label-histogram"] == [[2, 2, 0], [0, 0, 4]]
    assert stats["empty-partitions"] == 0
    assert stats["unassigned-images"] == 0
    # Entropies 1.0 bit (50/50) and 0 (pure) -> mean 0.5; overall 2/8, 2/8, 4/8 -> 1.5 bits.
    assert stats["mean-label-entropy"] == pytest.approx(0.5)
    assert stats["global-label-entropy"] == pytest.approx(1.5)
    one = partition_stats(labels, [parts[0]], num_classes=3)
    assert one["mean-label-entropy"] == pytest.approx(1.0)
    pure = partition_stats(labels, [parts[1]], num_classes=3)
    assert pure["mean-label-entropy"] == 0.0

    # An empty partition counts in sizes and empty-partitions, not in the mean entropy.
    with_empty = partition_stats(labels, [*parts, np.array([], dtype=np.int64)], num_classes=3)
    assert with_empty["empty-partitions"] == 1
    assert with_empty["min-images"] == 0
    assert with_empty["mean-label-entropy"] == pytest.approx(0.5)

    png = tmp_path / "deep" / "folder" / "heat.png"
    save_partition_heatmap(stats, png)
    with Image.open(png) as image:
        image.verify()
        assert image.format == "PNG"


def test_contiguous_partitioner_serves_given_sizes_even_empty() -> None:
    partitioner = label_partitioner(
        [np.array([], dtype=np.int64), np.array([2, 0]), np.array([], dtype=np.int64)], 3
    )
    assert isinstance(partitioner, ContiguousPartitioner) and partitioner.num_partitions == 3
    assert [len(partitioner.load_partition(i)) for i in range(3)] == [0, 2, 0]
    assert partitioner.load_partition(1)["label"][:] == [2, 0]


def test_stats_partly_labelled_and_no_partitions() -> None:
    labels = np.array([0, 1, -1, 2, 2, -1])
    stats = partition_stats(labels, [np.array([0, 1, 2]), np.array([3, 4, 5])], num_classes=3)
    assert stats["labelled"] is True
    assert stats["label-histogram"] == [[1, 1, 0], [0, 0, 2]]  # -1 counts in no histogram
    assert stats["images-per-partition"] == [3, 3]
    assert stats["mean-label-entropy"] == pytest.approx(0.5)
    none = partition_stats(labels, [], num_classes=3)
    assert none["label-histogram"] == [] and none["mean-label-entropy"] is None
    assert none["global-label-entropy"] == pytest.approx(1.5)


def test_stats_unlabelled() -> None:
    # num_classes 0, as an unlabelled source gives it (10 before: a flat folder's run failed)
    stats = partition_stats(np.full(10, -1), [np.arange(6), np.arange(6, 10)], num_classes=0)
    assert stats["labelled"] is False
    assert stats["label-histogram"] == []
    assert stats["mean-label-entropy"] is None
    assert stats["images-per-partition"] == [6, 4]


def test_report_files_for_many_partitions(labels: np.ndarray, tmp_path: Path) -> None:
    """1,000 partitions: JSON round-trips, the PNG (100 rows drawn) opens."""
    parts = partition_indices(labels, 1000, "dirichlet", 0.1, 0)
    stats = partition_stats(labels, parts, NUM_CLASSES)
    write_partition_report(tmp_path / "report", stats)
    loaded = json.loads((tmp_path / "report" / "partitions.json").read_text())
    assert loaded["num-partitions"] == 1000
    assert len(loaded["label-histogram"]) == 1000
    assert sum(loaded["images-per-partition"]) == N
    with Image.open(tmp_path / "report" / "partitions.png") as image:
        assert image.format == "PNG"
        assert image.size[0] > 500 and image.size[1] > 500

    unlabelled = np.full(50, -1)
    stats = partition_stats(unlabelled, partition_indices(unlabelled, 5, "iid", 0.5, 0), 10)
    write_partition_report(tmp_path / "unlabelled", stats)
    with Image.open(tmp_path / "unlabelled" / "partitions.png") as image:
        assert image.format == "PNG"
