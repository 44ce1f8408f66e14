"""The round record and the metric means: what nodes report cannot pose as the server's own
numbers, and one node leaving a metric out does not pull its mean toward 0."""

from __future__ import annotations

import math

import pytest
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedmae_flwr.strategies.accounting import (
    NodeLedger,
    SentRound,
    mean_of_reported,
    round_record,
)
from fedmae_flwr.strategies.replies import Triage


def records(*metrics: dict) -> list[RecordDict]:
    return [RecordDict({"metrics": MetricRecord(m)}) for m in metrics]


def test_the_mean_is_flowers_where_every_reply_reports_the_metric():
    same = records({"num-examples": 3, "train-loss": 0.1, "x": 7},
                   {"num-examples": 5, "train-loss": 0.7, "x": 1},
                   {"num-examples": 1e6, "train-loss": 1e-9, "x": -3.3e12},
                   {"num-examples": 7, "train-loss": 0.3, "x": 0.125})  # fmt: skip
    ours, flowers = (
        mean_of_reported(same, "num-examples"),
        aggregate_metricrecords(same, "num-examples"),
    )
    assert dict(ours.items()) == dict(flowers.items())  # bit for bit
    same = records({"num-examples": 2, "x": -0.0})  # added from the first term, as Flower adds
    ours, flowers = (
        mean_of_reported(same, "num-examples"),
        aggregate_metricrecords(same, "num-examples"),
    )
    assert dict(ours.items()) == dict(flowers.items())
    assert math.copysign(1.0, ours["x"]) == -1.0


def test_a_reply_without_a_metric_does_not_pull_its_mean_toward_zero():
    got = mean_of_reported(
        records({"num-examples": 10, "train-loss": 0.5}, {"num-examples": 10, "train-loss": 0.5},
                {"num-examples": 10}),
        "num-examples",
    )  # fmt: skip
    assert got["train-loss"] == pytest.approx(0.5)  # Flower's: 0.333


def test_huge_finite_values_and_weights_give_a_finite_mean():
    got = mean_of_reported(
        records({"num-examples": 1e308, "eval-loss": 1.5e308},
                {"num-examples": 1e308, "eval-loss": 1.5e308}),
        "num-examples",
    )  # fmt: skip
    assert math.isfinite(got["eval-loss"]) and got["eval-loss"] == pytest.approx(1.5e308)
    assert (
        mean_of_reported(records({"num-examples": 0, "x": 1.0}), "num-examples") == MetricRecord()
    )


def test_client_metrics_named_as_the_records_own_keys_are_left_out(caplog):
    sent = SentRound(3, 1, 2, 100, 0, 0, 400)
    forged = MetricRecord({"train-loss": 0.4, "rejected-error": 7.0, "aggregation-skipped": 1.0,
                           "clients": 99.0, "psnr": 33.0})  # fmt: skip
    record = round_record(sent, Triage(), forged, "num-examples")
    assert "rejected-error" not in record and "aggregation-skipped" not in record
    assert record["clients"] == 0 and record["round"] == 3
    assert record["train-loss"] == 0.4 and record["psnr"] == 33.0  # the app's recorder drops it
    assert "['aggregation-skipped', 'clients', 'rejected-error'] are named as the server's own" in (
        caplog.text
    )


def test_the_ledger_keeps_only_counts():
    replies = Triage(
        sound=records({"num-examples": 12.0, "skipped-images": -5},
                      {"num-examples": 3, "skipped-images": 2.5},
                      {"num-examples": 4, "skipped-images": 1e300}),
        sound_nodes=[1, 2, 3],
    )  # fmt: skip
    ledger = NodeLedger()
    ledger.add(1, replies, "num-examples")
    report = ledger.report()
    assert [report[n]["skipped-images"] for n in "123"] == [0, 0, 0]
    assert report["1"]["images"] == 12 and isinstance(report["1"]["images"], int)
