"""The quality benchmark's grid: which runs it makes, and each run with its post-hoc fine-tune.

A grid is ``{(algorithm, partition): [run, ...]}`` over seeds, one ``flwr run`` per (algorithm,
partition, seed) under the grid's lighter protocol (``GRID_EVALUATION``) in its own folder;
``centralized`` and ``random-init`` do not depend on the partition and run once per seed, keyed
``pooled``. The runs fine-tune nothing; their fine-tune value is ``benchmarks.grid_finetune``'s
(``FINETUNE_PROTOCOL`` on the exported backbone, cached beside the run), when it ran.
``benchmarks.quality`` reports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.grid_finetune import read_cache
from benchmarks.harness import (
    ALGORITHMS,
    GRID_EVALUATION,
    PARTITION_FREE,
    PARTITIONS,
    ROOT,
    run_variant,
)

# The grid's runs use the lighter GRID_EVALUATION protocol, so they live apart from the other
# studies' runs (outputs/bench/, full protocol).
GRID_OUT_ROOT = ROOT / "outputs" / "bench-grid"

GRID_MACHINE = "2 CPU cores"
DEFAULT_SEEDS = (0, 1, 2)

# The fine-tune under FINETUNE_PROTOCOL (benchmarks.grid_finetune, `make bench-quality-finetune`):
# its top-1 (the mean over label subsets) under this summary key, and its cached record (result
# with per-subset values and std, seconds, machine, protocol) under this run key, when it ran.
FINETUNE_KEY = "finetune-protocol-accuracy"
FINETUNE_RECORD = "finetune-protocol"

# Runs by (algorithm, partition), ``pooled`` for the partition-free algorithms.
Grid = dict[tuple[str, str], list[dict]]


def run_one(
    algorithm: str, partition: str, seed: int, out_root: Path, report_only: bool = False
) -> dict[str, Any] | None:
    """One run of the grid (loaded when it finished before; None if report-only and missing)."""
    run = run_variant(algorithm, partition, seed, out_root, "bench-quality", timeout=1800,
                      report_only=report_only, evaluation=GRID_EVALUATION)  # fmt: skip
    return None if run is None else with_finetune(run, out_root)


def with_finetune(run: dict[str, Any], out_root: Path) -> dict[str, Any]:
    """``run`` with its cached protocol fine-tune (``FINETUNE_KEY``, ``FINETUNE_RECORD``) when
    ``benchmarks.grid_finetune`` has fine-tuned it; as it is otherwise."""
    if (record := read_cache(out_root / run["name"])) is not None:
        run["summary"][FINETUNE_KEY] = {run["algorithm"]: finetune_result(record)["accuracy"]}
        run[FINETUNE_RECORD] = record
    return run


def finetune_result(record: dict[str, Any]) -> dict[str, Any]:
    """The one backbone's result in a ``finetune-protocol.json`` record: ``accuracy`` (mean over
    the subsets), ``accuracy_std`` and ``subsets`` (each subset's own result)."""
    (result,) = record["results"].values()
    return result


def finetune_subsets(run: dict[str, Any]) -> list[float]:
    """The run's per-subset fine-tune test top-1 (empty when it was not fine-tuned)."""
    record = run.get(FINETUNE_RECORD)
    if record is None:
        return []
    result = finetune_result(record)
    return [s["accuracy"] for s in result.get("subsets", [])] or [result["accuracy"]]


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
