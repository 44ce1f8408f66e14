"""FedMAE: a Flower Message-API strategy that grows a ViT one federated block at a time.

Protocol (what travels in a message; a foreign ClientApp implementing it can join):

- Server -> node, ``train`` and ``evaluate``: ``"arrays"`` (ArrayRecord: only the tensors active in
  the stage, see :func:`fedmae_flwr.models.active_key`), ``"config"`` (ConfigRecord with
  ``server-round``, ``stage``, ``frozen-blocks``, ``prefix-version``), and ``"prefix"``
  (ArrayRecord: the frozen stem and finished blocks) only when the strategy does not know the
  node to hold ``prefix-version``.
- Node -> server: ``"arrays"`` (train only: the trained active tensors, same keys and shapes) and
  ``"metrics"`` with ``num-examples``. A node that lacks the announced prefix (e.g. it restarted
  and lost its ``Context.state``) replies ``prefix-missing = 1`` and ``num-examples = 0``; the
  strategy re-sends to it with the prefix attached, within the same round.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from time import sleep
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedmae_flwr.models.cascade import active_key, block_index, prefix_key

ArrayFactory = Callable[[int], dict[str, np.ndarray]]

PREFIX_KEY = "prefix"
PREFIX_MISSING = "prefix-missing"


@dataclass(frozen=True)
class StageSchedule:
    """K stages of R rounds: round ``r`` (1-based) belongs to stage ``(r - 1) // R``."""

    depth: int
    rounds_per_stage: int

    @property
    def num_rounds(self) -> int:
        return self.depth * self.rounds_per_stage

    def stage_of(self, server_round: int) -> int:
        return (server_round - 1) // self.rounds_per_stage

    def is_stage_end(self, server_round: int) -> bool:
        return server_round % self.rounds_per_stage == 0


def _digest(record: ArrayRecord) -> str:
    h = hashlib.sha256()
    for key, array in record.items():
        h.update(key.encode())
        h.update(array.data)
    return h.hexdigest()[:16]


def _to_arrays(tensors: dict[str, Any]) -> dict[str, Array]:
    return {k: Array(np.ascontiguousarray(np.asarray(v))) for k, v in tensors.items()}


class FedMAE(FedAvg):
    """Progressive one-block federated MAE (the FedMAE cascade) on top of FedAvg.

    Stage ``s`` (rounds ``s*R+1 .. (s+1)*R``) trains block ``s`` with the final norm and the decoder
    (and the patch embedding in stage 0) while blocks ``0..s-1`` stay frozen on the nodes. Only the
    active tensors travel every round; the frozen prefix reaches each node once per stage. At the
    first round of a new stage the finished block stays in the model and block ``s+1`` is appended.
    :meth:`aggregate_train` returns the FULL global model, as :meth:`Strategy.start` requires.

    Args:
        depth: K, blocks of the final backbone (= number of stages).
        rounds_per_stage: R, server rounds per stage; a run has ``depth * rounds_per_stage`` rounds.
        new_block: ``index -> {"blocks.<index>.*": ndarray}``, a freshly initialised block.
        new_decoder: ``stage -> {"decoder.*": ndarray}``; needed when ``decoder_per_stage='reset'``.
        next_block_init: ``"fresh"`` (``new_block``) or ``"copy"`` (of the block just finished).
        decoder_per_stage: ``"keep"`` the trained decoder or ``"reset"`` it at each new stage.
        num_train_nodes: nodes sampled per train round; None samples as FedAvg (``fraction_train``).
        num_evaluate_nodes: nodes sampled for federated evaluation at each stage end (0: none).
        seed: seed of node sampling, drawn afresh each round from ``(seed, round)`` over the
            sorted node ids, so a resumed run samples as the uninterrupted one would have.
        resend_timeout: seconds to wait for replies to a same-round prefix re-send.
        progressive: True for FedMAE's one-block stages; False trains all ``depth`` blocks end
            to end every round (the ``fedavg-mae`` baseline, SSL-FL's Fed-MAE), same schedule.
        **fedavg_kwargs: passed to :class:`flwr.serverapp.strategy.FedAvg`.

    Attributes:
        round_log: one dict per train round: stage, clients, rejected replies, bytes up/down per
            client, prefix sends, train loss; read it after each round (e.g. in ``evaluate_fn``).
    """

    def __init__(
        self,
        depth: int,
        rounds_per_stage: int,
        new_block: ArrayFactory,
        new_decoder: ArrayFactory | None = None,
        next_block_init: str = "fresh",
        decoder_per_stage: str = "keep",
        num_train_nodes: int | None = None,
        num_evaluate_nodes: int = 0,
        seed: int = 0,
        resend_timeout: float = 3600.0,
        progressive: bool = True,
        **fedavg_kwargs: Any,
    ) -> None:
        if depth < 1 or rounds_per_stage < 1:
            raise ValueError(
                f"depth and rounds_per_stage must be >= 1, got {depth}, {rounds_per_stage}"
            )
        if next_block_init not in ("fresh", "copy"):
            raise ValueError(f"next_block_init must be 'fresh' or 'copy', got {next_block_init!r}")
        if decoder_per_stage not in ("keep", "reset"):
            raise ValueError(
                f"decoder_per_stage must be 'keep' or 'reset', got {decoder_per_stage!r}"
            )
        if decoder_per_stage == "reset" and new_decoder is None:
            raise ValueError("decoder_per_stage='reset' needs a new_decoder factory")
        super().__init__(**fedavg_kwargs)
        self.depth = depth
        self.rounds_per_stage = rounds_per_stage
        self.schedule = StageSchedule(depth, rounds_per_stage)
        self.new_block = new_block
        self.new_decoder = new_decoder
        self.next_block_init = next_block_init
        self.decoder_per_stage = decoder_per_stage
        self.num_train_nodes = num_train_nodes
        self.num_evaluate_nodes = num_evaluate_nodes
        self.progressive = progressive
        self.seed = seed
        self._round_offset = 0  # rounds already done before ``start`` (a resumed run)
        self.round_log: list[dict[str, float]] = []
        self._global = ArrayRecord()
        self._prefix = ArrayRecord()
        self._prefix_version = ""
        self._prefix_frozen = 0
        self._node_prefix: dict[int, str] = {}  # node id -> prefix version it holds
        self._grid: Grid | None = None
        self._sent_config: dict[str, ConfigRecord] = {}
        self._pending: dict[str, int] = {}
        self._timeout = resend_timeout

    # --- schedule ------------------------------------------------------------------------------
    @property
    def num_rounds(self) -> int:
        return self.schedule.num_rounds

    def stage_of(self, server_round: int) -> int:
        return self.schedule.stage_of(server_round)

    def frozen_blocks(self, server_round: int) -> int:
        """Blocks frozen on the nodes: the finished ones in FedMAE, none end to end."""
        return self.stage_of(server_round) if self.progressive else 0

    def is_stage_end(self, server_round: int) -> bool:
        return self.schedule.is_stage_end(server_round)

    def summary(self) -> None:
        log(
            INFO, "\t├──> FedMAE: depth %d x %d rounds per stage", self.depth, self.rounds_per_stage
        )
        log(
            INFO,
            "\t│\t└──next block: %s | decoder per stage: %s | nodes per round: %s",
            self.next_block_init,
            self.decoder_per_stage,
            self.num_train_nodes,
        )
        super().summary()

    # --- run ---------------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int | None = None,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        first_round: int = 1,
    ) -> Result:
        """Run rounds ``first_round``..``num_rounds`` (default: the whole schedule).

        ``first_round`` > 1 resumes a run: ``initial_arrays`` is then the global model after
        round ``first_round - 1`` (e.g. its checkpoint), and the strategy's round numbers, stage
        schedule, node sampling and ``evaluate_fn`` rounds continue as in the uninterrupted run.
        Nodes get the frozen prefix again (a restarted server cannot know what they hold).
        """
        num_rounds = self.num_rounds if num_rounds is None else num_rounds
        if not 1 <= first_round <= num_rounds:
            raise ValueError(f"first_round must be in [1, {num_rounds}], got {first_round}")
        offset = first_round - 1
        self._round_offset = offset

        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # Round 0 is Flower's "before training" call; later rounds shift with the offset.
            assert evaluate_fn is not None
            return evaluate_fn(server_round + offset if server_round else 0, arrays)

        try:
            return super().start(
                grid, initial_arrays, num_rounds - offset, timeout, train_config,
                evaluate_config, shifted if evaluate_fn else None,
            )  # fmt: skip
        finally:
            self._round_offset = 0

    # --- model growth --------------------------------------------------------------------------
    def grow(self, arrays: ArrayRecord, stage: int) -> ArrayRecord:
        """The global model with blocks ``0..stage``: appends blocks (and resets the decoder)."""
        grown = ArrayRecord(dict(arrays.items()))
        num_blocks = len({block_index(k) for k in grown} - {None})
        while num_blocks <= stage:
            if self.next_block_init == "copy":
                src = f"blocks.{num_blocks - 1}."
                block = {
                    f"blocks.{num_blocks}.{k[len(src) :]}": Array(v.numpy().copy())
                    for k, v in grown.items()
                    if k.startswith(src)
                }
            else:
                block = _to_arrays(self.new_block(num_blocks))
            grown.update(block)
            if self.decoder_per_stage == "reset" and self.new_decoder is not None:
                grown.update(_to_arrays(self.new_decoder(num_blocks)))
            log(INFO, "FedMAE: block %d appended (%s init)", num_blocks, self.next_block_init)
            num_blocks += 1
        return grown

    def _ensure_prefix(self, frozen: int) -> None:
        """Cut the frozen prefix once per stage; its version names the stage and the content."""
        if frozen == self._prefix_frozen:
            return
        self._prefix = ArrayRecord({k: v for k, v in self._global.items() if prefix_key(k, frozen)})
        self._prefix_version = f"{frozen}-{_digest(self._prefix)}"
        self._prefix_frozen = frozen

    def _active(self, server_round: int) -> ArrayRecord:
        """The tensors trained in ``server_round`` (sent, returned and averaged)."""
        frozen = self.frozen_blocks(server_round)
        return ArrayRecord({k: v for k, v in self._global.items() if active_key(k, frozen)})

    # --- messages ------------------------------------------------------------------------------
    def _sample(
        self, grid: Grid, server_round: int, kind: str, count: int | None, fraction: float,
        minimum: int,
    ) -> list[int]:  # fmt: skip
        if count is None:
            count = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        wanted = max(self.min_available_nodes, count)
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), wanted)
            sleep(1)
        return random.Random(f"{self.seed}-{kind}-{server_round}").sample(nodes, count)

    def _messages(
        self, node_ids: list[int], server_round: int, config: ConfigRecord, message_type: str
    ) -> tuple[list[Message], int]:
        """One message per node; the prefix rides along where the node is not known to hold it.

        Returns the messages and the number of prefix copies attached.
        """
        frozen = self.frozen_blocks(server_round)
        active = self._active(server_round)
        config = ConfigRecord(dict(config))
        config["server-round"] = server_round
        config["stage"] = self.stage_of(server_round)
        config["frozen-blocks"] = frozen
        config["prefix-version"] = self._prefix_version
        self._sent_config[message_type] = config
        messages, sends = [], 0
        for node_id in node_ids:
            content = RecordDict({self.arrayrecord_key: active, self.configrecord_key: config})
            if frozen > 0 and self._node_prefix.get(node_id) != self._prefix_version:
                content[PREFIX_KEY] = self._prefix
                self._node_prefix[node_id] = self._prefix_version
                sends += 1
            messages.append(
                Message(content=content, message_type=message_type, dst_node_id=node_id)
            )
        return messages, sends

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Grow the model at a stage start, then send each sampled node the active tensors."""
        server_round += self._round_offset
        stage = self.stage_of(server_round)
        self._grid = grid
        self._global = self.grow(arrays, stage if self.progressive else self.depth - 1)
        self._ensure_prefix(self.frozen_blocks(server_round))
        nodes = self._sample(grid, server_round, "train", self.num_train_nodes,
                             self.fraction_train, self.min_train_nodes)  # fmt: skip
        messages, sends = self._messages(nodes, server_round, config, MessageType.TRAIN)
        self._pending = {
            "round": server_round,
            "stage": stage,
            "sampled": len(nodes),
            "active-bytes": self._active(server_round).count_bytes(),
            "prefix-bytes": self._prefix.count_bytes(),
            "prefix-sends": sends,
            "full-model-bytes": self._global.count_bytes(),
        }
        log(INFO, "configure_train: stage %d, %d nodes, %d prefix sends", stage, len(nodes), sends)
        return messages

    def _resend_missing_prefix(self, replies: list[Message], server_round: int) -> list[Message]:
        """Same-round re-send, with the prefix attached, to nodes that reported it missing."""
        missing = [m for m in replies if not m.has_error() and _metric(m, PREFIX_MISSING) == 1]
        if not missing or self._grid is None:
            return replies
        nodes = [m.metadata.src_node_id for m in missing]
        log(
            WARNING, "FedMAE: %d nodes lack prefix %s; re-sending", len(nodes), self._prefix_version
        )
        for node in nodes:
            self._node_prefix.pop(node, None)
        message_type = missing[0].metadata.message_type
        messages, sends = self._messages(
            nodes, server_round, self._sent_config[message_type], message_type
        )
        if message_type == MessageType.TRAIN:
            self._pending["prefix-sends"] += sends
        retried = list(self._grid.send_and_receive(messages, timeout=self._timeout))
        return [m for m in replies if all(m is not x for x in missing)] + retried

    def _check_reply(self, msg: Message, expected: ArrayRecord | None) -> str | None:
        """Why a reply cannot be aggregated, or None when it is sound."""
        if msg.has_error():
            return f"error reply: {msg.error.reason}"
        content = msg.content
        if len(content.metric_records) != 1:
            return f"expected one MetricRecord, got {len(content.metric_records)}"
        metrics = next(iter(content.metric_records.values()))
        weight = metrics.get(self.weighted_by_key)
        if not isinstance(weight, int | float) or weight < 0 or not np.isfinite(weight):
            return f"'{self.weighted_by_key}' missing or invalid: {weight!r}"
        if expected is None:
            return None
        if weight == 0:
            return None  # an empty node: nothing to aggregate, nothing wrong
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
            got = arrays[key]
            if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
                return (
                    f"'{key}' is {got.dtype}{tuple(got.shape)}, "
                    f"expected {ref.dtype}{tuple(ref.shape)}"
                )
            if not np.all(np.isfinite(got.numpy())):
                return f"'{key}' holds NaN or inf"
        return None

    def _sound_replies(
        self, replies: list[Message], expected: ArrayRecord | None
    ) -> tuple[list[RecordDict], int]:
        """Replies fit to aggregate (with examples), and how many were rejected (logged)."""
        sound, rejected = [], 0
        for msg in replies:
            reason = self._check_reply(msg, expected)
            if reason is not None:
                rejected += 1
                log(WARNING, "FedMAE: reply from node %d rejected: %s",
                    msg.metadata.src_node_id, reason)  # fmt: skip
                continue
            metrics = next(iter(msg.content.metric_records.values()))
            if metrics[self.weighted_by_key] > 0:
                sound.append(msg.content)
        return sound, rejected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the active tensors of sound replies into the full global model.

        Replies with an error, wrong keys/shapes/dtypes or non-finite values are rejected and
        logged, never raised; a round without sound replies keeps the global model.
        """
        server_round += self._round_offset
        replies = self._resend_missing_prefix(list(replies), server_round)
        sound, rejected = self._sound_replies(replies, expected=self._active(server_round))
        metrics = MetricRecord()
        if sound:
            averaged = aggregate_arrayrecords(sound, self.weighted_by_key)
            self._global = ArrayRecord({k: averaged.get(k, v) for k, v in self._global.items()})
            metrics = self.train_metrics_aggr_fn(sound, self.weighted_by_key)
        up = [next(iter(r.array_records.values())).count_bytes() for r in sound]
        entry = dict(self._pending)
        entry.update(
            {
                "clients": len(sound),
                "rejected": rejected,
                "examples": sum(
                    float(next(iter(r.metric_records.values()))[self.weighted_by_key])
                    for r in sound
                ),
                "bytes-up-per-client": float(np.mean(up)) if up else 0.0,
                "bytes-down-per-client": (
                    entry["active-bytes"] * entry["sampled"]
                    + entry["prefix-bytes"] * entry["prefix-sends"]
                )
                / max(entry["sampled"], 1),
            }
        )
        entry.update({k: float(v) for k, v in metrics.items() if isinstance(v, int | float)})
        self.round_log.append(entry)
        for key in ("clients", "rejected", "bytes-up-per-client", "bytes-down-per-client"):
            metrics[key] = entry[key]
        return self._global, metrics

    # --- federated evaluation ------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """At each stage end, ``num_evaluate_nodes`` nodes score the finished stage's model."""
        server_round += self._round_offset
        if not self.is_stage_end(server_round) or self.num_evaluate_nodes == 0:
            return []
        nodes = self._sample(
            grid, server_round, "evaluate", self.num_evaluate_nodes, self.fraction_evaluate, 0
        )
        messages, _ = self._messages(nodes, server_round, config, MessageType.EVALUATE)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of sound evaluation metrics (bad replies rejected and logged)."""
        server_round += self._round_offset
        replies = self._resend_missing_prefix(list(replies), server_round)
        sound, _ = self._sound_replies(replies, expected=None)
        return self.evaluate_metrics_aggr_fn(sound, self.weighted_by_key) if sound else None


def _metric(msg: Message, key: str) -> float:
    for record in msg.content.metric_records.values():
        if key in record:
            return float(record[key])  # type: ignore[arg-type]
    return 0.0
