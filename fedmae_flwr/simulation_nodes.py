"""What a simulation's node count must satisfy for a config, checked before any round.

A Flower simulation registers all ``num-supernodes`` virtual nodes as it starts and none joins
later, so a config that needs more nodes than that, or more nodes than there are images to
share, can only fail: a round would wait ``node-wait-timeout`` for nodes that never come, or
every node would fail on an empty share. ``scripts/run.py`` checks its ``--num-supernodes``
before starting anything; the ServerApp checks the nodes it finds (any ``flwr run``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import WARNING

from flwr.common import log
from flwr.serverapp import Grid

from fedmae_flwr.config import FEDERATED, ConfigError, FedMAEConfig

# Flower starts the ServerApp's thread just before it registers the virtual nodes, one by one.
REGISTRATION_WAIT_S = 10.0
# The count is read once it has not grown for this long (a check in between saw 1 of 8 nodes).
REGISTRATION_SETTLE_S = 1.0


def simulation_problem(
    cfg: FedMAEConfig, num_nodes: int, train_images: int | None = None
) -> str | None:
    """Why ``cfg`` cannot run on a simulation of ``num_nodes`` nodes (None: it can).

    ``train_images``: the size of the training split the nodes share, where known.
    """
    if num_nodes < 1:
        return f"the simulation has {num_nodes} virtual nodes: num-supernodes must be >= 1"
    schedule = cfg.schedule
    federated = cfg.algorithm in FEDERATED
    waits_for = schedule.min_available_clients or schedule.clients_per_round
    if federated and num_nodes < waits_for:
        lower = (
            "lower min-available-clients"
            if schedule.min_available_clients > schedule.clients_per_round
            else f"lower clients-per-round (or set min-available-clients <= {num_nodes} to "
            "train on fewer)"
        )
        return (
            f"a round waits for {waits_for} nodes (run-config clients-per-round="
            f"{schedule.clients_per_round}, min-available-clients="
            f"{schedule.min_available_clients}) but the simulation has {num_nodes} "
            f"(num-supernodes), and none joins later: raise num-supernodes to >= {waits_for}, "
            f"or {lower}"
        )
    shares = cfg.data.num_partitions or num_nodes
    # Only federated runs give each node a share; the baselines train on the server.
    if federated and cfg.data.num_partitions and num_nodes > shares:
        return (
            f"num-partitions={shares} splits the data into {shares} shares, one per node, but "
            f"the simulation has {num_nodes} nodes (num-supernodes): nodes {shares}.."
            f"{num_nodes - 1} would have none. Set num-partitions=0 (one share per node) or "
            f">= {num_nodes}"
        )
    if train_images is not None and shares > train_images:
        return (
            f"{shares} shares of {train_images} training images leave some node without an "
            f"image: run <= {train_images} nodes (num-supernodes) or num-partitions"
        )
    return None


def registered_nodes(
    grid: Grid,
    wait: float = REGISTRATION_WAIT_S,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    settle: float = REGISTRATION_SETTLE_S,
) -> int:
    """How many virtual nodes a simulation's grid has: waiting up to ``wait`` s for the first
    to be registered, then until the count has not grown for ``settle`` s (Flower registers
    them one by one while the ServerApp starts)."""
    give_up = clock() + wait
    count, since = len(list(grid.get_node_ids())), clock()
    while clock() < give_up and not (count and clock() - since >= settle):
        sleep(0.5)
        if (now := len(list(grid.get_node_ids()))) != count:
            count, since = now, clock()
    return count


def check_simulation_nodes(cfg: FedMAEConfig, grid: Grid, train_images: int) -> int:
    """The number of nodes of the simulation behind ``grid``; ConfigError when it cannot run
    ``cfg`` (:func:`simulation_problem`)."""
    num_nodes = registered_nodes(grid)
    if (problem := simulation_problem(cfg, num_nodes, train_images)) is not None:
        raise ConfigError(f"FedMAE: {problem}.")
    shares = cfg.data.num_partitions
    if cfg.algorithm in FEDERATED and shares > num_nodes:  # allowed: smaller shares per node
        log(WARNING, "num-partitions=%d splits the images into %d shares, but the simulation "
            "has %d nodes: shares %d..%d are never trained on (num-partitions=0 gives one "
            "share per node)", shares, shares, num_nodes, num_nodes, shares - 1)  # fmt: skip
    return num_nodes
