"""Reply validation: which node replies can be aggregated. Never raises on a malformed reply.

A reply is *sound* when it is not an error, holds exactly one MetricRecord whose values are all
finite numbers with a non-negative weight (``num-examples``), and, for train replies with
examples, exactly one ArrayRecord with the keys, shapes and dtypes the server sent and finite
values. Anything else, including what cannot even be read, is a rejection reason. A reply with
``prefix-missing = 1`` is neither: its node lacked the announced frozen prefix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.app import Array, Message, RecordDict
from flwr.common import log

PREFIX_MISSING = "prefix-missing"


@dataclass
class Triage:
    """Replies of one round, sorted for aggregation."""

    sound: list[RecordDict] = field(default_factory=list)  # fit to aggregate, with examples
    rejected: int = 0  # errors and malformed replies (each logged with its reason)
    prefix_missing: list[int] = field(default_factory=list)  # nodes that lacked the prefix


def triage(
    replies: Iterable[Message], expected: Mapping[str, Array] | None, weight_key: str
) -> Triage:
    """Sort ``replies``: sound ones with examples, rejected ones, nodes missing the prefix.

    ``expected`` holds the tensors sent for training (None for evaluation replies).
    """
    out = Triage()
    for msg in replies:
        if prefix_missing(msg):
            out.prefix_missing.append(_src_node(msg))
            continue
        reason = check_reply(msg, expected, weight_key)
        if reason is not None:
            out.rejected += 1
            log(WARNING, "FedMAE: reply from node %s rejected: %s", _src_node(msg), reason)
        elif next(iter(msg.content.metric_records.values()))[weight_key] > 0:  # type: ignore[operator]
            out.sound.append(msg.content)
    return out


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
    msg: Message, expected: Mapping[str, Array] | None, weight_key: str = "num-examples"
) -> str | None:
    """Why ``msg`` cannot be aggregated, or None when it is sound. Never raises."""
    try:
        return _check(msg, expected, weight_key)
    except Exception as err:  # a reply that cannot even be read must not end the run
        return f"malformed reply: {type(err).__name__}: {err}"


def _check(msg: Message, expected: Mapping[str, Array] | None, weight_key: str) -> str | None:
    if msg.has_error():
        return f"error reply: {msg.error.reason}"
    content = msg.content
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    for key, value in metrics.items():
        if not (_is_number(value) and math.isfinite(value)):  # type: ignore[arg-type]
            return f"metric '{key}' is not a finite number: {value!r}"
    weight = metrics.get(weight_key)
    if weight is None or weight < 0:  # type: ignore[operator]
        return f"'{weight_key}' missing or negative: {weight!r}"
    if expected is None or weight == 0:
        return None  # evaluation, or an empty node: nothing to aggregate, nothing wrong
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    arrays = next(iter(content.array_records.values()))
    if set(arrays) != set(expected):
        extra, lacking = set(arrays) - set(expected), set(expected) - set(arrays)
        return (
            "keys differ from the active tensors: "
            f"extra {sorted(extra)[:3]}, missing {sorted(lacking)[:3]}"
        )
    for key, ref in expected.items():
        reason = _check_array(key, arrays[key], ref)
        if reason is not None:
            return reason
    return None


def _check_array(key: str, got: Array, ref: Array) -> str | None:
    header, want = (got.dtype, tuple(got.shape)), (ref.dtype, tuple(ref.shape))
    if header != want:
        return f"'{key}' is {header[0]}{header[1]}, expected {want[0]}{want[1]}"
    data = got.numpy()
    if (str(data.dtype), data.shape) != want:
        return f"'{key}' holds {data.dtype}{data.shape} under a {header[0]}{header[1]} header"
    if not np.all(np.isfinite(data)):
        return f"'{key}' holds NaN or inf"
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _src_node(msg: Message) -> int:
    try:
        return int(msg.metadata.src_node_id)
    except Exception:
        return -1
