"""The per-round record of a train round: schedule, participation, bytes each way, client metrics.

It is the MetricRecord ``FedMAE.aggregate_train`` returns, so Flower stores it in
``Result.train_metrics_clientapp[round]``; the app writes it as the round's ``metrics.jsonl``
line.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import MetricRecord

from fedmae_flwr.strategies.replies import Triage


@dataclass(frozen=True)
class SentRound:
    """What ``configure_train`` sent in one round."""

    server_round: int
    stage: int
    sampled: int  # nodes sent a train message
    active_bytes: int  # the trained tensors, sent to each sampled node
    prefix_bytes: int  # the frozen prefix, sent to ``prefix_sends`` of them
    prefix_sends: int
    full_model_bytes: int


def round_record(
    sent: SentRound,
    replies: Triage,
    client_metrics: MetricRecord,
    weight_key: str,
    excluded_nodes: int = 0,
    aggregation_skipped: bool = False,
) -> MetricRecord:
    """The round's record: ``sent`` and what came back, then the aggregated client metrics.

    Keys: round, stage, sampled, active-bytes, prefix-bytes, prefix-sends, full-model-bytes,
    clients (sound replies with examples), rejected, ``rejected-<kind>`` for each kind of
    rejection that occurred (see :mod:`.replies`), prefix-missing, excluded-nodes (nodes no
    longer sampled because they said they cannot take part), examples,
    bytes-up-per-client (mean over those clients), bytes-down-per-client (mean over the sampled
    nodes, prefix copies included), ``aggregation-skipped = 1`` when the aggregator combined
    none of the sound replies (the model stayed as it was), and the client metrics (e.g.
    train-loss) unless they clash.
    """
    up = [next(iter(r.array_records.values())).count_bytes() for r in replies.sound]
    down = sent.active_bytes * sent.sampled + sent.prefix_bytes * sent.prefix_sends
    record = MetricRecord(
        {
            "round": sent.server_round,
            "stage": sent.stage,
            "sampled": sent.sampled,
            "active-bytes": sent.active_bytes,
            "prefix-bytes": sent.prefix_bytes,
            "prefix-sends": sent.prefix_sends,
            "full-model-bytes": sent.full_model_bytes,
            "clients": len(replies.sound),
            "rejected": replies.rejected,
            "prefix-missing": len(replies.prefix_missing),
            "excluded-nodes": excluded_nodes,
            "examples": float(
                sum(next(iter(r.metric_records.values()))[weight_key] for r in replies.sound)  # type: ignore[misc]
            ),
            "bytes-up-per-client": sum(up) / len(up) if up else 0.0,
            "bytes-down-per-client": down / max(sent.sampled, 1),
        }
    )
    for kind, count in sorted(replies.counts().items()):
        record[f"rejected-{kind}"] = count
    if aggregation_skipped:
        record["aggregation-skipped"] = 1
    for key, value in client_metrics.items():
        record.setdefault(key, value)
    return record


class NodeLedger:
    """What each node reported about its data in its sound train replies.

    Per node id: ``images`` (its latest ``num-examples``), ``skipped-images`` (its latest count of
    unreadable files; 0 when a node does not report it), ``rounds`` (sound replies) and
    ``last-round``. A deployed node reads its own folder, so this is the only place its data is
    described; ``summary.json`` and a deployment's ``partitions.json`` are written from it.
    """

    def __init__(self) -> None:
        self._nodes: dict[int, dict[str, int]] = {}

    def add(self, server_round: int, replies: Triage, weight_key: str) -> None:
        """Count the round's sound replies, with examples or without."""
        for node, content in zip(replies.sound_nodes, replies.sound, strict=True):
            metrics = next(iter(content.metric_records.values()))
            images, skipped = metrics[weight_key], metrics.get("skipped-images", 0)
            self._count(node, server_round, int(images), int(skipped))  # type: ignore[arg-type]
        for node in replies.empty_nodes:
            self._count(node, server_round, 0, 0)

    def _count(self, node: int, server_round: int, images: int, skipped: int) -> None:
        entry = self._nodes.setdefault(node, {"rounds": 0})
        entry.update({"images": images, "skipped-images": skipped, "last-round": server_round})
        entry["rounds"] += 1

    def report(self) -> dict[str, dict[str, int]]:
        """``{node id: counts}``, node ids as strings (JSON keys), in id order."""
        return {str(node): dict(self._nodes[node]) for node in sorted(self._nodes)}
