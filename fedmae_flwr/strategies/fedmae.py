"""FedMAE: a Flower Message-API strategy that grows a ViT one federated block at a time.

Protocol (what travels in a message; a foreign ClientApp implementing it can join):

- Server -> node, ``query`` (once per node and run, before it is first sampled): ``"config"``
  with ``fedmae-query = "node-key"``; the node replies ``"config"`` with ``node-key`` (a stable
  name, e.g. ``partition-3``; :func:`fedmae_flwr.client.identify_reply`). Nodes are sampled and
  their replies combined in key order (:mod:`.node_keys`); a node without an answer goes by its
  node id.
- Server -> node, ``train`` and ``evaluate``: ``"arrays"`` (ArrayRecord: only the tensors active in
  the stage, see :func:`fedmae_flwr.models.active_key`), ``"config"`` (ConfigRecord with
  ``server-round``, ``stage``, ``frozen-blocks``, ``prefix-version``; ``proximal-mu`` with
  ``aggregator=FedProx(...)``; ``model-config``, the server's ``ModelConfig`` as JSON, when the
  strategy was given it: a node whose own differs refuses as node-unusable, naming the fields,
  since heads, image size or mask ratio change no tensor shape), and ``"prefix"``
  (ArrayRecord: the frozen stem and finished blocks) only when the strategy does not know the
  node to hold ``prefix-version``.
- Node -> server: ``"arrays"`` (train only: the trained active tensors, same keys and shapes) and
  ``"metrics"`` with ``num-examples``. A node that lacks the announced prefix (e.g. it restarted
  and lost its ``Context.state``) replies ``prefix-missing = 1`` and ``num-examples = 0``; it is
  left out of that round's aggregate (counted as ``prefix-missing``) and its next message
  carries the prefix again. A node that cannot take part at all (e.g. its node-config names no
  data) replies with an Error whose reason contains ``[fedmae:node-unusable]``
  (:data:`~fedmae_flwr.strategies.replies.NODE_UNUSABLE`): it is rejected (``node-unusable``),
  logged, and not sampled again in this run (``excluded-nodes`` in the round record).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
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
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from fedmae_flwr.config import ModelConfig, as_section
from fedmae_flwr.models.cascade import check_model_keys, check_state_fits
from fedmae_flwr.strategies.accounting import (
    EVALUATION_REJECTED,
    NodeLedger,
    SentRound,
    mean_of_reported,
    round_record,
)
from fedmae_flwr.strategies.aggregation import (
    ActiveAggregation,
    ServerSideDP,
    refuse_dp_wrapper,
    refuse_strategy_mixins,
    train_config_entries,
)
from fedmae_flwr.strategies.node_keys import NodeKeys
from fedmae_flwr.strategies.prefix_cache import PrefixCache
from fedmae_flwr.strategies.replies import UNUSABLE, ReplyRules, Triage, src_node, triage
from fedmae_flwr.strategies.sampling import fixed_nodes, seeded_sample, wait_for_nodes
from fedmae_flwr.strategies.stage_guard import StageGuard
from fedmae_flwr.strategies.stage_plan import StagePlan, StateFactory, num_blocks

# The key of a message's config that carries the server's ModelConfig (JSON), when it has one.
MODEL_CONFIG = "model-config"


def _whole(value: object, least: int) -> bool:
    """A whole number (no bool, no float) >= ``least``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


class FedMAE(FedAvg):
    """Progressive one-block federated MAE (the FedMAE cascade) over any Flower aggregation.

    Stage ``s`` (rounds ``s*R+1 .. (s+1)*R``) trains block ``s`` with the final norm and the decoder
    (and the patch embedding in stage 0) while blocks ``0..s-1`` stay frozen on the nodes. Only the
    active tensors travel every round; the frozen prefix reaches each node once per stage. At the
    first round of a new stage the finished block stays in the model and block ``s+1`` is appended.
    :meth:`aggregate_train` returns the FULL global model, as :meth:`Strategy.start` requires.
    How the active tensors of sound replies are combined is ``aggregator``'s business
    (:mod:`fedmae_flwr.strategies.aggregation`); compose, never subclass: ``class X(FedMAE,
    FedMedian)`` raises TypeError, and so does running FedMAE inside Flower's DP wrappers.

    Args:
        depth, rounds_per_stage, new_block, new_decoder, next_block_init, decoder_per_stage,
            progressive: the :class:`~fedmae_flwr.strategies.StagePlan` (attribute ``plan``).
        num_train_nodes: nodes sampled per train round; None samples as FedAvg (``fraction_train``).
        partial_rounds: False (Flower's way): a round waits for ``max(min_available_nodes,
            num_train_nodes)`` usable nodes. True: it starts once ``min_available_nodes`` are
            connected and trains on ``num_train_nodes`` of them, or on all when fewer (a
            warning says so): training goes on with the devices that are there.
        num_evaluate_nodes: nodes sampled for federated evaluation at each stage end (0: none);
            at most: where fewer usable nodes are connected then, those evaluate (a warning
            says so) rather than the run wait or fail for a measurement.
        seed: node sampling seed; a round's sample depends on ``(seed, round)`` and the nodes'
            keys only (:mod:`.node_keys`: each node is asked once; ``partition-<id>`` in a
            simulation), not on Flower's random node ids, so another run or a resumed run at
            the same seed samples the same data, and replies are combined in key order.
        sample_by: ``"node-key"`` (as above) or ``"node-id"``: order nodes by Flower's node
            ids and send no key queries (for thousands of nodes, where asking each costs more
            than reproducible samples are worth; a simulation then samples differently each
            run).
        first_round: the round :meth:`start` begins with; > 1 resumes after round
            ``first_round - 1``. Fixed here: every hook numbers rounds as the whole run does.
        node_wait_timeout: seconds to wait for enough nodes before sampling raises RuntimeError.
        max_update_norm: reject a train reply whose update of the active tensors is longer (L2)
            than this multiple of their norm when the stage began (its first round; relative
            to each round's norm, a node replying just inside the bound would compound it
            round after round); 0 = no bound.
        max_examples: reject a reply claiming more ``num-examples`` than this; None = no cap.
        model: the ``ModelConfig`` the nodes must build (or a mapping of its fields; sent
            with each message as ``model-config``; the client helpers refuse to train another
            architecture, which shapes alone may not reveal); its ``depth`` at least ``depth``,
            and :meth:`start` refuses an initial model that ``CascadeMAE(model)`` would not load
            (tensors, shapes, float32: what the helpers build and reply in). None: not sent,
            not checked.
        aggregator: a Flower strategy whose ``aggregate_train`` combines the sound replies'
            active tensors (e.g. ``FedMedian()``, ``FedAdam(eta=0.01)``); None: FedAvg.
        dp_noise_multiplier, dp_clipping_norm: server-side DP on the active tensors (each
            update clipped to L2 ``dp_clipping_norm``, Gaussian noise of std
            ``dp_noise_multiplier * dp_clipping_norm / sound replies`` on the aggregate, seeded
            by ``seed`` and the round); ``dp_noise_multiplier = 0``: off.
        **fedavg_kwargs: passed to :class:`flwr.serverapp.strategy.FedAvg`.

    Each train round's record (stage, sampled, clients, rejected, prefix-missing, excluded
    nodes, prefix sends, bytes up/down per client, examples, aggregated client metrics) is the
    MetricRecord :meth:`aggregate_train` returns; :attr:`last_round_metrics` gives it to an
    ``evaluate_fn``.

    Fails loud: :meth:`start` raises ValueError on an initial model with parameter names outside
    :data:`~fedmae_flwr.models.cascade.KEY_CONTRACT` or block / decoder shapes other than
    ``new_block`` / ``new_decoder`` make (:meth:`StagePlan.check_model`), and a stage in which
    no round was aggregated (no sound reply, or an ``aggregator`` that combined none) raises
    RuntimeError (naming the stage and the rejection reasons) instead of appending an untrained
    block.
    """

    def __init__(
        self,
        depth: int,
        rounds_per_stage: int,
        new_block: StateFactory,
        new_decoder: StateFactory | None = None,
        next_block_init: str = "fresh",
        decoder_per_stage: str = "keep",
        num_train_nodes: int | None = None,
        partial_rounds: bool = False,
        num_evaluate_nodes: int = 0,
        seed: int = 0,
        sample_by: str = "node-key",
        progressive: bool = True,
        first_round: int = 1,
        node_wait_timeout: float = 300.0,
        max_update_norm: float = 10.0,
        max_examples: float | None = None,
        model: ModelConfig | Mapping[str, Any] | None = None,
        aggregator: Strategy | None = None,
        dp_noise_multiplier: float = 0.0,
        dp_clipping_norm: float = 1.0,
        **fedavg_kwargs: Any,
    ) -> None:
        if first_round < 1:
            raise ValueError(f"first_round must be >= 1, got {first_round}")
        # Checked here, not where they are first used (a stage end, after a whole stage's work).
        if num_train_nodes is not None and not _whole(num_train_nodes, 1):
            raise ValueError(
                f"num_train_nodes must be None or a whole number >= 1, got {num_train_nodes!r}"
            )
        if not _whole(num_evaluate_nodes, 0) or not node_wait_timeout >= 0:
            raise ValueError(
                f"num_evaluate_nodes must be a whole number >= 0 and node_wait_timeout >= 0, "
                f"got {num_evaluate_nodes!r}, {node_wait_timeout!r}"
            )
        if not max_update_norm >= 0 or not (max_examples is None or max_examples > 0):
            raise ValueError(
                f"max_update_norm must be >= 0 and max_examples None or > 0, got "
                f"{max_update_norm}, {max_examples}"
            )
        if model is not None:
            model = as_section(ModelConfig, model)
            if depth > model.depth:  # the nodes build model.depth blocks at most
                raise ValueError(
                    f"depth {depth} is more than model.depth {model.depth}: the nodes' "
                    f"CascadeMAE holds at most {model.depth} blocks, so stage {model.depth} "
                    "would fail on every node after the stages before it trained"
                )
        self._model = model
        self.plan = StagePlan(depth, rounds_per_stage, new_block, new_decoder, progressive,
                              next_block_init, decoder_per_stage)  # fmt: skip
        # num_rounds + 1 is a run resumed after its last round's checkpoint: nothing to train.
        if first_round > self.plan.num_rounds + 1:
            raise ValueError(
                f"first_round {first_round} is past the cascade's last round "
                f"{self.plan.num_rounds} (depth {depth} x rounds_per_stage {rounds_per_stage})"
            )
        # Each metric averaged over the replies that report it (Flower's default counts a reply
        # without it as a 0); a function of one's own still wins.
        fedavg_kwargs.setdefault("train_metrics_aggr_fn", mean_of_reported)
        fedavg_kwargs.setdefault("evaluate_metrics_aggr_fn", mean_of_reported)
        super().__init__(**fedavg_kwargs)
        # FedAvg's own sampling knobs that FedMAE's sampling does not read, so they say so.
        unread = ["fraction_evaluate", "min_evaluate_nodes"]
        unread += ["fraction_train", "min_train_nodes"] if num_train_nodes is not None else []
        if passed := [k for k in unread if k in fedavg_kwargs]:
            log(WARNING, "FedMAE: %s do not choose FedMAE's nodes and are ignored: "
                "num_train_nodes samples each train round (None: fraction_train, "
                "min_train_nodes), num_evaluate_nodes each stage end's evaluation",
                ", ".join(passed))  # fmt: skip
        self.num_train_nodes = num_train_nodes
        self.partial_rounds = partial_rounds
        self.num_evaluate_nodes = num_evaluate_nodes
        self.seed = seed
        if sample_by not in ("node-key", "node-id"):
            raise ValueError(f"sample_by must be 'node-key' or 'node-id', got {sample_by!r}")
        self.sample_by = sample_by
        self.node_wait_timeout = node_wait_timeout
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.model_config = None if model is None else json.dumps(dataclasses.asdict(model))
        if self.weighted_by_key != "num-examples":
            log(WARNING, "FedMAE: weighted_by_key %r: fedmae_flwr.client's helpers report "
                "'num-examples' only, so their replies would all be rejected; this needs a "
                "ClientApp of your own that reports %r", self.weighted_by_key,
                self.weighted_by_key)  # fmt: skip
        if (self.arrayrecord_key, self.configrecord_key) != ("arrays", "config"):
            raise ValueError(
                "arrayrecord_key and configrecord_key are fixed by FedMAE's message protocol "
                f"('arrays', 'config'; the client helpers read those), got "
                f"{self.arrayrecord_key!r}, {self.configrecord_key!r}"
            )
        self._first_round = first_round
        self._in_own_start = False  # start() runs the rounds (else a wrapper's start does)
        self._round_timeout = 3600.0  # start()'s timeout: how long replies are waited for
        dp = ServerSideDP(dp_noise_multiplier, dp_clipping_norm, seed)
        self.aggregation = ActiveAggregation(
            aggregator, self.weighted_by_key, dp if dp_noise_multiplier > 0 else None
        )
        self._restored_state: dict[str, np.ndarray] = {}  # restore_server_state's, for start()
        self._new_run()

    def _new_run(self) -> None:
        """Forget what an earlier :meth:`start` learned of its nodes and stages: a second run
        with the same instance (new nodes, new Contexts) begins as the first did."""
        self._stage_guard = StageGuard()
        self._global = ArrayRecord()
        self._prefix = PrefixCache()
        self._sent: SentRound | None = None
        self._sampled: list[int] = []  # the train round's nodes
        self._evaluated: list[int] = []  # the stage end's evaluating nodes
        # nodes that said they cannot take part (NODE_UNUSABLE), with what they said
        self._excluded: dict[int, str] = {}
        self._ledger = NodeLedger()
        self._node_keys = NodeKeys()
        self._last_round_metrics: MetricRecord | None = None
        self._last_evaluation: tuple[int, int, MetricRecord] | None = None  # round, nodes, record
        self._last_round = self.plan.num_rounds  # start(num_rounds=...) may stop earlier
        # Afresh, or as restore_server_state left it (a run driven by another start() too).
        self._load_restored_state()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse ``class X(FedMAE, FedMedian)``: pass ``aggregator=FedMedian()`` instead."""
        super().__init_subclass__(**kwargs)
        refuse_strategy_mixins(cls, FedMAE)

    @property
    def first_round(self) -> int:
        """The round :meth:`start` begins with (1, or the round after a resumed checkpoint)."""
        return self._first_round

    @property
    def last_round_metrics(self) -> MetricRecord | None:
        """A copy of the record the latest :meth:`aggregate_train` returned (None before).

        Flower's ``start()`` calls ``evaluate_fn(round, arrays)`` right after that round's
        aggregation, so there it is the current round's record (its ``round`` key says which).
        """
        record = self._last_round_metrics
        return None if record is None else MetricRecord(dict(record.items()))

    def evaluation_of(self, server_round: int) -> tuple[int, MetricRecord] | None:
        """``(sound replies, their aggregated MetricRecord)`` of ``server_round``'s node
        evaluation, where nodes were asked (None otherwise); the record also counts the replies
        rejected (key :data:`EVALUATION_REJECTED`), and holds only that without a sound one.
        ``server_round`` is the run's round (a resumed run's continue its count).
        Flower's ``start()`` evaluates on the
        nodes before it calls ``evaluate_fn(round, arrays)``, so an ``evaluate_fn`` can record
        it with the round (``Result.evaluate_metrics_clientapp`` holds it only at the end)."""
        if self._last_evaluation is None or self._last_evaluation[0] != server_round:
            return None
        _, nodes, record = self._last_evaluation
        return nodes, MetricRecord(dict(record.items()))

    def server_state(self) -> dict[str, np.ndarray]:
        """The aggregation's state after the latest round, as named arrays
        (:meth:`ActiveAggregation.state`: the stage, the aggregator's step count, a server
        optimizer's moments): what a checkpoint needs besides the model for a run resumed
        mid-stage to go on as the uninterrupted one. Call it where the model is checkpointed:
        in an ``evaluate_fn``, which Flower calls right after each round's aggregation."""
        return self.aggregation.state()

    def restore_server_state(
        self, state: dict[str, np.ndarray], arrays: ArrayRecord | None = None
    ) -> None:
        """Resume with ``state``, what :meth:`server_state` returned after round
        ``first_round - 1``; the run puts it back when it begins (after its reset), and
        :meth:`start` checks it against its ``initial_arrays``.

        Args:
            state: the named arrays.
            arrays: the model of that round (its checkpoint): given, the state is checked
                against it now (the buffers' tensors and shapes), not only at :meth:`start`.

        Raises:
            ValueError: ``first_round`` is 1 (nothing to resume), or ``state`` is not such a
                state for this aggregator or model (:meth:`ActiveAggregation.load_state`).
        """
        if self.first_round == 1:
            raise ValueError("restore_server_state is for a resumed run: first_round is 1")
        self._restored_state = dict(state)
        self._load_restored_state(arrays)

    def _load_restored_state(self, arrays: ArrayRecord | None = None) -> None:
        """The aggregation as :meth:`restore_server_state` left it (or reset), checked against
        the model ``arrays`` of round ``first_round - 1`` where given."""
        state, active = self._restored_state, None
        if state and arrays is not None:
            last = self.first_round - 1
            stage = self.plan.stage_of(last)
            saved = state.get("stage")
            saved_stage = np.asarray(saved).reshape(-1).tolist() if saved is not None else None
            earlier = (saved_stage is not None and len(saved_stage) == 1
                       and type(saved_stage[0]) is int and 0 <= saved_stage[0] < stage)  # fmt: skip
            if earlier:
                # Saved before a stage's first round with no sound reply (by code that did not
                # yet mark the stage then): the state of a finished stage, which the
                # uninterrupted run would have reset at this stage's first combine.
                log(INFO, "FedMAE: the restored aggregation state is of stage %s, which ended; "
                    "stage %d goes on afresh, as it would have", saved_stage[0], stage)  # fmt: skip
                state = {}
            elif saved_stage is not None and saved_stage != [stage]:
                raise ValueError(
                    f"server state of stage {saved_stage}, but round "
                    f"{last} (first_round - 1) is in stage {stage}"
                )
            active = {k: tuple(v.shape) for k, v in self.plan.split(arrays, last)[0].items()}
        self.aggregation.load_state(state, active)

    @property
    def node_reports(self) -> dict[str, dict[str, int]]:
        """What each node reported of its data (:class:`~.accounting.NodeLedger`), by node id."""
        return self._ledger.report()

    def summary(self) -> None:
        p = self.plan
        log(INFO, "\t├──> FedMAE: depth %d x %d rounds per stage", p.depth, p.rounds_per_stage)
        log(INFO, "\t│\t└──next block: %s | decoder per stage: %s | nodes per round: %s",
            p.next_block_init, p.decoder_per_stage, self.num_train_nodes)  # fmt: skip
        refuse_dp_wrapper(self)  # Strategy.start() begins with summary()
        self.aggregation.summary()
        # FedAvg's own summary lists fraction_evaluate and min_evaluate_nodes, which FedMAE
        # does not read: what it samples by instead.
        train = (
            f"{self.num_train_nodes} per round"
            if self.num_train_nodes is not None
            else f"fraction {self.fraction_train:.2f} (at least {self.min_train_nodes})"
        )
        log(INFO, "\t├──> Sampling: train %s%s | at least %d connected | evaluate %d at each "
            "stage end", train, ", or fewer (partial rounds)" if self.partial_rounds else "",
            self.min_available_nodes, self.num_evaluate_nodes)  # fmt: skip
        log(INFO, "\t└──> Weighted by: '%s'", self.weighted_by_key)

    # --- run ------------------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int | None = None,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds ``first_round``..``num_rounds`` (default: to the end of the schedule).

        With ``first_round`` > 1, ``initial_arrays`` is the model after round ``first_round - 1``
        (e.g. its checkpoint; :meth:`restore_server_state` gives back the aggregation's state
        of that round); round numbers (hooks, ``evaluate_fn``, the Result), stages and
        sampling continue as in the uninterrupted run. Nodes get the frozen prefix again.
        ``evaluate_fn(0, arrays)`` is Flower's call before this start()'s first round: on a
        resume, ``arrays`` is that checkpoint. ``first_round = depth * rounds_per_stage + 1``
        (resumed after the last round) trains nothing and returns ``initial_arrays``.
        """
        self._new_run()
        self._check_initial_model(initial_arrays)
        self._load_restored_state(initial_arrays)  # checked against the model it resumes
        self._round_timeout = timeout
        last = self.plan.num_rounds if num_rounds is None else num_rounds
        if last > self.plan.num_rounds:  # a stage past the last block has no block to train
            raise ValueError(
                f"num_rounds {num_rounds} is past the cascade's last round: depth "
                f"{self.plan.depth} x rounds_per_stage {self.plan.rounds_per_stage} = "
                f"{self.plan.num_rounds}; pass num_rounds <= {self.plan.num_rounds} (or None)"
            )
        if last < self.plan.num_rounds:
            log(WARNING, "FedMAE: num_rounds %d stops before the cascade's last round %d: the "
                "model will have %d of its %d blocks", last, self.plan.num_rounds,
                self.plan.blocks_at(last), self.plan.depth)  # fmt: skip
        self._last_round = last
        if self.first_round == last + 1 == self.plan.num_rounds + 1:  # resumed after the end
            log(INFO, "FedMAE: the run ended with round %d: nothing left to train", last)
            return Result(arrays=initial_arrays)
        if not self.first_round <= last:
            raise ValueError(f"first_round {self.first_round} is past the last round {last}")
        shift = self.first_round - 1

        def shifted(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # Round 0 is Flower's "before training" call; later rounds continue the run's count.
            assert evaluate_fn is not None
            return evaluate_fn(server_round + shift if server_round else 0, arrays)

        self._in_own_start = True
        try:
            result = super().start(grid, initial_arrays, last - shift, timeout, train_config,
                                   evaluate_config, shifted if evaluate_fn else None)  # fmt: skip
        finally:
            self._in_own_start = False
        for history in (result.train_metrics_clientapp, result.evaluate_metrics_clientapp,
                        result.evaluate_metrics_serverapp):  # fmt: skip
            renumbered = {r + shift if r else 0: m for r, m in history.items()}
            history.clear()
            history.update(renumbered)
        return result

    def _check_initial_model(self, arrays: ArrayRecord) -> None:
        """The names, and the block and decoder shapes, of the model ``first_round`` starts from
        (:meth:`StagePlan.check_model`); ValueError before any node gets it."""
        check_model_keys(arrays.keys())
        tensors = {k: (v.shape, v.dtype) for k, v in arrays.items()}
        self.plan.check_model(tensors, self.first_round)
        if self._model is not None:  # the nodes build CascadeMAE(model): it must load there
            try:
                check_state_fits(self._model, tensors)
            except ValueError as err:
                raise ValueError(f"FedMAE: the initial model, with model=: {err}") from None

    def _run_round(self, flower_round: int) -> int:
        """The run's round number of the ``flower_round``-th round of this :meth:`start`."""
        return flower_round + self.first_round - 1

    # --- train ------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Grow the model at a stage start, then send each sampled node the active tensors."""
        refuse_dp_wrapper(self)
        if server_round == 1 and not self._in_own_start:
            # Driven by another start() (a wrapper's, Flower's own): begin the run as ours does.
            self._new_run()
            self._check_initial_model(arrays)
        server_round = self._run_round(server_round)
        if server_round > self.plan.num_rounds:  # no block left to train
            raise ValueError(
                f"round {server_round} is past the cascade's last round {self.plan.num_rounds} "
                f"(depth {self.plan.depth} x rounds_per_stage {self.plan.rounds_per_stage}): "
                f"run at most {self.plan.num_rounds - self.first_round + 1} rounds"
            )
        self._global = self._grow(arrays, server_round)
        prefix = self.plan.split(self._global, server_round)[1]
        self._prefix.update(ArrayRecord(prefix), self.plan.frozen_blocks(server_round))
        count, source = self.num_train_nodes, "num_train_nodes"
        if count is None:  # as FedAvg: a fraction of the connected nodes, at least a minimum
            usable = self._usable(grid)
            count = max(int(len(usable) * self.fraction_train), self.min_train_nodes)
            source = (f"num_train_nodes None: min_train_nodes {self.min_train_nodes}, "
                      f"fraction_train {self.fraction_train:g}")  # fmt: skip
        nodes = self._sample(grid, server_round, "train", count, count_from=source)
        messages, sends = self._messages(nodes, server_round, config, MessageType.TRAIN)
        self._sampled = nodes
        stage = self.plan.stage_of(server_round)
        self._sent = SentRound(
            server_round, stage, len(nodes), self._active(server_round).count_bytes(),
            self._prefix.record.count_bytes(), sends, self._global.count_bytes(),
        )  # fmt: skip
        # Flower numbers a resumed run's rounds from 1 ("[ROUND 2/3]" for round 5 of 6)
        log(INFO, "configure_train: round %d of %d, stage %d, %d nodes, %d prefix sends",
            server_round, self._last_round, stage, len(nodes), sends)  # fmt: skip
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Combine the active tensors of sound replies (``aggregator``) into the full model.

        Replies with an error, wrong keys/shapes/dtypes, non-finite values, an update longer
        than ``max_update_norm`` allows or more than ``max_examples`` are rejected, logged and
        counted (:mod:`.replies`), never raised; nodes that lacked the prefix are left out and
        get it next time; a round without sound replies keeps the global model, and a stage
        without any raises RuntimeError. Returns the round's record.
        """
        if self._sent is None:
            raise RuntimeError("aggregate_train before configure_train")
        run_round = self._run_round(server_round)
        active = self._active(run_round)
        replies = self._node_keys.order_replies(replies)  # float sums depend on the order
        stage_norm = self.aggregation.stage_norm(self.plan.stage_of(run_round))
        sorted_replies = self._triage(
            replies, expected=active, senders=self._sampled, reference_norm=stage_norm
        )
        # A node that sent nothing usable may have crashed and lost its prefix with its state:
        # it gets the prefix again with its next message instead of wasting a round on saying so.
        replied = {src_node(m) for m in replies}
        self._prefix.forget([n for n in self._sampled if n not in replied])
        self._ledger.add(run_round, sorted_replies, self.weighted_by_key)
        client_metrics = MetricRecord()
        # Called without sound replies too: the aggregation's state (checkpointed) then names
        # this round's stage, so a run resumed after a round that lost every reply goes on.
        # combine() keeps the active tensors' dtypes (pinned).
        combined = self.aggregation.combine(
            active, sorted_replies.sound, self.plan.stage_of(run_round), run_round
        )
        if not sorted_replies.sound:
            log(WARNING, "FedMAE: round %d: no sound reply with examples (%d rejected, %d "
                "without examples, %d lacked the prefix); the model stays as it was", run_round,
                sorted_replies.rejected, sorted_replies.empty,
                len(sorted_replies.prefix_missing))  # fmt: skip
        else:
            if combined is None:  # e.g. Bulyan with too few replies: it logged why
                name = type(self.aggregation.strategy).__name__
                log(WARNING, "FedMAE: round %d: the aggregator %s combined none of the %d sound "
                    "replies; the model stays as it was", run_round, name,
                    len(sorted_replies.sound))  # fmt: skip
            else:
                self._global = ArrayRecord({k: combined.get(k, v) for k, v in self._global.items()})
            client_metrics = self.train_metrics_aggr_fn(sorted_replies.sound, self.weighted_by_key)
        skipped = bool(sorted_replies.sound) and combined is None
        self._check_stage(run_round, sorted_replies, aggregated=combined is not None)
        self._last_round_metrics = round_record(
            self._sent, sorted_replies, client_metrics, self.weighted_by_key, len(self._excluded),
            aggregation_skipped=skipped,
        )  # fmt: skip
        return self._global, self._last_round_metrics

    # --- federated evaluation -----------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """At each stage end, ``num_evaluate_nodes`` nodes score the finished stage's model."""
        self._evaluated = []  # none asked until sampled below
        server_round = self._run_round(server_round)
        if not self.plan.is_stage_end(server_round) or self.num_evaluate_nodes == 0:
            return []
        # The round's training just ran with the nodes there are; evaluation is a measurement,
        # so it takes those (up to num_evaluate_nodes) instead of waiting for more: a deployment
        # of 2 nodes with the default evaluate-clients (5) would otherwise fail at stage end.
        usable = self._usable(grid)
        count = min(self.num_evaluate_nodes, len(usable))
        if count < self.num_evaluate_nodes:
            log(WARNING, "FedMAE: round %d evaluates on %d nodes, not %d: only %d usable nodes "
                "are connected (num_evaluate_nodes; run-config key `evaluate-clients`)",
                server_round, count, self.num_evaluate_nodes, len(usable))  # fmt: skip
        if count == 0:
            return []
        nodes = self._sample(grid, server_round, "evaluate", count, wait=False)
        self._evaluated = nodes
        if not nodes:  # every usable node left since they were counted
            return []
        return self._messages(nodes, server_round, config, MessageType.EVALUATE)[0]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of sound evaluation metrics (bad replies rejected and logged)."""
        replies = self._node_keys.order_replies(replies)
        sorted_replies = self._triage(replies, expected=None, senders=self._evaluated)
        sound = sorted_replies.sound
        record = self.evaluate_metrics_aggr_fn(sound, self.weighted_by_key) if sound else None
        if record is not None and EVALUATION_REJECTED in record:  # the server's count, below
            log(WARNING, "FedMAE: round %d: the nodes' evaluation metric '%s' is named as the "
                "server's own key and is left out", server_round, EVALUATION_REJECTED)  # fmt: skip
            record = MetricRecord({k: v for k, v in record.items() if k != EVALUATION_REJECTED})
        if self._evaluated:  # for evaluation_of, with the rejections, sound replies or not
            kept = MetricRecord(dict(record.items()) if record is not None else {})
            kept[EVALUATION_REJECTED] = sorted_replies.rejected
            # The run's round: evaluate_fn (start()'s `shifted`) asks by it, also when resumed
            self._last_evaluation = (self._run_round(server_round), len(sound), kept)
        return record

    # --- helpers --------------------------------------------------------------------------------
    def _grow(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        """``arrays`` with the blocks the round needs (see :meth:`StagePlan.grow`)."""
        if num_blocks(arrays.keys()) >= self.plan.blocks_at(server_round):
            return arrays
        state = {k: v.numpy() for k, v in arrays.items()}
        grown = self.plan.grow(state, server_round)
        log(INFO, "FedMAE: %d blocks (%s init)", num_blocks(grown), self.plan.next_block_init)
        return ArrayRecord(
            {k: arrays[k] if v is state.get(k) else Array(np.ascontiguousarray(v))
             for k, v in grown.items()}
        )  # fmt: skip

    def _active(self, server_round: int) -> ArrayRecord:
        """The tensors trained in ``server_round`` (sent, returned and averaged)."""
        return ArrayRecord(self.plan.split(self._global, server_round)[0])

    def _triage(
        self,
        replies: Iterable[Message],
        expected: ArrayRecord | None,
        senders: list[int],
        reference_norm: float | None = None,
    ) -> Triage:
        rules = ReplyRules(
            self.weighted_by_key, self.max_update_norm, self.max_examples, self.aggregation.loss_key
        )
        out = triage(replies, expected, self.weighted_by_key, rules, senders=set(senders),
                     reference_norm=reference_norm)  # fmt: skip
        if out.prefix_missing:
            log(WARNING, "FedMAE: %d nodes lack prefix %s; it goes with their next message",
                len(out.prefix_missing), self._prefix.version)  # fmt: skip
            self._prefix.forget(out.prefix_missing)
        self._prefix.forget(node for node, _ in out.rejections)
        for node, rejection in out.rejections:
            if rejection.kind == UNUSABLE and node not in self._excluded:
                log(WARNING, "FedMAE: node %s is not sampled again in this run: it replied "
                    "that it cannot take part (fix its node-config and restart the run)",
                    node)  # fmt: skip
                self._excluded[node] = rejection.reason
        return out

    def _check_stage(self, server_round: int, replies: Triage, aggregated: bool) -> None:
        """Count the stage's replies; at its end, fail if no round was aggregated
        (:mod:`.stage_guard`)."""
        self._stage_guard.add(self.plan.stage_of(server_round), replies, aggregated)
        if self.plan.is_stage_end(server_round) or server_round == self._last_round:
            stage_start = self._stage_guard.stage * self.plan.rounds_per_stage + 1
            self._stage_guard.check_end(max(stage_start, self.first_round), server_round)

    def _usable(self, grid: Grid) -> list[int]:
        """The connected nodes that did not say they cannot take part."""
        return [n for n in grid.get_node_ids() if n not in self._excluded]

    def _sample(
        self,
        grid: Grid,
        server_round: int,
        kind: str,
        count: int,
        wait: bool = True,
        count_from: str = "",
    ) -> list[int]:
        """``count`` usable nodes drawn by seed; with ``wait``, once at least
        ``max(min_available_nodes, count)`` are connected (``node_wait_timeout``), or with
        ``partial_rounds`` once ``min_available_nodes`` are, then up to ``count`` of them;
        without, up to ``count`` of those connected now (none: an empty list)."""
        if not wait:  # a node may have left since the caller counted: take who is there
            nodes = sorted(n for n in grid.get_node_ids() if n not in self._excluded)
            count = min(count, len(nodes))
            if count == 0:
                return []
        else:
            if self.partial_rounds:
                wanted = max(1, self.min_available_nodes)
                because = f"min_available_nodes {self.min_available_nodes} (partial rounds)"
            else:
                wanted = max(self.min_available_nodes, count)
                default = " (FedAvg's default: 2)" if self.min_available_nodes == 2 else ""
                because = (f"larger of min_available_nodes {self.min_available_nodes}{default} "
                           f"and the round's {count} {kind} nodes"
                           + (f" ({count_from})" if count_from else ""))  # fmt: skip
            nodes = wait_for_nodes(grid, wanted, self.node_wait_timeout, excluded=self._excluded,
                                   fixed=fixed_nodes(grid), wanted_because=because)  # fmt: skip
            if len(nodes) < count:
                log(WARNING, "FedMAE: round %d %ss on the %d usable nodes connected, not %d "
                    "(partial rounds: min_available_nodes %d)", server_round, kind, len(nodes),
                    count, self.min_available_nodes)  # fmt: skip
                count = len(nodes)
        if self.sample_by == "node-key":  # else every node goes by its node id
            self._node_keys.learn(grid, nodes, self._round_timeout)
        return seeded_sample(self._node_keys.order(nodes), count, self.seed, kind, server_round)

    def _messages(
        self, node_ids: list[int], server_round: int, config: ConfigRecord, message_type: str
    ) -> tuple[list[Message], int]:
        """One message per node, the prefix attached where the node is not known to hold it.

        Returns the messages and the number of prefix copies attached.
        """
        active = self._active(server_round)
        extra = train_config_entries(self.aggregation.strategy)
        if message_type != MessageType.TRAIN:
            extra = {}
        config = ConfigRecord({**config, **extra, "server-round": server_round,
                               "stage": self.plan.stage_of(server_round),
                               "frozen-blocks": self.plan.frozen_blocks(server_round),
                               "prefix-version": self._prefix.version})  # fmt: skip
        if self.model_config is not None:
            config[MODEL_CONFIG] = self.model_config
        messages, sends = [], 0
        for node_id in node_ids:
            content = RecordDict({self.arrayrecord_key: active, self.configrecord_key: config})
            sends += self._prefix.attach(node_id, content)
            messages.append(
                Message(content=content, message_type=message_type, dst_node_id=node_id)
            )
        return messages, sends
