"""Fail loud when a stage ends without one sound reply: its block would be appended untrained."""

from __future__ import annotations

from collections import Counter

from fedmae_flwr.strategies.replies import Triage


class StageGuard:
    """Counts a stage's sound replies and why the others were refused, round by round."""

    def __init__(self) -> None:
        self.stage = -1
        self.sound = 0
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # rejection kind -> one node's reason

    def add(self, stage: int, replies: Triage) -> None:
        """Count one round's sorted replies (a new stage starts the counts afresh)."""
        if stage != self.stage:
            self.__init__()
            self.stage = stage
        self.sound += len(replies.sound)
        self.counts.update(replies.counts())
        self.counts.update(
            {"no examples": replies.empty, "prefix-missing": len(replies.prefix_missing)}
        )
        for node, rejection in replies.rejections:
            self.examples.setdefault(rejection.kind, f"node {node}: {rejection.reason}")

    def check_end(self, first_round: int, last_round: int) -> None:
        """At the stage's last round: RuntimeError, naming the reasons, if nothing was sound."""
        if self.sound:
            return
        why = "; ".join(
            f"{n} x {kind}" + (f" (e.g. {self.examples[kind]})" if kind in self.examples else "")
            for kind, n in self.counts.most_common()
            if n
        )
        raise RuntimeError(
            f"FedMAE: stage {self.stage} (rounds {first_round}-{last_round}) ended without one "
            f"sound reply, so block {self.stage} would be appended untrained; the run stops. "
            f"Replies: {why or 'none arrived'}"
        )
