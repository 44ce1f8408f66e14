"""Reply validation alone: every odd reply is a rejection reason, never an exception."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmae_flwr.strategies.replies import (
    ARRAYS,
    ERROR,
    EXAMPLES_CAP,
    HEADER,
    KINDS,
    LAYOUT,
    MALFORMED,
    METRICS,
    NODE_UNUSABLE,
    NON_FINITE,
    PREFIX_MISSING,
    UNEXPECTED,
    UNUSABLE,
    UPDATE_NORM,
    WEIGHT,
    ReplyRules,
    check_reply,
    judge,
    prefix_missing,
    triage,
)

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


# --- bounds beyond the layout: update norm, num-examples cap, the pinned dtype ---------------
CURRENT = ArrayRecord(
    {"w": Array(np.full((2, 3), 2.0, np.float32)), "b": Array(np.full(3, 2.0, np.float32))}
)  # norm 2 * 3 = 6


def moved(by: float, dtype=np.float32) -> dict[str, Array]:
    return {k: Array((v.numpy() + by).astype(dtype)) for k, v in CURRENT.items()}


def test_an_update_longer_than_the_bound_is_rejected():
    rules = ReplyRules(max_update_norm=1.0)  # update norm 3 * |by| against 6
    assert judge(reply({"num-examples": 4}, moved(1.9)), CURRENT, rules) is None
    for arrays in (
        moved(2.1),
        moved(1e30),
        {k: Array(np.full(v.shape, np.finfo(np.float32).max)) for k, v in CURRENT.items()},
        {k: Array(v.numpy() * np.float32(1e6)) for k, v in CURRENT.items()},
    ):
        got = judge(reply({"num-examples": 4}, arrays), CURRENT, rules)
        assert got is not None and got.kind == UPDATE_NORM, got
        assert "exceeds 1 x the active tensors' norm 6" in got.reason
    # 0 = no bound; a finite huge value is then only a layout-sound reply
    assert judge(reply({"num-examples": 4}, moved(1e30)), CURRENT, ReplyRules()) is None


def test_the_update_bound_multiplies_a_reference_norm_when_one_is_given():
    """FedMAE passes the norm of the stage's start: the bound no longer grows with the tensors
    a node inside it has inflated."""
    rules = ReplyRules(max_update_norm=1.0)
    ok, far = reply({"num-examples": 4}, moved(0.9)), reply({"num-examples": 4}, moved(1.1))
    out = triage([ok, far], CURRENT, rules=rules, reference_norm=3.0)  # |update| 2.7, 3.3
    assert len(out.sound) == 1 and [r.kind for _, r in out.rejections] == [UPDATE_NORM]
    assert (
        "exceeds 1 x the active tensors' norm 3 at the stage start" in out.rejections[0][1].reason
    )
    assert len(triage([ok, far], CURRENT, rules=rules).sound) == 2  # against their norm, 6


def test_num_examples_above_the_cap_are_rejected_for_train_and_evaluate():
    rules = ReplyRules(max_examples=100)
    zeros = {k: Array(np.zeros(v.shape, np.float32)) for k, v in CURRENT.items()}
    assert judge(reply({"num-examples": 100}, zeros), CURRENT, rules) is None
    for expected in (CURRENT, None):
        got = judge(reply({"num-examples": 1e12}, zeros), expected, rules)
        assert got is not None and got.kind == EXAMPLES_CAP
        assert got.reason == "'num-examples' = 1e+12 exceeds the cap 100"
    assert judge(reply({"num-examples": 1e12}, zeros), CURRENT, ReplyRules()) is None  # no cap


def test_a_reply_cannot_change_the_global_dtype():
    for arrays in (moved(0.0, np.float64), moved(0.0, np.float16)):
        got = judge(reply({"num-examples": 4}, arrays), CURRENT, ReplyRules(max_update_norm=10))
        assert got is not None and got.kind == LAYOUT and "expected float32" in got.reason
    lying = Array("float32", (3,), "numpy.ndarray", npy(np.ones(3, np.float64)))
    got = judge(reply({"num-examples": 4}, {**moved(0.0), "b": lying}), CURRENT, ReplyRules())
    assert got is not None and got.kind == HEADER


@pytest.mark.parametrize(
    "msg, kind",
    [
        (lambda: Message(Error(code=0, reason="boom"), reply_to=sent()), ERROR),
        (
            lambda: Message(Error(code=2, reason=f"<'{NODE_UNUSABLE} x'>"), reply_to=sent()),
            UNUSABLE,
        ),
        (lambda: None, MALFORMED),
        (lambda: reply({"num-examples": 4, "train-loss": [0.5]}, good_arrays()), METRICS),
        (lambda: reply(None, good_arrays()), METRICS),
        (lambda: reply({"num-examples": -1}, good_arrays()), WEIGHT),
        (lambda: reply({"num-examples": 4}, good_arrays(), more=ArrayRecord()), ARRAYS),
        (lambda: reply({"num-examples": 4}, {"w": good_arrays()["w"]}), ARRAYS),
        (lambda: reply({"num-examples": 4}, {**good_arrays(), "b": Array(np.ones(4))}), LAYOUT),
        (
            lambda: reply(
                {"num-examples": 4},
                {**good_arrays(), "b": Array(np.array([1, np.inf, 1], np.float32))},
            ),
            NON_FINITE,
        ),
    ],
)
def test_each_rejection_has_a_kind(msg, kind):
    got = judge(msg(), EXPECTED, ReplyRules())
    assert got is not None and got.kind == kind and got.kind in KINDS
    assert str(got) == f"{kind}: {got.reason}"


def test_triage_counts_rejections_per_kind_and_logs_the_node(caplog):
    replies = [
        reply({"num-examples": 4}, moved(0.5)),
        reply({"num-examples": 0}),
        reply({"num-examples": 4}, moved(1e6)),
        reply({"num-examples": 4}, moved(1e7)),
        reply({"num-examples": 1e12}, moved(0.0)),
        Message(Error(code=0, reason="boom"), reply_to=sent()),
    ]
    rules = ReplyRules(max_update_norm=10, max_examples=50)
    out = triage(replies, CURRENT, "num-examples", rules)
    assert len(out.sound) == 1 and out.empty == 1 and out.rejected == 4
    assert out.counts() == {UPDATE_NORM: 2, EXAMPLES_CAP: 1, ERROR: 1}
    assert [node for node, _ in out.rejections] == [7, 7, 7, 7]
    logged = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(logged) == 4 and all("from node 7 rejected" in line for line in logged)


def test_triage_lists_the_nodes_that_cannot_take_part():
    unusable = Message(Error(code=2, reason=f"{NODE_UNUSABLE} Node 7: no data"), reply_to=sent())
    out = triage([unusable, Message(Error(code=0, reason="boom"), reply_to=sent())], EXPECTED)
    assert out.unusable == [7] and out.counts() == {UNUSABLE: 1, ERROR: 1}


def test_a_weight_above_2_to_the_53_is_rejected_without_a_cap_too():
    """Two replies of 1e308 examples summed to inf in Flower's average: every tensor became 0."""
    for huge in (1e308, 2.0**53 + 2**11):
        got = judge(reply({"num-examples": huge}, good_arrays()), EXPECTED, ReplyRules())
        assert got is not None and got.kind == WEIGHT and "above 2**53" in got.reason
    assert check_reply(reply({"num-examples": 2**53}, good_arrays()), EXPECTED) is None


def from_node(node: int, examples: int = 4) -> Message:
    to = Message(RecordDict({"arrays": EXPECTED}), dst_node_id=node, message_type=MessageType.TRAIN)
    content = {
        "arrays": ArrayRecord(good_arrays()),
        "metrics": MetricRecord({"num-examples": examples}),
    }
    return Message(RecordDict(content), reply_to=to)


def test_a_reply_from_a_node_not_sent_a_message_or_a_second_one_is_rejected(caplog):
    """A Grid of one's own may pass them on (Flower's SuperLink does not): four copies of one
    hostile reply outvoted three honest ones under FedMedian."""
    replies = [from_node(7), from_node(7), from_node(8), from_node(9), from_node(9, 0)]
    out = triage(replies, EXPECTED, senders={7, 9})
    assert out.sound_nodes == [7, 9] and out.empty == 0
    assert [(node, r.kind) for node, r in out.rejections] == [(7, UNEXPECTED), (8, UNEXPECTED),
                                                              (9, UNEXPECTED)]  # fmt: skip
    assert "a second reply from this node" in str(out.rejections[0][1])
    assert "it was sent no message" in str(out.rejections[1][1])
    assert len(triage(replies, EXPECTED).sound) == 4  # senders=None: anyone, as before


def test_error_replies_keep_their_kind_whoever_sends_them():
    """Flower's SuperLink answers for a node that is gone with an Error from itself (node 1):
    an ordinary dropout, not a reply from a node never asked."""
    gone = Message(RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    errors = [Message(Error(code=0, reason="node unavailable"), reply_to=gone) for _ in range(2)]
    out = triage([*errors, from_node(7)], EXPECTED, senders={7, 9})
    assert out.counts() == {ERROR: 2} and out.sound_nodes == [7]
