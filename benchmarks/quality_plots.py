"""The quality benchmark's plots: accuracy against rounds and bytes, reconstructions side by side.

Each function draws from a grid of runs (``{(algorithm, partition): [run, ...]}``, as
``benchmarks.quality`` builds it) into ``docs`` and returns the file name it wrote.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    GRID_EVALUATION,
    PARTITION_FREE,
    accuracies,
    count_text,
    pyplot,
    save_figure,
)
from benchmarks.quality_grid import Grid


def plot(grid: Grid, docs: Path, out_root: Path) -> list[str]:
    """Accuracy against rounds, accuracy against bytes, reconstructions side by side."""
    written = [accuracy_vs_rounds(grid, docs), accuracy_vs_bytes(grid, docs)]
    reconstructions = plot_reconstructions(grid, docs, out_root)
    return written + ([reconstructions] if reconstructions else [])


def knn_curve(runs: list[dict]) -> tuple[list[int], list[float]]:
    """The rounds at which the runs measured k-NN accuracy, and its mean over the runs."""
    rounds = [row["round"] for row in runs[0]["rows"] if "knn-accuracy" in row]
    series = [[row["knn-accuracy"] for row in r["rows"] if "knn-accuracy" in row] for r in runs]
    return rounds, [statistics.fmean(v) for v in zip(*series, strict=True)]


def random_init_knn(grid: Grid) -> float | None:
    """Random init's mean final k-NN accuracy, the floor the curves are drawn against."""
    floor = [r for (a, _), rs in grid.items() if a == "random-init" for r in rs]
    if not floor:
        return None
    return statistics.fmean(accuracies(floor, "knn-accuracy", "random-init"))


def _rounds_panel(ax: Any, grid: Grid, partition: str) -> None:
    """One partition's k-NN curves (pooled rows included) against the random-init level."""
    for (algorithm, part), runs in grid.items():
        if part not in (partition, "pooled") or algorithm == "random-init":
            continue
        ax.plot(*knn_curve(runs), marker="o", label=algorithm)
    level = random_init_knn(grid)
    if level is not None:
        ax.axhline(level, color="0.5", ls="--", label="random-init")
    knn_labels = count_text(GRID_EVALUATION["stage-knn-images"])
    ax.set(title=f"{partition}", xlabel="server round", ylabel=f"k-NN top-1 ({knn_labels} labels)")
    ax.legend(fontsize=7)


def accuracy_vs_rounds(grid: Grid, docs: Path) -> str:
    """k-NN accuracy against server rounds, one panel per partition."""
    plt = pyplot()
    partitions = sorted({p for _, p in grid if p != "pooled"}) or ["pooled"]
    fig, axes = plt.subplots(
        1, len(partitions), figsize=(4.5 * len(partitions), 3.6), squeeze=False
    )
    for ax, partition in zip(axes[0], partitions, strict=True):
        _rounds_panel(ax, grid, partition)
    name = "results-accuracy-vs-rounds.png"
    save_figure(fig, docs / name)
    return name


def mbytes_communicated(runs: list[dict]) -> float:
    """Mean MB the runs sent over the whole run, up and down, all clients."""
    return statistics.fmean(
        (r["summary"]["communication"]["bytes-up-total"]
         + r["summary"]["communication"]["bytes-down-total"]) / 2**20 for r in runs
    )  # fmt: skip


def accuracy_vs_bytes(grid: Grid, docs: Path) -> str:
    """Linear-probe accuracy against bytes communicated, one point per federated row."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (algorithm, partition), runs in grid.items():
        if algorithm in PARTITION_FREE:
            continue
        acc = statistics.fmean(accuracies(runs, "linear-probe-accuracy", algorithm))
        ax.scatter(mbytes_communicated(runs), 100 * acc, label=f"{algorithm} ({partition})")
    ax.set(xlabel="MB communicated over the run (up + down, all clients)",
           ylabel="linear probe top-1 (%)", title="Accuracy against communication")  # fmt: skip
    ax.legend(fontsize=7)
    name = "results-accuracy-vs-bytes.png"
    save_figure(fig, docs / name)
    return name


def plot_reconstructions(grid: Grid, docs: Path, out_root: Path) -> str | None:
    """Each IID (or pooled) row's last-stage reconstructions side by side (None: no row has)."""
    import matplotlib.image as mpimg

    pictures = [
        (algorithm, runs[0])
        for (algorithm, partition), runs in grid.items()
        if partition in ("iid", "pooled") and runs[0]["summary"]["stages"]
    ]
    if not pictures:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(pictures), figsize=(3.2 * len(pictures), 6), squeeze=False)
    for ax, (algorithm, r) in zip(axes[0], pictures, strict=True):
        last = len(r["summary"]["stages"]) - 1
        image = out_root / r["name"] / "reconstructions"
        ax.imshow(mpimg.imread(image / f"stage-{last}.png"))
        ax.set_title(algorithm, fontsize=9)
        ax.axis("off")
    name = "results-reconstructions.png"
    save_figure(fig, docs / name)
    return name
