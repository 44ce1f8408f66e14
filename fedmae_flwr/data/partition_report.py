"""How a partition looks: sizes, label histograms, label entropy; as JSON and a PNG heat map.

Labels only describe the split here (how skewed the nodes are); they never reach training.
``-1`` marks an unlabelled image: such images count in the sizes but in no histogram.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Above this many partitions the heat map shows an evenly spaced subset of rows: one pixel-row
# per partition is unreadable, and summing neighbours would blur exactly the skew it shows.
MAX_HEATMAP_PARTITIONS = 100
# Cells are annotated with their count only while the numbers still fit.
MAX_ANNOTATED_CELLS = 20


def _entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy (bits) of the distribution given by ``counts`` (not all zero)."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def partition_stats(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> dict:
    """Summary of a partition of ``labels`` into ``parts`` (index arrays), JSON-ready.

    Keys (kebab-case, like the config):

    - ``num-partitions``, ``num-images`` (``len(labels)``), ``num-classes``, ``labelled``;
    - ``images-per-partition`` (list), ``min-images``, ``median-images``, ``max-images``,
      ``empty-partitions``;
    - ``unassigned-images``: images in no partition (``shards`` drops a remainder);
    - ``label-histogram``: partitions x classes counts (``[]`` when unlabelled);
    - ``mean-label-entropy``: bits, mean over partitions holding at least one labelled image of
      the entropy of their label distribution (``None`` when unlabelled);
    - ``global-label-entropy``: bits, of all labelled images together (``None`` when unlabelled).

    IID partitions have a mean entropy near the global one (``log2(num_classes)`` for balanced
    classes); label skew lowers it (0 for one class per partition).
    """
    labels = np.asarray(labels)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"labels go up to {labels.max()}, beyond num_classes={num_classes}")
    sizes = [len(p) for p in parts]
    assigned = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    labelled = bool((labels >= 0).any())

    histogram: list[list[int]] = []
    entropies: list[float] = []
    global_entropy: float | None = None
    if labelled:
        for p in parts:
            part_labels = labels[np.asarray(p, dtype=np.int64)]
            counts = np.bincount(part_labels[part_labels >= 0], minlength=num_classes)
            histogram.append(counts.tolist())
            if counts.sum() > 0:
                entropies.append(_entropy_bits(counts))
        global_entropy = _entropy_bits(np.bincount(labels[labels >= 0], minlength=num_classes))

    return {
        "num-partitions": len(parts),
        "num-images": len(labels),
        "num-classes": int(num_classes),
        "labelled": labelled,
        "images-per-partition": sizes,
        "min-images": int(min(sizes)) if sizes else 0,
        "median-images": float(np.median(sizes)) if sizes else 0.0,
        "max-images": int(max(sizes)) if sizes else 0,
        "empty-partitions": sum(1 for s in sizes if s == 0),
        "unassigned-images": int(len(labels) - len(np.unique(assigned))),
        "label-histogram": histogram,
        "mean-label-entropy": float(np.mean(entropies)) if entropies else None,
        "global-label-entropy": global_entropy,
    }


def _shown_rows(num_partitions: int) -> np.ndarray:
    """Partition ids drawn in the heat map: all, or at most 100 evenly spaced ones."""
    if num_partitions <= MAX_HEATMAP_PARTITIONS:
        return np.arange(num_partitions)
    return np.unique(np.linspace(0, num_partitions - 1, MAX_HEATMAP_PARTITIONS).round().astype(int))


def save_partition_heatmap(stats: dict, path: str | Path) -> None:
    """Write a PNG: label counts (partitions x classes) beside the images per partition.

    With more than 100 partitions, 100 evenly spaced partitions are drawn and the title says
    so; the size panel's caption still gives min/median/max over all partitions. Uses a
    standalone ``Figure`` (no pyplot global state: safe in threads and servers). Creates the
    parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = np.asarray(stats["images-per-partition"], dtype=np.int64)
    num_partitions = len(sizes)
    rows = _shown_rows(num_partitions)
    histogram = np.asarray(stats["label-histogram"], dtype=np.int64)

    height = min(3.0 + 0.12 * len(rows), 16.0)
    fig = Figure(figsize=(11, height), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=(3, 1))
    ax_map = fig.add_subplot(grid[0, 0])
    ax_bar = fig.add_subplot(grid[0, 1], sharey=ax_map)

    if histogram.size:
        shown = histogram[rows]
        image = ax_map.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax_map, label="images", location="left", shrink=0.8)
        ax_map.set_xticks(range(shown.shape[1]))
        ax_map.set_xlabel("class")
        if len(rows) <= MAX_ANNOTATED_CELLS and shown.shape[1] <= MAX_ANNOTATED_CELLS:
            # Text colour flips on bright cells so every count stays legible.
            threshold = shown.max() / 2 if shown.max() else 1
            for (r, c), count in np.ndenumerate(shown):
                colour = "black" if count > threshold else "white"
                ax_map.text(c, r, str(count), ha="center", va="center", fontsize=7, color=colour)
        entropy = stats.get("mean-label-entropy")
        glob = stats.get("global-label-entropy")
        ax_map.set_title(
            f"label counts; mean label entropy {entropy:.2f} bits (all images: {glob:.2f})"
            if entropy is not None and glob is not None
            else "label counts"
        )
    else:
        ax_map.text(
            0.5,
            0.5,
            "unlabelled data: no label histogram",
            ha="center",
            va="center",
            transform=ax_map.transAxes,
        )
        ax_map.set_xticks([])
        ax_map.set_title("label counts")
    ax_map.set_ylabel("partition")
    tick_step = max(1, len(rows) // 20)
    ax_map.set_yticks(range(0, len(rows), tick_step), [str(r) for r in rows[::tick_step]])

    ax_bar.barh(range(len(rows)), sizes[rows], height=0.8, color="tab:blue")
    ax_bar.set_xlabel("images")
    ax_bar.set_title(
        f"min {stats['min-images']}, median {stats['median-images']:g}, max {stats['max-images']}",
        fontsize=9,
    )
    ax_bar.tick_params(axis="y", labelleft=False)
    if len(rows) > 0 and not histogram.size:
        ax_bar.set_ylim(len(rows) - 0.5, -0.5)  # top-down like the heat map rows

    shown_note = (
        f"{num_partitions} partitions"
        if len(rows) == num_partitions
        else f"showing {len(rows)} of {num_partitions} partitions (evenly spaced ids)"
    )
    extra = []
    if stats.get("empty-partitions"):
        extra.append(f"{stats['empty-partitions']} empty")
    if stats.get("unassigned-images"):
        extra.append(f"{stats['unassigned-images']} images unassigned")
    fig.suptitle(shown_note + (" - " + ", ".join(extra) if extra else ""))
    fig.savefig(path, dpi=100)


def _jsonable(value: Any) -> Any:
    """NumPy scalars/arrays to plain Python, so ``json`` accepts any stats dict."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_partition_report(folder: str | Path, stats: dict) -> None:
    """Write ``partitions.json`` (the stats) and ``partitions.png`` (the heat map) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "partitions.json").write_text(json.dumps(_jsonable(stats), indent=2) + "\n")
    save_partition_heatmap(stats, folder / "partitions.png")
