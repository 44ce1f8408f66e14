"""Fail loud when a stage ends without one aggregated round: its block would be appended
untrained (no sound reply came, or the aggregator combined none of those that did)."""

from __future__ import annotations

from collections import Counter

from fedmae_flwr.strategies.replies import Triage


class StageGuard:
    """Counts a stage's sound replies, its aggregated rounds and why replies were refused."""

    def __init__(self) -> None:
        self.stage = -1
        self.sound = 0
        self.aggregated = 0  # rounds whose sound replies the aggregator combined into a model
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, str] = {}  # rejection kind -> one node's reason

    def add(self, stage: int, replies: Triage, aggregated: bool) -> None:
        """Count one round's sorted replies and whether they were combined into a model (a new
        stage starts the counts afresh)."""
        if stage != self.stage:
            self.__init__()
            self.stage = stage
        self.sound += len(replies.sound)
        self.aggregated += aggregated
        self.counts.update(replies.counts())
        self.counts.update(
            {"no examples": replies.empty, "prefix-missing": len(replies.prefix_missing)}
        )
        for node, rejection in replies.rejections:
            self.examples.setdefault(rejection.kind, f"node {node}: {rejection.reason}")

    def check_end(self, first_round: int, last_round: int) -> None:
        """At the stage's last round: RuntimeError, naming the reasons, if no round was
        aggregated."""
        if self.aggregated:
            return
        if self.sound:
            raise RuntimeError(
                f"FedMAE: stage {self.stage} (rounds {first_round}-{last_round}) brought "
                f"{self.sound} sound replies, but the aggregator combined none of them (it "
                "returned no model in every round: see its log, e.g. Bulyan given fewer than "
                f"4 f + 3 replies), so block {self.stage} would be "
                "appended untrained; the run stops."
            )
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
