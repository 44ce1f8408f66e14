"""Seeded node sampling with a bounded wait for enough connected nodes.

Flower's own sampling draws from node ids in arrival order with an unseeded ``random``; here a
round's sample depends only on ``(seed, kind, round)`` and the order of the nodes it draws from:
the strategy orders them by key (:mod:`.node_keys`), not by Flower's random ids, so another run
or a resumed run at the same seed samples as the first did.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from logging import INFO

from flwr.common import log
from flwr.serverapp import Grid

# A simulation's virtual nodes are registered once, as it starts: once their count has not
# changed for this long, waiting for more cannot help.
SIMULATION_SETTLE_S = 10.0
LOWER_KEYS = (
    "the run-config keys `clients-per-round` / `min-available-clients` (FedMAE's "
    "num_train_nodes / min_available_nodes)"
)


def fixed_nodes(grid: Grid) -> bool:
    """Whether no node can join ``grid`` later: Flower's simulation engine (its InMemoryGrid)
    registers all ``num-supernodes`` at its start; deployed SuperNodes come and go."""
    # Imported here: flwr.superlink costs a ClientApp process ~0.6 s, and nodes import this
    # module (fedmae_flwr.client -> fedmae_flwr.strategies) in every message's process.
    from flwr.superlink.grid import InMemoryGrid

    return isinstance(grid, InMemoryGrid)


def wait_for_nodes(
    grid: Grid,
    wanted: int,
    timeout: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    excluded: Mapping[int, str] | None = None,
    fixed: bool = False,
    wanted_because: str = "",
) -> list[int]:
    """The sorted ids of connected nodes not in ``excluded`` once at least ``wanted`` are;
    re-checks every second.

    Args:
        excluded: nodes that replied they cannot take part, with why (quoted in the error).
        fixed: no node can join (:func:`fixed_nodes`): fail once the connected count has not
            changed for :data:`SIMULATION_SETTLE_S`, instead of after ``timeout``.
        wanted_because: where ``wanted`` comes from (the settings and their values), for the
            error.

    Raises:
        RuntimeError: fewer than ``wanted`` such nodes after ``timeout`` seconds (or, with
            ``fixed``, once the count settled), naming the counts and the run-config keys.
    """
    excluded = excluded or {}
    start = clock()
    settled_since, last_count = start, -1
    while True:  # one get_node_ids() per check: on a deployment it asks the SuperLink
        connected = list(grid.get_node_ids())
        nodes = sorted(n for n in connected if n not in excluded)
        if len(nodes) >= wanted:
            return nodes
        now = clock()
        if len(connected) != last_count:
            settled_since, last_count = now, len(connected)
        settled = fixed and now - settled_since >= SIMULATION_SETTLE_S
        if now - start >= timeout or settled:
            raise RuntimeError(
                _too_few(nodes, connected, wanted, excluded, timeout, settled, wanted_because)
            )
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), wanted)
        sleep(min(1.0, start + timeout - now))


def _too_few(
    nodes: list[int],
    connected: list[int],
    wanted: int,
    excluded: Mapping[int, str],
    timeout: float,
    settled: bool,
    wanted_because: str = "",
) -> str:
    dropped = [n for n in connected if n in excluded]
    why_fewer = (
        f" ({len(dropped)} more connected but excluded: they replied that they cannot take "
        f"part; node {dropped[0]} said: {_shorter(excluded[dropped[0]])})"
        if dropped
        else ""
    )
    because = f" {wanted} is the {wanted_because}." if wanted_because else ""
    if settled:
        return (
            f"FedMAE: {len(nodes)} usable nodes but {wanted} needed{why_fewer}.{because} A "
            f"simulation's nodes all join at its start ({len(connected)} here: federation "
            "option num-supernodes), so waiting cannot help: raise num-supernodes, or lower "
            f"{LOWER_KEYS}."
        )
    return (
        f"FedMAE: {len(nodes)} nodes connected but {wanted} needed, after waiting "
        f"{timeout:g} s{why_fewer}.{because} Start more nodes, or lower {LOWER_KEYS}."
    )


def _shorter(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def seeded_sample(
    nodes: list[int], count: int, seed: int, kind: str, server_round: int
) -> list[int]:
    """``count`` of ``nodes`` (in a run-independent order), drawn from ``(seed, kind,
    server_round)`` alone."""
    return random.Random(f"{seed}-{kind}-{server_round}").sample(nodes, count)
