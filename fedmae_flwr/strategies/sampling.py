"""Seeded node sampling with a bounded wait for enough connected nodes.

Flower's own sampling draws from node ids in arrival order with an unseeded ``random``; here a
round's sample depends only on ``(seed, kind, round)`` and the order of the nodes it draws from:
the strategy orders them by key (:mod:`.node_keys`), not by Flower's random ids, so another run
or a resumed run at the same seed samples as the first did.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection
from logging import INFO

from flwr.common import log
from flwr.serverapp import Grid


def wait_for_nodes(
    grid: Grid,
    wanted: int,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    excluded: Collection[int] = (),
) -> list[int]:
    """The sorted ids of connected nodes not in ``excluded`` once at least ``wanted`` are;
    re-checks every second.

    Raises:
        RuntimeError: fewer than ``wanted`` such nodes after ``timeout`` seconds.
    """
    deadline = clock() + timeout
    while len(nodes := sorted(n for n in grid.get_node_ids() if n not in excluded)) < wanted:
        left = deadline - clock()
        if left <= 0:
            dropped = len(set(grid.get_node_ids()) & set(excluded))
            why_fewer = (
                f" ({dropped} more connected but excluded: they replied that they cannot take "
                "part, see the log for why)"
                if dropped
                else ""
            )
            raise RuntimeError(
                f"FedMAE: {len(nodes)} nodes connected but {wanted} needed, after waiting "
                f"{timeout:g} s{why_fewer}. Start more nodes, or lower the run-config keys "
                "`clients-per-round` / `min-available-clients`."
            )
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), wanted)
        sleep(min(1.0, left))
    return nodes


def seeded_sample(
    nodes: list[int], count: int, seed: int, kind: str, server_round: int
) -> list[int]:
    """``count`` of ``nodes`` (in a run-independent order), drawn from ``(seed, kind,
    server_round)`` alone."""
    return random.Random(f"{seed}-{kind}-{server_round}").sample(nodes, count)
