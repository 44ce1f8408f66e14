"""Reply validation alone: every odd reply is a rejection reason, never an exception."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmae_flwr.strategies.replies import PREFIX_MISSING, check_reply, prefix_missing, triage

EXPECTED = ArrayRecord(
    {"w": Array(np.zeros((2, 3), np.float32)), "b": Array(np.zeros(3, np.float32))}
)


@pytest.fixture(autouse=True)
def task_identity():
    # Messages take their sender's identity from the process, as inside a ServerApp.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def sent() -> Message:
    return Message(RecordDict({"arrays": EXPECTED}), dst_node_id=7, message_type=MessageType.TRAIN)


def reply(
    metrics: dict | MetricRecord | None = None, arrays: dict | None = None, **records
) -> Message:
    content = RecordDict(records)
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    if metrics is not None:
        content["metrics"] = metrics if isinstance(metrics, MetricRecord) else MetricRecord(metrics)
    return Message(content, reply_to=sent())


def good_arrays() -> dict[str, Array]:
    return {"w": Array(np.ones((2, 3), np.float32)), "b": Array(np.ones(3, np.float32))}


def odd_metric(key: str, value: object) -> MetricRecord:
    """A MetricRecord holding what Flower's own checks would refuse (as a foreign node may)."""
    record = MetricRecord({"num-examples": 4})
    record._data[key] = value  # bypasses MetricRecord's value check
    return record


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=array.dtype == object)
    return buffer.getvalue()


def test_a_sound_reply_passes():
    assert (
        check_reply(reply({"num-examples": 4, "train-loss": 0.5}, good_arrays()), EXPECTED) is None
    )
    assert check_reply(reply({"num-examples": 0}), EXPECTED) is None  # an empty node
    assert check_reply(reply({"num-examples": 4, "eval-loss": 0.1}), None) is None


@pytest.mark.parametrize(
    "msg, reason",
    [
        (lambda: Message(Error(code=0, reason="boom"), reply_to=sent()), "error reply: boom"),
        (lambda: reply(None, good_arrays()), "one MetricRecord"),
        (
            lambda: reply({"num-examples": 4}, good_arrays(), extra=MetricRecord({"a": 1})),
            "one MetricRecord",
        ),
        (lambda: reply({"train-loss": 0.5}, good_arrays()), "'num-examples' missing"),
        (lambda: reply({"num-examples": -1}, good_arrays()), "negative"),
        (lambda: reply({"num-examples": float("nan")}, good_arrays()), "not a finite number"),
        (
            lambda: reply({"num-examples": 4, "train-loss": float("inf")}, good_arrays()),
            "'train-loss' is not a finite number",
        ),
        (
            lambda: reply({"num-examples": 4, "train-loss": [0.5, 0.6]}, good_arrays()),
            "'train-loss' is not a finite number",
        ),
        (lambda: reply({"num-examples": [4]}, good_arrays()), "'num-examples' is not a finite"),
        (lambda: reply(odd_metric("train-loss", "0.5"), good_arrays()), "not a finite number"),
        (lambda: reply(odd_metric("num-examples", None), good_arrays()), "not a finite number"),
        (lambda: reply(odd_metric("num-examples", True), good_arrays()), "not a finite number"),
        (lambda: reply(odd_metric("num-examples", 10**400), good_arrays()), "malformed reply"),
        (lambda: reply({"num-examples": 4}), "one ArrayRecord"),
        (lambda: reply({"num-examples": 4}, good_arrays(), more=ArrayRecord()), "one ArrayRecord"),
        (
            lambda: reply({"num-examples": 4}, {**good_arrays(), "x": Array(np.ones(1))}),
            "extra ['x']",
        ),
        (lambda: reply({"num-examples": 4}, {"w": good_arrays()["w"]}), "missing ['b']"),
        (
            lambda: reply(
                {"num-examples": 4}, {**good_arrays(), "b": Array(np.ones(4, np.float32))}
            ),
            "'b' is float32(4,), expected float32(3,)",
        ),
        (
            lambda: reply({"num-examples": 4}, {**good_arrays(), "b": Array(np.ones(3))}),
            "'b' is float64(3,), expected float32(3,)",
        ),
        (
            lambda: reply(
                {"num-examples": 4},
                {**good_arrays(), "b": Array(np.array([1, np.nan, 1], np.float32))},
            ),
            "NaN or inf",
        ),
    ],
)
def test_odd_replies_are_rejected_with_a_reason(msg, reason):
    got = check_reply(msg(), EXPECTED)
    assert got is not None and reason in got


def test_arrays_that_cannot_be_read_are_rejected_not_raised():
    pickled = Array("float32", (3,), "numpy.ndarray", npy(np.array([{}, {}, {}], dtype=object)))
    garbage = Array("float32", (3,), "numpy.ndarray", b"not an npy file")
    foreign = Array("float32", (3,), "torch.Tensor", npy(np.ones(3, np.float32)))
    for bad in (pickled, garbage, foreign):
        with pytest.raises(Exception):  # noqa: B017 - what check_reply must absorb
            bad.numpy()
        got = check_reply(reply({"num-examples": 4}, {**good_arrays(), "b": bad}), EXPECTED)
        assert got is not None and got.startswith("malformed reply")


def test_a_header_that_lies_about_its_data_is_rejected():
    wider = Array("float32", (3,), "numpy.ndarray", npy(np.ones(4, np.float32)))
    other_type = Array("float32", (3,), "numpy.ndarray", npy(np.ones(3, np.float64)))
    for bad in (wider, other_type):
        got = check_reply(reply({"num-examples": 4}, {**good_arrays(), "b": bad}), EXPECTED)
        assert got is not None and "under a float32(3,) header" in got


def test_anything_that_is_not_a_message_is_rejected_not_raised():
    def broken() -> bool:
        raise RuntimeError("unreadable")

    for thing in (None, object(), SimpleNamespace(has_error=broken)):
        got = check_reply(thing, EXPECTED)  # type: ignore[arg-type]
        assert got is not None and got.startswith("malformed reply")
        assert prefix_missing(thing) is False  # type: ignore[arg-type]


def test_prefix_missing_is_read_safely():
    assert prefix_missing(reply({"num-examples": 0, PREFIX_MISSING: 1}))
    assert not prefix_missing(reply({"num-examples": 0, PREFIX_MISSING: 0}))
    assert not prefix_missing(reply({"num-examples": 0, PREFIX_MISSING: [1]}))
    assert not prefix_missing(reply(odd_metric(PREFIX_MISSING, "1")))
    assert not prefix_missing(Message(Error(code=0, reason="boom"), reply_to=sent()))


def test_triage_sorts_a_round():
    replies = [
        reply({"num-examples": 4, "train-loss": 0.5}, good_arrays()),
        reply({"num-examples": 0}),  # sound but empty: not aggregated, not rejected
        reply({"num-examples": 0, PREFIX_MISSING: 1}),
        reply({"num-examples": 4, "train-loss": [0.5]}, good_arrays()),
        Message(Error(code=0, reason="boom"), reply_to=sent()),
        None,
    ]
    out = triage(replies, EXPECTED, "num-examples")  # type: ignore[arg-type]
    assert len(out.sound) == 1 and out.sound[0] is replies[0].content
    assert out.rejected == 3
    assert out.prefix_missing == [7]
