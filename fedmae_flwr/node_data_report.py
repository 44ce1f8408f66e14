"""What data the run's nodes train on, as the run's outputs describe it.

A simulation's nodes train on partitions the server computes itself, so ``partitions.json`` /
``partitions.png`` describe them before the first round (sizes, label histograms, entropy). A
deployed node reads its own folder, which the server never sees: there the description comes
from what the nodes report in their train replies (:class:`~fedmae_flwr.strategies.accounting.
NodeLedger`), written once the rounds are over.
"""

from __future__ import annotations

import json
import statistics
from logging import INFO
from typing import Any

from flwr.common import log
from flwr.serverapp import Grid

from fedmae_flwr.config import FedMAEConfig
from fedmae_flwr.data import DatasetSplits, partitions
from fedmae_flwr.data.partition_report import partition_stats, write_partition_report
from fedmae_flwr.run_outputs import RunOutputs
from fedmae_flwr.strategies import FedMAE
from fedmae_flwr.strategies.sampling import fixed_nodes


def report_partitions(
    cfg: FedMAEConfig, sim_nodes: int | None, splits: DatasetSplits, outputs: RunOutputs
) -> dict[str, Any]:
    """Write ``partitions.json`` + ``partitions.png`` for the simulation's partitioning.

    ``sim_nodes``: the simulation's node count, as
    :func:`~fedmae_flwr.simulation_nodes.check_simulation_nodes` found and checked it (at least
    one share, no more shares than training images); None on a deployment. The partition count
    is ``num-partitions`` or that node count, as each node computes it. Deployed nodes read
    their own folders, which the server cannot see: there :func:`report_node_data` writes
    ``partitions.json`` from what they report.
    """
    if sim_nodes is None:
        log(INFO, "Deployed nodes read their own data: partitions.json follows their reports")
        return {}
    num_partitions = cfg.data.num_partitions or sim_nodes
    parts = partitions(cfg, num_partitions)
    stats = partition_stats(
        splits.train.labels.numpy(), [p.numpy() for p in parts], splits.num_classes
    )
    stats["num-supernodes"] = sim_nodes  # what a resume must run on again (server_app)
    write_partition_report(outputs.dir, stats)
    keys = ("num-partitions", "min-images", "median-images", "max-images", "empty-partitions",
            "mean-label-entropy", "global-label-entropy")  # fmt: skip
    return {k: stats[k] for k in keys}


def is_simulation(grid: Grid) -> bool:
    """Whether the nodes train on the partitions the server computes (a simulation: Flower's
    InMemoryGrid, or a grid flagged ``simulated_partitions``); deployed nodes read their own."""
    return fixed_nodes(grid) or getattr(grid, "simulated_partitions", False)


def known_largest_partition(grid: Grid, partition_summary: dict[str, Any]) -> int | None:
    """The largest partition's image count in a simulation, else None: deployed nodes read
    their own folders, of sizes the server cannot know."""
    largest = partition_summary.get("max-images")
    return int(largest) if is_simulation(grid) and largest else None


def report_node_data(grid: Grid, strategy: FedMAE, outputs: RunOutputs) -> dict[str, Any]:
    """Each node's reported images and skipped files (``summary.json`` ``data.nodes``); on a
    deployment also ``partitions.json``, since only the devices know what they hold."""
    nodes = strategy.node_reports
    if not nodes and strategy.first_round > strategy.plan.num_rounds:
        # resumed after its last round: no node replied this time; keep what they said before
        return _earlier_node_data(outputs)
    if nodes and not is_simulation(grid):
        sizes = sorted(n["images"] for n in nodes.values())
        outputs.write_json("partitions.json", {
            "source": "reported by the nodes (num-examples, skipped-images of train replies)",
            "num-partitions": len(sizes), "min-images": sizes[0],
            "median-images": float(statistics.median(sizes)), "max-images": sizes[-1],
            "skipped-images": sum(n["skipped-images"] for n in nodes.values()), "nodes": nodes,
        })  # fmt: skip
    return nodes


def _earlier_node_data(outputs: RunOutputs) -> dict[str, Any]:
    """``data.nodes`` of the summary the run wrote before (empty where it has none)."""
    try:
        return json.loads((outputs.dir / "summary.json").read_text())["data"]["nodes"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
