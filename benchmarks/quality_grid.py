"""The quality benchmark's grid: which runs it makes, and each run with its post-hoc fine-tune.

A grid is ``{(algorithm, partition): [run, ...]}`` over seeds, one ``flwr run`` per (algorithm,
partition, seed) under the grid's lighter protocol (``GRID_EVALUATION``) in its own folder;
``centralized`` and ``random-init`` do not depend on the partition and run once per seed, keyed
``pooled``. ``benchmarks.quality`` reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.harness import (
    ALGORITHMS,
    EVALUATION,
    GRID_EVALUATION,
    PARTITION_FREE,
    PARTITIONS,
    ROOT,
    run_variant,
)
from benchmarks.label_efficiency import posthoc_record

# The grid's runs use the lighter GRID_EVALUATION protocol, so they live apart from the other
# studies' runs (outputs/bench/, full protocol).
GRID_OUT_ROOT = ROOT / "outputs" / "bench-grid"

# What the grid is sized for (a target, not a measurement: the report states the time it took).
GRID_MINUTES = 90
GRID_MACHINE = "2 CPU cores"
DEFAULT_SEEDS = (0, 1)

# The grid's short fine-tune ends under-trained (the report states its train and test accuracy),
# so the grid's backbones are also fine-tuned afterwards with the full recipe
# (`make bench-quality-finetune`; each fine-tune's seconds are cached beside its accuracy); the
# report shows it when present.
POSTHOC_FINETUNE_EPOCHS = EVALUATION["finetune-epochs"]
POSTHOC_KEY = "finetune-full-accuracy"
POSTHOC_RECORD = "posthoc-finetune"  # the run's cached post-hoc fine-tune record, if it ran

# Runs by (algorithm, partition), ``pooled`` for the partition-free algorithms.
Grid = dict[tuple[str, str], list[dict]]


def run_one(
    algorithm: str, partition: str, seed: int, out_root: Path, report_only: bool = False
) -> dict[str, Any] | None:
    """One run of the grid (loaded when it finished before; None if report-only and missing)."""
    run = run_variant(algorithm, partition, seed, out_root, "bench-quality", timeout=1800,
                      report_only=report_only, evaluation=GRID_EVALUATION)  # fmt: skip
    if run is not None:
        labels = GRID_EVALUATION["finetune-labels"]
        record = posthoc_record(out_root / run["name"], labels, POSTHOC_FINETUNE_EPOCHS)
        if record is not None:
            run["summary"][POSTHOC_KEY] = {algorithm: record["accuracy"]}
            run[POSTHOC_RECORD] = record
    return run


def grid_size(algorithms: list[str], partitions: list[str], seeds: list[int]) -> int:
    """Runs in a grid: partition-free algorithms once per seed, the others once per partition."""
    per_seed = sum(1 if a in PARTITION_FREE else len(partitions) for a in algorithms)
    return per_seed * len(seeds)


def run_grid(
    algorithms: list[str],
    partitions: list[str],
    seeds: list[int],
    out_root: Path,
    report_only: bool = False,
) -> Grid:
    """Every run of the grid, by (algorithm, partition); partition-free ones as ``pooled``."""
    grid: Grid = {}
    for seed in seeds:
        for algorithm in algorithms:
            for partition in ["iid"] if algorithm in PARTITION_FREE else partitions:
                key = (algorithm, "pooled" if algorithm in PARTITION_FREE else partition)
                run = run_one(algorithm, partition, seed, out_root, report_only)
                if run is not None:
                    grid.setdefault(key, []).append(run)
    return grid


def is_full_grid(
    grid: Grid, algorithms: list[str], partitions: list[str], seeds: list[int]
) -> bool:
    """Whether ``grid`` holds every run of the full grid (``make bench-quality``)."""
    return (
        set(algorithms) == set(ALGORITHMS)
        and set(partitions) == set(PARTITIONS)
        and len(set(seeds)) >= len(DEFAULT_SEEDS)
        and sum(len(runs) for runs in grid.values()) == grid_size(algorithms, partitions, seeds)
    )
