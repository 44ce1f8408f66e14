"""The frozen prefix of the current stage, and which node is known to hold which version.

A node keeps the prefix in its ``Context.state``; the server attaches it to a node's message only
when it does not know the node to hold the current version, so it travels once per stage. A node
that reports it missing is forgotten and gets it with its next message.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from flwr.app import ArrayRecord, RecordDict

PREFIX_KEY = "prefix"


class PrefixCache:
    """The prefix (stem + finished blocks) and its version, cut once per stage."""

    def __init__(self) -> None:
        self.record = ArrayRecord()
        self.version = ""  # "<frozen blocks>-<digest>"; "" while nothing is frozen
        self._frozen = 0
        self._held: dict[int, str] = {}  # node id -> prefix version it holds

    def update(self, prefix: ArrayRecord, frozen: int) -> None:
        """Take ``prefix`` as the stage's prefix when the number of frozen blocks changed."""
        if frozen == self._frozen:
            return
        self.record, self._frozen = prefix, frozen
        self.version = f"{frozen}-{_digest(prefix)}" if frozen else ""

    def attach(self, node_id: int, content: RecordDict) -> bool:
        """Add the prefix to ``content`` unless ``node_id`` holds it; whether it was added."""
        if self._frozen == 0 or self._held.get(node_id) == self.version:
            return False
        content[PREFIX_KEY] = self.record
        self._held[node_id] = self.version
        return True

    def forget(self, node_ids: Iterable[int]) -> None:
        """These nodes lack the prefix (e.g. restarted): their next message carries it again."""
        for node_id in node_ids:
            self._held.pop(node_id, None)


def _digest(record: ArrayRecord) -> str:
    h = hashlib.sha256()
    for key, array in record.items():
        h.update(key.encode())
        h.update(array.data)
    return h.hexdigest()[:16]
