"""Stable names for a run's nodes, so that one seed samples the same data in every run.

Flower gives the nodes of every simulation new random ids (``secrets`` in the simulation engine;
on a deployment they last as long as the SuperLink's database), so a sample drawn over sorted
node ids trains other partitions at the same seed in each run, and a resumed simulation samples
other nodes than the uninterrupted one. Instead each node is asked for its key once, with a
``query`` message (answered by :func:`fedmae_flwr.client.identify_reply`: ``partition-<id>`` in
a simulation, the node-config's ``node-key`` on a device that sets one), and samples are drawn
over the nodes ordered by key; replies are combined in that order too, because float sums
depend on it.

A node that gives no usable key (no reply in time, an error such as a ClientApp without a
``query`` handler, a malformed reply) is ordered by its node id as ``node-<id>``: the run goes
on, sampling that node as reproducibly as Flower's ids allow. Two nodes claiming one key are
ordered by node id between them, and the server says so.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedmae_flwr.strategies.replies import src_node

# Query: config {QUERY_FIELD: NODE_KEY}; reply: config {NODE_KEY: "<key>"}.
QUERY_FIELD = "fedmae-query"
NODE_KEY = "node-key"
MAX_KEY_CHARS = 200


def fallback_key(node_id: int) -> str:
    """The key of a node that named none: its (run-specific) Flower node id."""
    return f"node-{node_id}"


def key_query(node_id: int) -> Message:
    """The ``query`` message asking ``node_id`` for its key."""
    content = RecordDict({"config": ConfigRecord({QUERY_FIELD: NODE_KEY})})
    return Message(content=content, message_type=MessageType.QUERY, dst_node_id=node_id)


def key_of_reply(reply: Message) -> str | None:
    """The key a reply names, or None when it names none usable (never raises)."""
    try:
        if reply.has_error():
            return None
        key = reply.content["config"][NODE_KEY]
    except (KeyError, TypeError, AttributeError):
        return None
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable():
        return None
    return key


def natural_order(key: str) -> tuple:
    """Sort key under which ``partition-2`` comes before ``partition-10``."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", key) if part)  # fmt: skip


class NodeKeys:
    """Which key each node id answered; orders node ids and replies by it."""

    def __init__(self) -> None:
        self._keys: dict[int, str] = {}

    def learn(self, grid: Grid, node_ids: Iterable[int], timeout: float) -> None:
        """Ask every node in ``node_ids`` not asked before for its key (one batch of queries,
        answered within ``timeout`` seconds, as a round's replies are)."""
        unknown = sorted(set(node_ids) - set(self._keys))
        if not unknown:
            return
        replies = grid.send_and_receive([key_query(n) for n in unknown], timeout=timeout)
        named = {}
        for reply in replies:
            node, key = reply.metadata.src_node_id, key_of_reply(reply)
            if node in unknown and key is not None:
                named[node] = key
        for node in unknown:
            self._keys[node] = named.get(node, fallback_key(node))
        log(INFO, "FedMAE: %d nodes named their key; sampled by it (seeded, the same in every "
            "run)", len(named))  # fmt: skip
        if len(named) < len(unknown):
            log(WARNING, "FedMAE: %d nodes gave no key (no reply in %g s, an error or a "
                "malformed reply); they are ordered by their node id, which is not the same in "
                "another run", len(unknown) - len(named), timeout)  # fmt: skip
        counts = Counter(self._keys.values())
        if clashes := sorted(k for k, n in counts.items() if n > 1):
            log(WARNING, "FedMAE: several nodes name the keys %s; ordered by node id between "
                "them (give each device its own node-config node-key)", clashes[:5])  # fmt: skip

    def key(self, node_id: int) -> str:
        """``node_id``'s key (its fallback key if it was never asked)."""
        return self._keys.get(node_id, fallback_key(node_id))

    def order(self, node_ids: Iterable[int]) -> list[int]:
        """``node_ids`` ordered by key, ties by node id."""
        return sorted(node_ids, key=lambda n: (natural_order(self.key(n)), n))

    def order_replies(self, replies: Iterable[Message]) -> list[Message]:
        """``replies`` ordered by their sender's key, ties in arrival order."""
        replies = list(replies)
        rank = {n: i for i, n in enumerate(self.order({src_node(m) for m in replies}))}
        return sorted(replies, key=lambda m: rank[src_node(m)])  # -1: no sender (rejected)
