"""The aggregation seam: how FedMAE combines the active tensors of a round's sound replies.

FedMAE decides WHAT travels (the stage's active tensors every round, the frozen prefix once per
node per stage) and which replies are sound (:mod:`.replies`). HOW the active tensors of the
sound replies become the new active tensors is a Flower strategy instance, passed in:
``FedMAE(..., aggregator=FedMedian())`` (default :class:`~flwr.serverapp.strategy.FedAvg`).
:class:`ActiveAggregation` calls it as a function:

- Only its ``aggregate_train`` is used, on *copies* of the sound replies (Flower's FedMedian and
  FedTrimmedAvg pop the arrays out of the replies they read) holding only the active tensors,
  in the order of the current active tensors, and the metrics all of them share (Flower's
  strategies raise on differing key sets; its metric aggregate is not used: FedMAE's round
  record aggregates the client metrics). Its sampling, messaging and evaluation settings are
  unused: FedMAE samples, sends and evaluates.
- The ``server_round`` it sees counts its own steps within the stage (1, 2, ... ; a round without
  sound replies is no step), so FedAdam's bias correction restarts with its moments.
- Server-optimizer strategies keep state keyed by tensor name, and the tensors change with the
  stage: before each aggregation ``current_arrays`` is set to the current active tensors (as
  their ``configure_train`` would), and at each stage change their state is reset (FedOpt family
  - FedAdam, FedYogi, FedAdagrad: ``m_t``, ``v_t``; FedAvgM: ``momentum_vector``). Server
  optimizer state is per stage. Other state of a custom strategy is its own business.
- That per-stage state (the stage, the aggregator's step count, the active tensors' norm when
  the stage began, and the FedOpt family's ``m_t`` and ``v_t`` or FedAvgM's momentum) is what
  :meth:`ActiveAggregation.state` returns as named arrays, for a checkpoint, and
  :meth:`ActiveAggregation.load_state` puts back: a run resumed mid-stage continues the server
  optimizer where it was. The stage's starting norm is what FedMAE's update bound is relative
  to (:meth:`ActiveAggregation.stage_norm`): relative to the tensors of each round instead, a
  node replying just inside it compounds, round after round.
- What it returns is checked against the active tensors (same keys and shapes; cast to their
  dtype) before FedMAE merges it into the full model. An aggregate holding NaN or inf, or an
  aggregator that raises on the replies, undoes the step: the model and the aggregator's state
  stay as they were (logged). An aggregator that weighs by the loss (QFedAvg) makes a train
  reply without a ``train-loss`` >= 0 unsound (:attr:`ActiveAggregation.loss_key`).

Server-side DP (:class:`ServerSideDP`), as Flower's ``DifferentialPrivacyServerSideFixedClipping``
but on the active tensors: each sound reply's update of the active tensors is clipped to L2
``clipping_norm`` (Flower's ``compute_clip_model_update``) before the aggregator sees it, and
Gaussian noise of std ``noise_multiplier * clipping_norm / sound replies`` (Flower's
``compute_stdv``) is added to what it returns, drawn from a generator seeded by
``derive_seed(seed, "dp-noise", round)``: a run is reproducible, a resumed one too. As in Flower,
that calibration is the Gaussian mechanism's for a mean of the clipped updates (FedAvg); with
another aggregator the noise is the same, the privacy analysis is not Flower's or ours.

Flower's DP wrappers (``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping``) assume
the whole model travels: around FedMAE they would clip one-block replies against the full model
(or noise the frozen prefix every round). :func:`refuse_dp_wrapper` makes that fail at start,
naming the ``dp-noise-multiplier`` key; :func:`refuse_strategy_mixins` refuses
``class X(FedMAE, FedMedian)`` (which would silently keep FedAvg's aggregation, or lose the stem).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    FedYogi,
    Krum,
    MultiKrum,
    QFedAvg,
    Strategy,
)
from flwr.serverapp.strategy.dp_adaptive_clipping import DifferentialPrivacyAdaptiveBase
from flwr.serverapp.strategy.dp_fixed_clipping import DifferentialPrivacyFixedClippingBase
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm

from fedmae_flwr.config import Aggregation, RobustConfig
from fedmae_flwr.seeding import derive_seed

TRAIN_LOSS_KEY = "train-loss"  # the loss metric of a train reply (fedmae_flwr.client)
# Flower's DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping (and subclasses)
DP_WRAPPERS = (DifferentialPrivacyFixedClippingBase, DifferentialPrivacyAdaptiveBase)
_DP_INSTEAD = (
    "use FedMAE's own server-side DP, which clips and noises the active tensors only: run-config "
    "key dp-noise-multiplier (> 0) with dp-clipping-norm, i.e. "
    "FedMAE(..., dp_noise_multiplier=..., dp_clipping_norm=...)"
)


def build_aggregator(robust: RobustConfig, clients_per_round: int) -> Strategy:
    """The Flower strategy the config's robust section names (``aggregation`` and its knobs).

    ``krum-keep = 0`` keeps each round's replies less ``byzantine-nodes`` (at least 1):
    :class:`MultiKrumAllButByzantine`.
    """
    rule = Aggregation(robust.aggregation)
    if rule == Aggregation.FEDMEDIAN:
        return FedMedian()
    if rule == Aggregation.FEDTRIMMEDAVG:
        return FedTrimmedAvg(beta=robust.trim_fraction)
    if rule == Aggregation.KRUM:
        return Krum(num_malicious_nodes=robust.byzantine_nodes)
    if rule == Aggregation.MULTIKRUM:
        if robust.krum_keep:
            return MultiKrum(
                num_malicious_nodes=robust.byzantine_nodes, num_nodes_to_select=robust.krum_keep
            )
        return MultiKrumAllButByzantine(robust.byzantine_nodes, clients_per_round)
    if rule == Aggregation.FEDADAM:
        return FedAdam(eta=robust.server_lr, tau=robust.server_tau)
    if rule == Aggregation.FEDYOGI:
        return FedYogi(eta=robust.server_lr, tau=robust.server_tau)
    if rule == Aggregation.FEDPROX:  # averaged as FedAvg; the nodes add the proximal term
        return FedProx(proximal_mu=robust.proximal_mu)
    return FedAvg()


class MultiKrumAllButByzantine(MultiKrum):
    """MultiKrum keeping, in each round, the replies it got less ``num_malicious_nodes`` (at
    least 1). A fixed ``num_nodes_to_select`` of clients-per-round - f keeps every reply, the
    attacker's too, whenever fewer arrive (rejected replies, partial rounds)."""

    def __init__(self, num_malicious_nodes: int, clients_per_round: int) -> None:
        super().__init__(
            num_malicious_nodes=num_malicious_nodes,
            num_nodes_to_select=max(1, clients_per_round - num_malicious_nodes),
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self.num_nodes_to_select = max(1, len(replies) - self.num_malicious_nodes)
        return super().aggregate_train(server_round, replies)


class ServerSideDP:
    """Clipping of each node's update of the active tensors, seeded noise on their aggregate."""

    def __init__(self, noise_multiplier: float, clipping_norm: float, seed: int) -> None:
        if noise_multiplier < 0:
            raise ValueError(f"dp_noise_multiplier must be >= 0, got {noise_multiplier}")
        if clipping_norm <= 0:
            raise ValueError(f"dp_clipping_norm must be > 0, got {clipping_norm}")
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.seed = seed

    def clip(self, reply: list[np.ndarray], current: list[np.ndarray]) -> list[np.ndarray]:
        """``current + update * min(1, clipping_norm / ||update||)``, update = reply - current."""
        clipped = list(reply)
        if get_norm([r - c for r, c in zip(reply, current, strict=True)]) > 0:  # Flower's
            compute_clip_model_update(clipped, current, self.clipping_norm)  # divides by it
        return clipped

    def add_noise(self, arrays: ArrayRecord, num_replies: int, server_round: int) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, num_replies)
        rng = np.random.default_rng(derive_seed(self.seed, "dp-noise", server_round))
        noisy = {}
        for key, array in arrays.items():
            data = array.numpy()
            noisy[key] = Array(data + rng.normal(0.0, std, data.shape).astype(data.dtype))
        log(INFO, "FedMAE DP: update norms clipped at %g, noise std %.4g added to %d tensors",
            self.clipping_norm, std, len(noisy))  # fmt: skip
        return ArrayRecord(noisy)


class ActiveAggregation:
    """A Flower strategy's ``aggregate_train`` applied to the active tensors of sound replies.

    Args:
        strategy: the aggregator (None: FedAvg). Not a FedMAE, not a Flower DP wrapper.
        weighted_by_key: FedMAE's weight key; the aggregator must weigh by the same key.
        dp: server-side DP, or None.
    """

    def __init__(
        self, strategy: Strategy | None, weighted_by_key: str, dp: ServerSideDP | None = None
    ) -> None:
        strategy = FedAvg(weighted_by_key=weighted_by_key) if strategy is None else strategy
        _check_aggregator(strategy, weighted_by_key)
        self.strategy = strategy
        self.dp = dp
        self._stage: int | None = None
        self._steps = 0  # the aggregator's steps in the current stage
        self._stage_norm: float | None = None  # the active tensors' L2 norm when it began
        self._momentum_keys: list[str] | None = None  # FedAvgM's loaded momentum, in its order

    def reset(self) -> None:
        """Start afresh, as for a new run (the server optimizer's state included)."""
        reset_server_state(self.strategy)
        self._stage, self._steps, self._stage_norm = None, 0, None
        self._momentum_keys = None

    def stage_norm(self, stage: int) -> float | None:
        """The L2 norm of ``stage``'s active tensors when it began (at its first round), or None
        before that round's :meth:`combine` (then the tensors sent are the stage's start), or
        after a resume from a state saved without it (by code before it was kept)."""
        return self._stage_norm if stage == self._stage else None

    def state(self) -> dict[str, np.ndarray]:
        """What the next round's aggregation depends on besides the model, as named arrays (for
        a checkpoint; empty before the first aggregation): ``stage`` and ``steps`` (the
        aggregator's step count in the stage: FedAdam's bias correction), ``stage-norm``
        (:meth:`stage_norm`, float64), and a server
        optimizer's buffers under ``m_t/<tensor>``, ``v_t/<tensor>`` (FedOpt family) or
        ``momentum/<tensor>`` (FedAvgM)."""
        if self._stage is None:
            return {}
        state = {"stage": np.array([self._stage]), "steps": np.array([self._steps])}
        if self._stage_norm is not None:
            state["stage-norm"] = np.array([self._stage_norm], dtype=np.float64)
        strategy = self.strategy
        if isinstance(strategy, FedOpt):
            for name in ("m_t", "v_t"):
                for key, value in (getattr(strategy, name) or {}).items():
                    state[f"{name}/{key}"] = np.asarray(value)
        elif isinstance(strategy, FedAvgM) and strategy.momentum_vector is not None:
            # The order momentum_vector follows: as loaded (no round combined since), or the
            # tensors' its last step saw.
            keys = self._momentum_keys
            if keys is None:
                assert strategy.current_arrays is not None  # set with each step's momentum
                keys = list(strategy.current_arrays.keys())
            for key, value in zip(keys, strategy.momentum_vector, strict=True):
                state[f"momentum/{key}"] = np.asarray(value)
        return state

    def load_state(
        self,
        state: dict[str, np.ndarray],
        active: Mapping[str, tuple[int, ...]] | None = None,
    ) -> None:
        """Put back what :meth:`state` returned (an empty dict: start afresh).

        Args:
            state: the named arrays.
            active: the names and shapes of the tensors the state's stage trains; given, each
                buffer must be there for exactly these (a state of another model or stage).

        Raises:
            ValueError: ``stage`` or ``steps`` not one integer >= 0; a ``stage-norm`` (optional:
                states saved before it was kept lack it) not one finite float >= 0; buffers of
                another kind of server optimizer than this aggregator (a state saved with
                another one);
                a FedOpt state after a step without both ``m_t`` and ``v_t``; buffers for
                other tensors, or shapes, than ``active``.
        """
        self.reset()
        if not state:
            return
        try:
            stage, steps = _count(state["stage"]), _count(state["steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"server state without a whole stage and step count ({e})") from e
        if stage < 0 or steps < 0:
            raise ValueError(f"server state with stage {stage}, steps {steps}: both must be >= 0")
        stage_norm = None
        if "stage-norm" in state:
            norm = np.asarray(state["stage-norm"])
            if norm.size != 1 or norm.dtype.kind != "f" or not 0 <= norm.reshape(-1)[0] < np.inf:
                raise ValueError(
                    f"server state's stage-norm is not one finite float >= 0: {norm.dtype} of "
                    f"shape {norm.shape}, {norm.reshape(-1)[:2].tolist()}"
                )
            stage_norm = float(norm.reshape(-1)[0])
        buffers: dict[str, dict[str, np.ndarray]] = {}
        for name, value in state.items():
            if "/" in name:
                kind, key = name.split("/", 1)
                buffers.setdefault(kind, {})[key] = np.array(value)  # a copy it may update
        strategy = self.strategy
        allowed = ({"m_t", "v_t"} if isinstance(strategy, FedOpt)
                   else {"momentum"} if isinstance(strategy, FedAvgM) else set())  # fmt: skip
        if foreign := sorted(set(buffers) - allowed):
            raise ValueError(
                f"server state holds {', '.join(foreign)} buffers, which the aggregator "
                f"{type(strategy).__name__} does not keep (saved with another aggregator?)"
            )
        if isinstance(strategy, FedOpt) and steps and set(buffers) != allowed:
            raise ValueError(
                f"server state after {steps} steps of {type(strategy).__name__} holds "
                f"{sorted(buffers) or 'no'} buffers, not both m_t and v_t"
            )
        if active is not None:
            _check_buffers(buffers, active)
        if isinstance(strategy, FedOpt):
            strategy.m_t, strategy.v_t = buffers.get("m_t"), buffers.get("v_t")
        elif isinstance(strategy, FedAvgM) and "momentum" in buffers:
            # FedAvgM keeps a list in its current_arrays' order: set here in the saved order,
            # and put in the active tensors' order at the next combine (_set_current_arrays).
            strategy.momentum_vector = list(buffers["momentum"].values())
            self._momentum_keys = list(buffers["momentum"])
        self._stage, self._steps, self._stage_norm = stage, steps, stage_norm

    @property
    def loss_key(self) -> str | None:
        """The metric the aggregator weighs each reply by besides its examples (QFedAvg's
        loss), which a sound train reply must then report as a finite number >= 0."""
        return self.strategy.train_loss_key if isinstance(self.strategy, QFedAvg) else None

    def summary(self) -> None:
        log(INFO, "\t│\t└──aggregator: %s | server-side DP: %s", type(self.strategy).__name__,
            "off" if self.dp is None else f"noise x{self.dp.noise_multiplier:g}, clip "
            f"{self.dp.clipping_norm:g}")  # fmt: skip

    def combine(
        self, current: ArrayRecord, sound: list[RecordDict], stage: int, server_round: int
    ) -> ArrayRecord | None:
        """The new active tensors from ``current`` and the ``sound`` replies (None: keep them).

        ``sound`` is not modified.
        """
        if stage != self._stage:  # also with no sound reply: the state names its stage
            reset_server_state(self.strategy)
            self._stage, self._steps, self._momentum_keys = stage, 0, None
            self._stage_norm = l2_norm(current.values())
        if not sound:
            return None
        keys = list(current.keys())
        now = [current[k].numpy() for k in keys]
        metrics = [next(iter(content.metric_records.values())) for content in sound]
        shared = set.intersection(*(set(m) for m in metrics))  # Flower wants equal key sets
        replies = []
        for content, metric in zip(sound, metrics, strict=True):
            arrays = next(iter(content.array_records.values()))
            values = [arrays[k].numpy() for k in keys]
            if self.dp is not None:
                values = self.dp.clip(values, now)
            replies.append(_message(keys, values, {k: metric[k] for k in metric if k in shared}))
        _set_current_arrays(self.strategy, current)
        if self._momentum_keys is not None:  # loaded: in the order of the tensors it steps
            assert isinstance(self.strategy, FedAvgM) and self.strategy.momentum_vector
            loaded = dict(zip(self._momentum_keys, self.strategy.momentum_vector, strict=True))
            self.strategy.momentum_vector = [loaded[k] for k in keys]
            self._momentum_keys = None
        if isinstance(self.strategy, MultiKrum):  # Krum too
            needed = 2 * self.strategy.num_malicious_nodes + 3
            if len(replies) < needed:
                log(WARNING, "FedMAE: %s with num_malicious_nodes %d assumes at least %d "
                    "replies; round %d has %d sound ones, so it may keep a malicious one",
                    type(self.strategy).__name__, self.strategy.num_malicious_nodes, needed,
                    server_round, len(replies))  # fmt: skip
        if isinstance(self.strategy, FedTrimmedAvg) and 0 < self.strategy.beta * len(replies) < 1:
            log(WARNING, "FedMAE: FedTrimmedAvg with beta %g trims int(beta x replies) at each "
                "end, none of round %d's %d sound replies: a plain mean, which one node can "
                "move", self.strategy.beta, server_round, len(replies))  # fmt: skip
        before = {k: np.array(v) for k, v in self.state().items()}  # copies: steps may mutate
        self._steps += 1
        name = type(self.strategy).__name__
        try:
            combined, _ = self.strategy.aggregate_train(self._steps, replies)
        except Exception as err:
            # It reads node-made values (e.g. QFedAvg's losses): one reply must not end the run.
            # A broken aggregator still ends it, at the stage end (no round aggregated).
            log(WARNING, "FedMAE: round %d: the aggregator %s failed on the sound replies "
                "(%s: %s); the model and the aggregator's state stay as they were",
                server_round, name, type(err).__name__, err)  # fmt: skip
            self.load_state(before)  # the step is undone
            return None
        if combined is None:
            self.load_state(before)  # the step is undone
            return None
        combined = _conform(combined, current, name)
        if self.dp is not None:
            combined = self.dp.add_noise(combined, len(sound), server_round)
        if bad := [k for k, v in combined.items() if not np.all(np.isfinite(v.numpy()))]:
            # Each reply was finite; its combination need not be (QFedAvg's q-th power of a
            # loss, a server optimizer with tau 0, DP noise of std inf). Kept, it would poison
            # every later round and the exported backbone.
            log(WARNING, "FedMAE: round %d: the aggregator %s combined the sound replies into "
                "NaN or inf (%d tensors, e.g. '%s'); the model and the aggregator's state stay "
                "as they were", server_round, name, len(bad), bad[0])  # fmt: skip
            self.load_state(before)  # the step is undone
            return None
        return combined


def keeps_server_state(strategy: Strategy) -> bool:
    """Whether ``strategy`` is a server optimizer with state across a stage's rounds (what
    :func:`reset_server_state` forgets; a checkpoint does not hold it)."""
    return isinstance(strategy, FedOpt | FedAvgM)


def reset_server_state(strategy: Strategy) -> None:
    """Forget a server optimizer's state (its tensors are those of the stage that ended)."""
    if isinstance(strategy, FedOpt):
        strategy.current_arrays = strategy.m_t = strategy.v_t = None
    elif isinstance(strategy, FedAvgM):
        strategy.current_arrays = strategy.momentum_vector = None


def train_config_entries(strategy: Strategy) -> dict[str, float]:
    """What the aggregator's own ``configure_train`` would add to a train message's config:
    FedProx's ``proximal-mu``, which the nodes' local training applies
    (:func:`fedmae_flwr.local_training.train_local`)."""
    return {"proximal-mu": float(strategy.proximal_mu)} if isinstance(strategy, FedProx) else {}


def _check_buffers(
    buffers: dict[str, dict[str, np.ndarray]], active: Mapping[str, tuple[int, ...]]
) -> None:
    """ValueError unless each kind of buffer holds exactly the ``active`` tensors' names and
    shapes (a hand-made or copied-in state would otherwise broadcast, or fail mid-round)."""
    for kind, arrays in sorted(buffers.items()):
        if set(arrays) != set(active):
            extra, lacking = sorted(set(arrays) - set(active)), sorted(set(active) - set(arrays))
            raise ValueError(
                f"server state's {kind} buffers are not the stage's active tensors: extra "
                f"{extra[:3]}, missing {lacking[:3]}"
            )
        for key, value in arrays.items():
            if tuple(value.shape) != tuple(active[key]):
                raise ValueError(
                    f"server state's {kind}/{key} has shape {tuple(value.shape)}, the tensor "
                    f"{tuple(active[key])}"
                )


def l2_norm(arrays: Iterable[Array]) -> float:
    """The L2 norm of ``arrays`` together, summed in float64."""
    return math.sqrt(sum(float(np.sum(np.square(a.numpy(), dtype=np.float64))) for a in arrays))


def _count(value: np.ndarray) -> int:
    """The one integer a state's ``stage`` or ``steps`` array holds (a checkpoint reads a
    0-d array back as shape (1,))."""
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"not one integer: {array.dtype} of shape {array.shape}")
    return int(array.reshape(-1)[0])


def _set_current_arrays(strategy: Strategy, current: ArrayRecord) -> None:
    """What the optimizer steps from, as its ``configure_train`` would set it."""
    if isinstance(strategy, FedOpt):
        strategy.current_arrays = {k: v.numpy() for k, v in current.items()}
    elif isinstance(strategy, FedAvgM | QFedAvg):
        strategy.current_arrays = ArrayRecord(dict(current.items()))


def _message(keys: list[str], values: list[np.ndarray], metrics: dict) -> Message:
    """A reply Message with records of its own (the aggregator may pop from them)."""
    record = RecordDict(
        {
            "arrays": ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in zip(keys, values, strict=True)}
            ),
            "metrics": MetricRecord(metrics),
        }
    )
    metadata = Metadata(run_id=0, message_id="", src_node_id=0, dst_node_id=0,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=0.0,
                        message_type=MessageType.TRAIN)  # fmt: skip
    return Message(content=record, metadata=metadata)


def _conform(combined: ArrayRecord, current: ArrayRecord, name: str) -> ArrayRecord:
    """``combined`` with exactly ``current``'s keys, shapes and dtypes (cast), else ValueError."""
    if set(combined.keys()) != set(current.keys()):
        extra, lacking = set(combined) - set(current), set(current) - set(combined)
        raise ValueError(
            f"aggregator {name} returned other tensors than the active ones: extra "
            f"{sorted(extra)[:3]}, missing {sorted(lacking)[:3]}"
        )
    out = {}
    for key, ref in current.items():
        data, want = combined[key].numpy(), ref.numpy()
        if data.shape != want.shape:
            raise ValueError(
                f"aggregator {name} returned '{key}' of shape {data.shape}, expected {want.shape}"
            )
        out[key] = Array(np.ascontiguousarray(data, dtype=want.dtype))
    return ArrayRecord(out)


def _check_aggregator(strategy: object, weighted_by_key: str) -> None:
    from fedmae_flwr.strategies.fedmae import FedMAE  # the seam is FedMAE's; no import cycle

    if isinstance(strategy, DP_WRAPPERS):
        raise TypeError(
            f"aggregator={type(strategy).__name__}(...): Flower's DP wrappers clip against the "
            f"model their configure_train saw, which FedMAE never calls; {_DP_INSTEAD}"
        )
    if isinstance(strategy, FedMAE) or not isinstance(strategy, Strategy):
        raise TypeError(
            "aggregator must be a Flower strategy that combines replies (e.g. FedMedian(), "
            f"FedAdam(eta=...)), got {type(strategy).__name__}"
        )
    if isinstance(strategy, FedXgbBagging | FedXgbCyclic):
        raise TypeError(
            f"aggregator={type(strategy).__name__}(): it combines XGBoost trees (bagging: "
            "bytes of tree models; cyclic: one node's model each round), not tensors; use a "
            "rule that averages or robustly combines tensors (FedAvg, FedMedian, FedAdam, ...)"
        )
    if isinstance(strategy, FedProx) and not (
        isinstance(strategy.proximal_mu, int | float) and 0 <= strategy.proximal_mu < math.inf
    ):
        raise ValueError(
            f"aggregator FedProx: proximal_mu must be a finite number >= 0, got "
            f"{strategy.proximal_mu!r} (the nodes would refuse it in every round)"
        )
    if isinstance(strategy, FedOpt) and not (
        isinstance(strategy.tau, int | float) and 0 < strategy.tau < math.inf
    ):
        raise ValueError(
            f"aggregator {type(strategy).__name__}: tau must be a finite number > 0, got "
            f"{strategy.tau!r} (it divides each step: 0 turns an unchanged model into NaN)"
        )
    if isinstance(strategy, QFedAvg) and strategy.train_loss_key != TRAIN_LOSS_KEY:
        raise ValueError(
            f"aggregator QFedAvg reads each reply's loss under '{strategy.train_loss_key}', but "
            f"FedMAE's nodes report it as '{TRAIN_LOSS_KEY}': "
            f"QFedAvg(..., train_loss_key='{TRAIN_LOSS_KEY}')"
        )
    key = getattr(strategy, "weighted_by_key", weighted_by_key)
    if key != weighted_by_key:
        raise ValueError(
            f"aggregator {type(strategy).__name__} weighs by '{key}' but FedMAE by "
            f"'{weighted_by_key}': give both the same weighted_by_key"
        )


def refuse_strategy_mixins(cls: type, fedmae: type) -> None:
    """TypeError when ``cls`` (a FedMAE subclass) also derives from another Flower strategy."""
    foreign = [
        b.__name__
        for b in cls.__mro__
        if issubclass(b, Strategy) and not issubclass(b, fedmae) and b not in (FedAvg, Strategy)
    ]
    if foreign:
        raise TypeError(
            f"class {cls.__name__} combines FedMAE with {', '.join(foreign)} by inheritance, "
            "which silently keeps FedAvg's aggregation or breaks FedMAE's partial exchange "
            "(depending on the base order). Compose instead: "
            f"FedMAE(..., aggregator={foreign[0]}(...))"
        )


def refuse_dp_wrapper(strategy: Strategy, depth: int = 8) -> None:
    """TypeError when a Flower DP wrapper is among the last ``depth`` callers of ``strategy``'s
    method: around it, or around a wrapper of its (``DP(PassThrough(FedMAE))``), it drives it."""
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return
        caller = frame.f_locals.get("self")
        if isinstance(caller, DP_WRAPPERS) and caller is not strategy:
            raise TypeError(
                f"FedMAE cannot run inside {type(caller).__name__}: Flower's DP wrappers "
                "assume the whole model travels, but FedMAE exchanges only each stage's active "
                "tensors (they would clip one-block replies against the full model, or noise "
                f"the frozen prefix every round); {_DP_INSTEAD}"
            )
