"""The per-round record of a train round: schedule, participation, bytes each way, client metrics.

It is the MetricRecord ``FedMAE.aggregate_train`` returns, so Flower stores it in
``Result.train_metrics_clientapp[round]``; the app writes it as the round's ``metrics.jsonl``
line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import WARNING

from flwr.app import MetricRecord, RecordDict
from flwr.common import log

from fedmae_flwr.strategies.replies import KINDS, MAX_WEIGHT, Triage

# The keys of the node evaluation's record that the strategy sets (not a node's metric).
EVALUATION_REJECTED = "rejected"


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
    train-loss) but those named as a key the record sets or may set: a node's
    ``rejected-error = 7`` is no count of the server's, and is dropped (logged).
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
    taken = set(record) | {f"rejected-{kind}" for kind in KINDS} | {"aggregation-skipped"}
    if clash := sorted(k for k in client_metrics if k in taken):
        log(WARNING, "FedMAE: round %d: client metrics %s are named as the server's own keys "
            "and are left out of the round record", sent.server_round, clash)  # fmt: skip
    record.update({k: v for k, v in client_metrics.items() if k not in clash})
    return record


def mean_of_reported(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Each metric's mean over the replies that report it, weighted by ``weight_key``.

    Flower's ``aggregate_metricrecords`` weighs every reply, a reply without the metric as a 0
    (one node leaving train-loss out took a round's mean from 0.5 to 0.33). Also never
    overflows: values and weights up to float64's largest give a finite mean.
    """
    metrics = [next(iter(r.metric_records.values())) for r in records]
    keys = dict.fromkeys(k for m in metrics for k in m if k != weight_key)
    out = MetricRecord()
    for key in keys:
        pairs = [(float(m[weight_key]), float(m[key])) for m in metrics if key in m]  # type: ignore[arg-type]
        total = sum(w for w, _ in pairs)
        if total == math.inf:  # weights up to float64's largest: relative to the largest
            top_weight = max(w for w, _ in pairs)
            pairs = [(w / top_weight, value) for w, value in pairs]
            total = sum(w for w, _ in pairs)
        if not total > 0:  # every reporting reply weighs 0
            continue
        mean = _in_order([value * (w / total) for w, value in pairs])  # as Flower's
        if not math.isfinite(mean):  # partial sums of huge values: scale them first
            top = max(abs(v) for _, v in pairs)
            mean = top * _in_order([(v / top) * (w / total) for w, v in pairs])
        out[key] = mean
    return out


def _in_order(terms: list[float]) -> float:
    """``terms[0] + terms[1] + ...`` left to right from the first term, as Flower's average adds
    (``sum`` starts from 0, turning a lone -0.0 into 0.0, and from Python 3.12 compensates)."""
    total = terms[0]
    for term in terms[1:]:
        total += term
    return total


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
            # Finite (the replies were checked), but a count only when whole and >= 0.
            skipped = int(skipped) if 0 <= skipped <= MAX_WEIGHT and skipped % 1 == 0 else 0  # type: ignore[operator,arg-type]
            self._count(node, server_round, round(images), skipped)  # type: ignore[arg-type]
        for node in replies.empty_nodes:
            self._count(node, server_round, 0, 0)

    def _count(self, node: int, server_round: int, images: int, skipped: int) -> None:
        entry = self._nodes.setdefault(node, {"rounds": 0})
        entry.update({"images": images, "skipped-images": skipped, "last-round": server_round})
        entry["rounds"] += 1

    def report(self) -> dict[str, dict[str, int]]:
        """``{node id: counts}``, node ids as strings (JSON keys), in id order."""
        return {str(node): dict(self._nodes[node]) for node in sorted(self._nodes)}
