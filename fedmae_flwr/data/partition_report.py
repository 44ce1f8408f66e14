"""How a partition looks: sizes, label histograms, label entropy; as JSON and a PNG heat map.

The label counts and the heat map are flwr-datasets' (``flwr_datasets.metrics.compute_counts``,
``flwr_datasets.visualization.plot_label_distributions``), read through
:class:`ContiguousPartitioner`, which serves partitions already made.

Labels only describe the split here (how skewed the nodes are); they never reach training.
``-1`` marks an unlabelled image: such images count in the sizes but in no histogram.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features
from flwr_datasets.metrics import compute_counts
from flwr_datasets.partitioner import Partitioner
from flwr_datasets.visualization import plot_label_distributions
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedmae_flwr.atomic import atomic_write, atomic_write_text

# Above this many partitions the heat map shows the first ones only: one pixel-row per partition
# is unreadable, and summing neighbours would blur exactly the skew it shows.
MAX_HEATMAP_PARTITIONS = 100
# Cells are annotated with their count only while the numbers still fit.
MAX_ANNOTATED_CELLS = 20


class ContiguousPartitioner(Partitioner):
    """Partition ``i`` is the next ``sizes[i]`` rows of the dataset (empty partitions allowed).

    The form in which flwr-datasets' metrics and plots read a partition that was made elsewhere:
    the rows of each partition laid out one after the other. Contiguous rows load as a slice of
    the Arrow table, with no index mapping to hash or follow.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()

    @property
    def num_partitions(self) -> int:
        return len(self._offsets) - 1

    def load_partition(self, partition_id: int) -> Dataset:
        start, stop = self._offsets[partition_id], self._offsets[partition_id + 1]
        # datasets rejects an empty range starting at the end of the table; an empty list works.
        return self.dataset.select(range(start, stop) if stop > start else [])


def label_partitioner(labels_per_partition: list[np.ndarray], num_classes: int) -> Partitioner:
    """A partitioner over a ``label`` column (``ClassLabel``: every class counts, even at 0)."""
    partitioner = ContiguousPartitioner([len(labels) for labels in labels_per_partition])
    features = Features({"label": ClassLabel(num_classes=num_classes)})
    column = np.concatenate([np.empty(0, dtype=np.int64), *labels_per_partition])
    partitioner.dataset = Dataset.from_dict({"label": column}, features=features)
    return partitioner


def _entropy_bits(counts: np.ndarray) -> np.ndarray:
    """Shannon entropy (bits) of each row's distribution; rows must not sum to 0."""
    frequencies = counts / counts.sum(axis=-1, keepdims=True)  # compute_frequencies' rows
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(frequencies > 0, frequencies * np.log2(frequencies), 0.0).sum(axis=-1)


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
    if num_classes < 1 and (labels >= 0).any():  # unlabelled sources: num_classes 0, labels -1
        raise ValueError(f"num_classes must be >= 1 for labelled images, got {num_classes}")
    if labels.size and labels.max() >= num_classes:
        raise ValueError(f"labels go up to {labels.max()}, beyond num_classes={num_classes}")
    sizes = [len(p) for p in parts]
    assigned = np.concatenate([np.empty(0, dtype=np.int64), *parts]).astype(np.int64)
    labelled = bool((labels >= 0).any())
    stats = {
        "num-partitions": len(parts),
        "num-images": len(labels),
        "num-classes": int(num_classes),
        "labelled": labelled,
        "images-per-partition": sizes,
        "min-images": int(min(sizes, default=0)),
        "median-images": float(np.median(sizes)) if sizes else 0.0,
        "max-images": int(max(sizes, default=0)),
        "empty-partitions": sizes.count(0),
        "unassigned-images": int(len(labels) - len(np.unique(assigned))),
        "label-histogram": [],
        "mean-label-entropy": None,
        "global-label-entropy": None,
    }
    if not labelled:
        return stats
    everything = np.bincount(labels[labels >= 0], minlength=num_classes)
    stats["global-label-entropy"] = float(_entropy_bits(everything))
    if parts:
        part_labels = [labels[np.asarray(p, dtype=np.int64)] for p in parts]
        partitioner = label_partitioner([p[p >= 0] for p in part_labels], num_classes)
        counts = compute_counts(partitioner, "label").to_numpy(dtype=np.int64)
        stats["label-histogram"] = counts.tolist()
        nonempty = counts[counts.sum(axis=1) > 0]
        if len(nonempty):
            stats["mean-label-entropy"] = float(_entropy_bits(nonempty).mean())
    return stats


def _draw_label_heatmap(stats: dict, axis, rows: int) -> None:
    """The first ``rows`` rows of ``stats['label-histogram']``, by flwr-datasets' heat map."""
    histogram = np.asarray(stats["label-histogram"], dtype=np.int64)[:rows]
    classes = np.arange(histogram.shape[1])
    partitioner = label_partitioner([np.repeat(classes, row) for row in histogram], len(classes))
    entropy, overall = stats["mean-label-entropy"], stats["global-label-entropy"]
    title = "label counts" + (
        f"; mean label entropy {entropy:.2f} bits (all images: {overall:.2f})"
        if entropy is not None and overall is not None
        else ""
    )
    small = rows <= MAX_ANNOTATED_CELLS and len(classes) <= MAX_ANNOTATED_CELLS
    plot_label_distributions(
        partitioner,
        "label",
        plot_type="heatmap",
        partition_id_axis="y",
        axis=axis,
        title=title,
        cmap="viridis",
        legend=True,
        legend_title="images",
        verbose_labels=False,
        plot_kwargs={"annot": small},
    )
    axis.set_xlabel("class")


def save_partition_heatmap(stats: dict, path: str | Path) -> None:
    """Write a PNG: label counts (partitions x classes) beside the images per partition.

    With more than 100 partitions, the first 100 are drawn and the title says so; the size
    panel's caption still gives min/median/max over all partitions. Uses a standalone ``Figure``
    (no pyplot global state: safe in threads and servers). Creates the parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sizes = np.asarray(stats["images-per-partition"], dtype=np.int64)
    rows = min(len(sizes), MAX_HEATMAP_PARTITIONS)
    fig = Figure(figsize=(11, min(3.0 + 0.12 * rows, 16.0)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_map, ax_bar = fig.subplots(1, 2, sharey=True, width_ratios=(3, 1))
    if stats["label-histogram"]:
        _draw_label_heatmap(stats, ax_map, rows)
    else:
        ax_map.text(0.5, 0.5, "unlabelled data: no label histogram", ha="center",
                    va="center", transform=ax_map.transAxes)  # fmt: skip
        ax_map.set(title="label counts", xticks=[], ylim=(max(rows, 1), 0))
        ids = np.arange(0, rows, max(1, rows // 20))
        ax_map.set_yticks(ids + 0.5, [str(i) for i in ids])  # row centres, as in the heat map
    ax_map.set_ylabel("partition")
    # Bars on the heat map's row centres (seaborn puts row i at i + 0.5, top down).
    ax_bar.barh(np.arange(rows) + 0.5, sizes[:rows], height=0.8, color="tab:blue")
    ax_bar.set_xlabel("images")
    ax_bar.set_title(
        f"min {stats['min-images']}, median {stats['median-images']:g}, max {stats['max-images']}",
        fontsize=9,
    )
    ax_bar.tick_params(axis="y", labelleft=False)
    shown = f"{len(sizes)} partitions"
    if rows < len(sizes):
        shown = f"showing the first {rows} of {len(sizes)} partitions"
    extra = [
        f"{stats[key]} {what}"
        for key, what in (("empty-partitions", "empty"), ("unassigned-images", "images unassigned"))
        if stats.get(key)
    ]
    fig.suptitle(shown + (" - " + ", ".join(extra) if extra else ""))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def write_partition_report(folder: str | Path, stats: dict) -> None:
    """Write ``partitions.json`` (the stats) and ``partitions.png`` (the heat map) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # A resume compares its node count with this file: a torn one would pass unchecked.
    atomic_write_text(folder / "partitions.json", json.dumps(stats, indent=2) + "\n")
    save_partition_heatmap(stats, folder / "partitions.png")
