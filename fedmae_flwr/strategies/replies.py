"""Reply validation: which node replies can be aggregated. Never raises on a malformed reply.

A reply is *sound* when it is not an error, holds exactly one MetricRecord whose values are all
finite numbers with a non-negative weight (``num-examples``) no larger than the cap (and than
:data:`MAX_WEIGHT` always: a sum of such weights cannot overflow), from a node the round sent a
message to and its only reply (error replies aside), and, for
train replies with examples, exactly one ArrayRecord with the keys, shapes and dtypes the server
sent (the global model's, so a reply can never change the global dtype), data that matches its
header, finite values, and an update (reply - sent) no longer (L2, over all active tensors)
than ``max_update_norm`` times a reference norm (FedMAE's: the active tensors' when the stage
began; by default the sent tensors') (and, where the aggregator weighs by it,
a loss >= 0 under ``loss_key``). Anything else, including what cannot even
be read, is a :class:`Rejection` with a kind (counted per round) and a reason (logged with the
node id). A reply with ``prefix-missing = 1`` is neither: its node lacked the announced frozen
prefix. An Error reply whose reason holds :data:`NODE_UNUSABLE` comes from a node that cannot
take part at all (its node-config names no data): kind ``node-unusable``, listed in
:attr:`Triage.unusable` so that the strategy stops sampling it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Array, Message, RecordDict
from flwr.common import log

PREFIX_MISSING = "prefix-missing"
# In an Error reply's reason: the node cannot take part in this run (e.g. no data in its
# node-config), so sampling it again only wastes a place in every round.
NODE_UNUSABLE = "[fedmae:node-unusable]"

# The largest weight any reply may claim, with or without a cap: 2**53, the largest whole number
# a float64 holds exactly, is more images than any node has, and a thousand such weights still
# sum to a finite number (two of 1e308 summed to inf and zeroed every tensor of the average).
MAX_WEIGHT = float(2**53)

# Rejection kinds (each counted as ``rejected-<kind>`` in the round record).
ERROR = "error"  # the node replied with an Error
UNUSABLE = "node-unusable"  # an Error saying the node cannot take part (NODE_UNUSABLE)
MALFORMED = "malformed"  # the reply could not be read (not a Message, bytes that are no npy, ...)
METRICS = "metrics"  # not exactly one MetricRecord, or a value that is not a finite number
WEIGHT = "num-examples"  # the weight is missing, negative or above MAX_WEIGHT
EXAMPLES_CAP = "examples-cap"  # more examples claimed than any node holds
ARRAYS = "arrays"  # not exactly one ArrayRecord, or keys other than the ones sent
LAYOUT = "layout"  # a header dtype or shape other than the global model's
HEADER = "header"  # data whose dtype or shape differs from its own header
NON_FINITE = "non-finite"  # NaN or inf in a tensor
UPDATE_NORM = "update-norm"  # the update is too long for the model it updates
# A reply with content from a node the round sent no message to, or a second one from one node
# (a Grid of one's own may pass them on; error replies keep their kind: Flower's SuperLink sends
# its own, from itself, for a node that is gone)
UNEXPECTED = "unexpected"
KINDS = (ERROR, UNUSABLE, MALFORMED, METRICS, WEIGHT, EXAMPLES_CAP, ARRAYS, LAYOUT, HEADER,
         NON_FINITE, UPDATE_NORM, UNEXPECTED)  # fmt: skip


@dataclass(frozen=True)
class Rejection:
    """Why a reply cannot be aggregated: a kind (counted) and a reason (logged)."""

    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.reason}"


@dataclass(frozen=True)
class ReplyRules:
    """Bounds a sound reply keeps, beyond its layout.

    Args:
        weight_key: the metric that weighs a reply (``num-examples``).
        max_update_norm: reject a train reply whose update of the active tensors is longer (L2)
            than this multiple of a reference norm (:func:`triage`'s ``reference_norm``; by
            default the sent tensors'); 0 = no bound.
        max_examples: reject a reply claiming more examples than this; None = no cap.
        loss_key: a train reply with examples must report a finite number >= 0 under this
            metric (an aggregator that weighs by the loss: QFedAvg); None = not required.
    """

    weight_key: str = "num-examples"
    max_update_norm: float = 0.0
    max_examples: float | None = None
    loss_key: str | None = None


@dataclass
class Triage:
    """Replies of one round, sorted for aggregation."""

    sound: list[RecordDict] = field(default_factory=list)  # fit to aggregate, with examples
    sound_nodes: list[int] = field(default_factory=list)  # who sent each of ``sound``
    empty_nodes: list[int] = field(default_factory=list)  # sound replies with no examples
    rejections: list[tuple[int, Rejection]] = field(default_factory=list)  # (node, why)
    prefix_missing: list[int] = field(default_factory=list)  # nodes that lacked the prefix

    @property
    def empty(self) -> int:
        """Sound replies with no examples (nothing to aggregate, nothing wrong)."""
        return len(self.empty_nodes)

    @property
    def rejected(self) -> int:
        """Replies rejected (errors and malformed ones, each logged with its reason)."""
        return len(self.rejections)

    @property
    def unusable(self) -> list[int]:
        """Nodes that said they cannot take part in this run (kind ``node-unusable``)."""
        return [node for node, r in self.rejections if r.kind == UNUSABLE]

    def counts(self) -> Counter[str]:
        """Rejections per kind."""
        return Counter(r.kind for _, r in self.rejections)


def triage(
    replies: Iterable[Message],
    expected: Mapping[str, Array] | None,
    weight_key: str = "num-examples",
    rules: ReplyRules | None = None,
    senders: Collection[int] | None = None,
    reference_norm: float | None = None,
) -> Triage:
    """Sort ``replies``: sound ones with examples, rejected ones, nodes missing the prefix.

    ``expected`` holds the tensors sent for training (None for evaluation replies); ``rules``
    the bounds beyond the layout (default: none; its ``weight_key`` is ``weight_key``);
    ``senders`` the nodes the round sent a message to (None: any node), each heard once;
    ``reference_norm`` the norm ``rules.max_update_norm`` multiplies (None: ``expected``'s).
    A bound relative to each round's tensors compounds: a node replying just inside it moves the
    tensors it is relative to. FedMAE passes the norm of the stage's first round.
    """
    rules = rules or ReplyRules(weight_key)
    reference = _Reference.of(expected, rules, reference_norm)
    out, heard = Triage(), set()
    for msg in replies:
        node = src_node(msg)
        rejection = _unexpected(msg, node, senders, heard)
        if rejection is None and prefix_missing(msg):
            out.prefix_missing.append(node)
            continue
        rejection = rejection or judge(msg, expected, rules, reference)
        if rejection is not None:
            out.rejections.append((node, rejection))
            log(WARNING, "FedMAE: reply from node %s rejected (%s): %s",
                node, rejection.kind, rejection.reason)  # fmt: skip
        elif next(iter(msg.content.metric_records.values()))[rules.weight_key] > 0:  # type: ignore[operator]
            out.sound.append(msg.content)
            out.sound_nodes.append(node)
        else:
            out.empty_nodes.append(node)
    return out


def _unexpected(
    msg: Message, node: int, senders: Collection[int] | None, heard: set[int]
) -> Rejection | None:
    """An ``unexpected`` rejection for a reply with content from a node not in ``senders``, or
    from one already ``heard`` (which this adds ``node`` to otherwise). Error replies carry
    nothing to aggregate, and Flower's SuperLink sends its own for a node that is gone (sender:
    the SuperLink itself): they keep their kind."""
    if senders is None or not _has_content(msg):
        return None
    if node in heard:
        return Rejection(UNEXPECTED, "a second reply from this node")
    if node not in senders:
        return Rejection(UNEXPECTED, "it was sent no message")
    heard.add(node)
    return None


def prefix_missing(msg: Message) -> bool:
    """Whether a reply says its node lacks the announced prefix (``prefix-missing = 1``)."""
    try:
        if msg.has_error():
            return False
        return any(
            _is_number(r.get(PREFIX_MISSING)) and r[PREFIX_MISSING] == 1
            for r in msg.content.metric_records.values()
        )
    except Exception:
        return False


def check_reply(
    msg: Message,
    expected: Mapping[str, Array] | None,
    weight_key: str = "num-examples",
    rules: ReplyRules | None = None,
) -> str | None:
    """Why ``msg`` cannot be aggregated, or None when it is sound. Never raises."""
    rejection = judge(msg, expected, rules or ReplyRules(weight_key))
    return None if rejection is None else rejection.reason


def judge(
    msg: Message,
    expected: Mapping[str, Array] | None,
    rules: ReplyRules,
    reference: _Reference | None = None,
) -> Rejection | None:
    """The :class:`Rejection` of ``msg``, or None when it is sound. Never raises."""
    try:
        reference = reference or _Reference.of(expected, rules)
        return _check(msg, expected, rules, reference)
    except Exception as err:  # a reply that cannot even be read must not end the run
        return Rejection(MALFORMED, f"malformed reply: {type(err).__name__}: {err}")


@dataclass(frozen=True)
class _Reference:
    """What the update bound compares with: the sent tensors (float64) and the norm the bound
    multiplies (theirs, or one given: ``of_stage``)."""

    arrays: dict[str, np.ndarray]
    norm: float
    of_stage: bool = False

    @classmethod
    def of(
        cls, expected: Mapping[str, Array] | None, rules: ReplyRules, norm: float | None = None
    ) -> _Reference | None:
        if expected is None or not rules.max_update_norm:
            return None
        arrays = {k: v.numpy().astype(np.float64) for k, v in expected.items()}
        if norm is not None:
            return cls(arrays, norm, of_stage=True)
        return cls(arrays, math.sqrt(sum(float(np.sum(a * a)) for a in arrays.values())))


def _check(
    msg: Message,
    expected: Mapping[str, Array] | None,
    rules: ReplyRules,
    reference: _Reference | None,
) -> Rejection | None:
    if msg.has_error():
        reason = str(msg.error.reason)
        return Rejection(UNUSABLE if NODE_UNUSABLE in reason else ERROR, f"error reply: {reason}")
    content = msg.content
    if len(content.metric_records) != 1:
        return Rejection(METRICS, f"expected one MetricRecord, got {len(content.metric_records)}")
    metrics = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        if not finite_number(value):
            return Rejection(METRICS, f"metric '{key}' is not a finite number: {value!r:.80}")
    weight_key = rules.weight_key
    weight = metrics.get(weight_key)
    if weight is None or weight < 0 or weight > MAX_WEIGHT:  # type: ignore[operator]
        return Rejection(WEIGHT, f"'{weight_key}' missing, negative or above 2**53: {weight!r:.40}")
    if rules.max_examples is not None and weight > rules.max_examples:  # type: ignore[operator]
        return Rejection(
            EXAMPLES_CAP, f"'{weight_key}' = {weight:g} exceeds the cap {rules.max_examples:g}"
        )
    if expected is None or weight == 0:
        return None  # evaluation, or an empty node: nothing to aggregate, nothing wrong
    if rules.loss_key is not None and not metrics.get(rules.loss_key, -1) >= 0:  # type: ignore[operator]
        return Rejection(
            METRICS,
            f"'{rules.loss_key}' missing or negative ({metrics.get(rules.loss_key)!r:.40}): the "
            "aggregator weighs each reply by it",
        )
    if len(content.array_records) != 1:
        return Rejection(ARRAYS, f"expected one ArrayRecord, got {len(content.array_records)}")
    arrays = next(iter(content.array_records.values()))
    if set(arrays) != set(expected):
        extra, lacking = set(arrays) - set(expected), set(expected) - set(arrays)
        return Rejection(
            ARRAYS,
            "keys differ from the active tensors: "
            f"extra {sorted(extra)[:3]}, missing {sorted(lacking)[:3]}",
        )
    data: dict[str, np.ndarray] = {}
    for key, ref in expected.items():
        checked = _check_array(key, arrays[key], ref)
        if isinstance(checked, Rejection):
            return checked
        data[key] = checked
    if reference is not None:
        return _check_update(data, reference, rules.max_update_norm)
    return None


def _check_array(key: str, got: Array, ref: Array) -> np.ndarray | Rejection:
    """The tensor's data when header, data and values are fit, else why not."""
    header, want = (got.dtype, tuple(got.shape)), (ref.dtype, tuple(ref.shape))
    if header != want:
        return Rejection(LAYOUT, f"'{key}' is {header[0]}{header[1]}, expected {want[0]}{want[1]}")
    data = got.numpy()
    if (str(data.dtype), data.shape) != want:
        return Rejection(
            HEADER, f"'{key}' holds {data.dtype}{data.shape} under a {header[0]}{header[1]} header"
        )
    if not np.all(np.isfinite(data)):
        return Rejection(NON_FINITE, f"'{key}' holds NaN or inf")
    return data


def _check_update(
    data: Mapping[str, np.ndarray], reference: _Reference, bound: float
) -> Rejection | None:
    squares = 0.0
    for key, ref in reference.arrays.items():
        delta = data[key].astype(np.float64) - ref
        squares += float(np.sum(delta * delta))
    norm = math.sqrt(squares)
    if not norm <= bound * reference.norm:  # also catches an overflow to inf
        return Rejection(
            UPDATE_NORM,
            f"update norm {norm:.4g} exceeds {bound:g} x the active tensors' norm "
            f"{reference.norm:.4g}{' at the stage start' if reference.of_stage else ''}",
        )
    return None


def _has_content(msg: object) -> bool:
    """A Message that is no Error (what could be aggregated)."""
    try:
        return isinstance(msg, Message) and not msg.has_error()
    except Exception:
        return False


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def finite_number(value: object) -> bool:
    """What a metric of a sound reply is: an int or float (no bool, no list), finite."""
    return _is_number(value) and math.isfinite(value)  # type: ignore[arg-type]


def src_node(msg: Message) -> int:
    """The reply's sender, or -1 where it names none (not a Message, broken metadata)."""
    try:
        return int(msg.metadata.src_node_id)
    except Exception:
        return -1
