"""The aggregation seam: FedMAE over Flower's aggregation strategies, and server-side DP.

FedMAE decides what travels; a Flower strategy passed as ``aggregator`` (run-config
``aggregation``) combines the sound replies' active tensors. Whole runs go through
``server_app.run`` with the in-process grid (real strategy and client handlers): a depth-3
cascade per rule, a hostile node, DP reproducibility. Unit tests pin the adapter: replies left
intact, server-optimizer state per stage, output conformed, the refusals.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
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
)

from fedmae_flwr.config import resolve_config
from fedmae_flwr.models import initial_state
from fedmae_flwr.models.export import load_backbone
from fedmae_flwr.server_app import build_strategy, run
from fedmae_flwr.strategies import FedMAE
from fedmae_flwr.strategies.aggregation import (
    ActiveAggregation,
    MultiKrumAllButByzantine,
    ServerSideDP,
)

from .local_grid import FIRST_NODE_ID, InProcessGrid
from .test_strategy import PassThrough

NODES = 5  # all of them train every round, so a hostile node is in every aggregate
HOSTILE_SCALE = 50.0


@pytest.fixture(scope="module")
def runs(fmnist_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``runs(name, hostile=False, **overrides)``: a depth-3 run (cached per name), its summary
    and run folder. Every node trains every round; the update-norm bound is off (only the
    aggregation differs between runs); downstream evaluation is cut to the bone."""
    out = tmp_path_factory.mktemp("aggregation")
    cache: dict[str, tuple[dict, Path]] = {}

    def run_once(name: str, hostile: bool = False, **overrides) -> tuple[dict, Path]:
        if name not in cache:
            config = {
                "data-path": str(fmnist_dir), "output-dir": str(out), "run-name": name,
                "embed-dim": 32, "num-heads": 2, "decoder-embed-dim": 16,
                "decoder-num-heads": 2, "depth": 3, "rounds-per-stage": 2,
                "clients-per-round": NODES, "evaluate-clients": 0, "batch-size": 32,
                "eval-images": 100, "grid-images": 4, "probe-train-images": 100,
                "probe-epochs": 1, "finetune-labels": 0, "test-images": 50,
                "evaluate-random-init": False, "max-update-norm": 0, **overrides,
            }  # fmt: skip
            grid = InProcessGrid(NODES, config)
            if hostile:
                grid.tamper = scaled_update(grid, FIRST_NODE_ID, HOSTILE_SCALE)
            cache[name] = run(grid, resolve_config(config)), out / name
        return cache[name]

    return run_once


def scaled_update(grid: InProcessGrid, node_id: int, scale: float):
    """A ``tamper`` hook: ``node_id`` replies ``sent + scale * (trained - sent)``: finite, same
    keys, dtypes and shapes, so only the norm bound (off in these runs) could refuse it."""

    def tamper(reply):
        if (
            reply.metadata.src_node_id != node_id
            or reply.metadata.message_type != MessageType.TRAIN
        ):
            return reply
        sent = grid.sent[-1].content["arrays"]  # the message this reply answers
        got = reply.content["arrays"]
        reply.content["arrays"] = ArrayRecord(
            {
                k: Array(sent[k].numpy() + np.float32(scale) * (v.numpy() - sent[k].numpy()))
                for k, v in got.items()
            }
        )
        return reply

    return tamper


def backbone(folder: Path) -> dict[str, torch.Tensor]:
    model = load_backbone(folder)  # timm, strict=True
    assert len(model.blocks) == 3
    return model.state_dict()


RULES = {
    "fedmedian": ({"aggregation": "fedmedian"}, FedMedian),
    "fedtrimmedavg": ({"aggregation": "fedtrimmedavg", "trim-fraction": 0.2}, FedTrimmedAvg),
    "krum": ({"aggregation": "krum", "byzantine-nodes": 1}, Krum),
    "multikrum": ({"aggregation": "multikrum", "byzantine-nodes": 1}, MultiKrumAllButByzantine),
    "fedadam": ({"aggregation": "fedadam", "server-lr": 0.01}, FedAdam),
    "fedyogi": ({"aggregation": "fedyogi", "server-lr": 0.01}, FedYogi),
    "fedprox": ({"aggregation": "fedprox", "proximal-mu": 1.0}, FedProx),
    "dp": ({"dp-noise-multiplier": 0.5, "dp-clipping-norm": 1.0}, FedAvg),
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_grows_a_depth3_timm_backbone_that_differs_from_fedavg(rule, runs):
    overrides, _ = RULES[rule]
    summary, folder = runs(rule, **overrides)
    _, fedavg_folder = runs("fedavg")
    assert [s["blocks"] for s in summary["stages"]] == [1, 2, 3]
    assert np.isfinite(summary["final-psnr"])
    print(f"{rule}: final PSNR {summary['final-psnr']:.3f} dB")
    ours, fedavg = backbone(folder), backbone(fedavg_folder)
    assert ours.keys() == fedavg.keys()
    assert any(not torch.allclose(ours[k], fedavg[k], atol=1e-6) for k in ours), rule


def test_robust_rules_keep_the_clean_psnr_when_one_node_scales_its_update(runs):
    clean = runs("fedavg")[0]["final-psnr"]
    hostile = {
        rule: runs(f"{rule}-hostile", hostile=True, aggregation=rule)[0]["final-psnr"]
        for rule in ("fedavg", "fedmedian", "fedtrimmedavg")
    }
    numbers = f"clean FedAvg {clean:.3f} dB, one node x{HOSTILE_SCALE:g}: {hostile}"
    print(numbers)  # pytest -s shows them
    assert hostile["fedavg"] < clean - 1.0, numbers  # measured: drops 1.5-2.5 dB (seeds 0-2)
    assert abs(hostile["fedmedian"] - clean) < 0.5, numbers  # measured: within 0.05 dB
    assert abs(hostile["fedtrimmedavg"] - clean) < 0.5, numbers


def test_dp_noise_is_reproducible_from_the_seed_and_changes_the_result(runs):
    overrides, _ = RULES["dp"]
    first, again = runs("dp", **overrides)[1], runs("dp-again", **overrides)[1]
    other_seed = runs("dp-seed-1", seed=1, **overrides)[1]
    noisy, repeat = backbone(first), backbone(again)
    assert all(torch.equal(noisy[k], repeat[k]) for k in noisy)  # bit-identical
    assert not all(torch.equal(noisy[k], v) for k, v in backbone(other_seed).items())


@pytest.mark.parametrize("rule", list(RULES))
def test_the_run_config_picks_the_aggregator(rule):
    overrides, cls = RULES[rule]
    strategy = build_strategy(resolve_config({**overrides, "clients-per-round": 5}))
    assert type(strategy.aggregation.strategy) is cls
    assert (strategy.aggregation.dp is not None) == (rule == "dp")
    inner = strategy.aggregation.strategy
    if rule == "fedtrimmedavg":
        assert inner.beta == 0.2
    if rule == "multikrum":  # krum-keep 0: clients-per-round - byzantine-nodes
        assert (inner.num_malicious_nodes, inner.num_nodes_to_select) == (1, 4)
    if rule in ("fedadam", "fedyogi"):
        assert (inner.eta, inner.tau) == (0.01, 1e-3)
    if rule == "fedprox":
        assert inner.proximal_mu == 1.0


# --- the adapter -------------------------------------------------------------------------------


def reply(arrays: dict[str, np.ndarray], examples: int = 10) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0}),
        }
    )


def stage_arrays(keys: list[str], value: float) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full((2, 3), value, np.float32)) for k in keys})


def test_the_aggregator_sees_copies_and_fedmae_keeps_the_replies_intact():
    current = stage_arrays(["a", "b"], 0.0)
    sound = [reply({"a": np.full((2, 3), x, np.float32), "b": np.ones((2, 3), np.float32)})
             for x in (1.0, 2.0, 9.0)]  # fmt: skip
    combined = ActiveAggregation(FedMedian(), "num-examples").combine(current, sound, 0, 1)
    assert np.all(combined["a"].numpy() == 2.0) and combined["a"].dtype == "float32"
    assert all(set(next(iter(r.array_records.values()))) == {"a", "b"} for r in sound)


def test_multikrum_keeps_the_replies_it_got_less_the_byzantine_ones(caplog):
    """krum-keep 0 meant clients-per-round - f = 4 of 5: a round with 3 sound replies (a
    partial round, or two rejected) kept all 3, the attacker's x50 update too."""
    current = stage_arrays(["a"], 0.0)
    sound = [reply({"a": np.full((2, 3), x, np.float32)}) for x in (1.0, 1.1, 50.0)]
    rule = MultiKrumAllButByzantine(num_malicious_nodes=1, clients_per_round=5)
    assert rule.num_nodes_to_select == 4
    combined = ActiveAggregation(rule, "num-examples").combine(current, sound, 0, 1)
    assert rule.num_nodes_to_select == 2 and np.allclose(combined["a"].numpy(), 1.05)
    # 3 replies are fewer than Krum's 2f + 3 = 5: said, not hidden
    assert "MultiKrumAllButByzantine with num_malicious_nodes 1 assumes at least 5" in caplog.text
    fixed = MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4)  # krum-keep 4: as asked
    combined = ActiveAggregation(fixed, "num-examples").combine(current, sound, 0, 1)
    assert combined["a"].numpy().max() > 10


def test_a_trimmed_mean_that_trims_nothing_says_so(caplog):
    """beta 0.2 of 4 sound replies (one of 5 nodes dropped out) trims int(0.8) = 0: a plain
    mean, which one node's update moved 40x the honest step (a review's measurement)."""
    current = stage_arrays(["a"], 0.0)
    sound = [reply({"a": np.full((2, 3), x, np.float32)}) for x in (1.0, 1.1, 0.9, 50.0)]
    combined = ActiveAggregation(FedTrimmedAvg(beta=0.2), "num-examples").combine(
        current, sound, 0, 3
    )
    assert combined["a"].numpy().max() > 10  # Flower's rule, unchanged: the attacker counts
    assert "FedTrimmedAvg with beta 0.2 trims int(beta x replies) at each end, none of round 3" in (
        caplog.text
    )
    caplog.clear()
    five = [*sound, reply({"a": np.full((2, 3), 1.0, np.float32)})]
    combined = ActiveAggregation(FedTrimmedAvg(beta=0.2), "num-examples").combine(
        current, five, 0, 4
    )
    assert combined["a"].numpy().max() < 2 and "trims int(beta" not in caplog.text


def test_replies_with_different_metric_keys_are_aggregated():
    """Flower's strategies raise on differing MetricRecord keys; FedMAE's triage allows them."""
    current = stage_arrays(["a"], 0.0)
    sound = [reply({"a": np.full((2, 3), 1.0, np.float32)}) for _ in range(3)]
    next(iter(sound[0].metric_records.values()))["peak-mbytes"] = 3.0
    for aggregator in (FedAvg(), FedMedian(), MultiKrum(num_malicious_nodes=0)):
        combined = ActiveAggregation(aggregator, "num-examples").combine(current, sound, 0, 1)
        assert np.allclose(combined["a"].numpy(), 1.0)


def test_server_optimizer_state_is_per_stage():
    """A FedAdam that went through stage 0 gives in stage 1 what a fresh one gives there."""

    def stage1(aggregation: ActiveAggregation) -> np.ndarray:
        current = stage_arrays(["blocks.1.w", "decoder.w"], 0.5)
        sound = [reply({k: np.full((2, 3), 0.7 + i, np.float32) for k in current})
                 for i in range(2)]  # fmt: skip
        return aggregation.combine(current, sound, 1, 3)["blocks.1.w"].numpy()

    used = ActiveAggregation(FedAdam(eta=0.1), "num-examples")
    for server_round in (1, 2):  # stage 0 trains other tensors (stem, block 0)
        current = stage_arrays(["stem.w", "blocks.0.w", "decoder.w"], 0.0)
        sound = [reply({k: np.full((2, 3), 0.3, np.float32) for k in current})] * 2
        used.combine(current, sound, 0, server_round)
    assert set(used.strategy.m_t) == {"stem.w", "blocks.0.w", "decoder.w"}
    assert np.array_equal(stage1(used), stage1(ActiveAggregation(FedAdam(eta=0.1), "num-examples")))
    assert set(used.strategy.m_t) == {"blocks.1.w", "decoder.w"}


SERVER_OPTIMIZERS = {
    "fedadam": lambda: FedAdam(eta=0.1),
    "fedyogi": lambda: FedYogi(eta=0.1),
    "fedavgm": lambda: FedAvgM(server_momentum=0.9),
    "fedavg": lambda: FedAvg(weighted_by_key="num-examples"),
}


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_a_restored_aggregation_state_continues_the_stage_exactly(name):
    """A run resumed mid-stage: round 3 from round 2's saved state (read back in another tensor
    order, as from a checkpoint) equals round 3 of the run that never stopped; without the
    state, the server optimizers (moments, bias-correction step, momentum) give another one."""
    keys = ["stem.w", "blocks.0.w", "decoder.w"]

    def round_of(aggregation: ActiveAggregation, current: ArrayRecord, r: int) -> ArrayRecord:
        sound = [reply({k: np.full((2, 3), 0.1 * r + 0.3 * i + 0.01 * j, np.float32)
                        for j, k in enumerate(keys)}, examples=10 + i)
                 for i in range(3)]  # fmt: skip
        return aggregation.combine(current, sound, 0, r)

    whole = ActiveAggregation(SERVER_OPTIMIZERS[name](), "num-examples")
    current = stage_arrays(keys, 0.0)
    for r in (1, 2):
        current = round_of(whole, current, r)
    state = whole.state()
    assert state["stage"].tolist() == [0] and state["steps"].tolist() == [2]
    buffers = {k.split("/")[0] for k in state if "/" in k}
    assert buffers == {"fedadam": {"m_t", "v_t"}, "fedyogi": {"m_t", "v_t"},
                       "fedavgm": {"momentum"}, "fedavg": set()}[name]  # fmt: skip
    expected = round_of(whole, current, 3)

    resumed = ActiveAggregation(SERVER_OPTIMIZERS[name](), "num-examples")
    resumed.load_state({k: state[k].copy() for k in sorted(state)})
    reordered = ArrayRecord({k: current[k] for k in reversed(keys)})
    got = round_of(resumed, reordered, 3)
    assert all(np.array_equal(got[k].numpy(), expected[k].numpy()) for k in keys)
    fresh = round_of(ActiveAggregation(SERVER_OPTIMIZERS[name](), "num-examples"), current, 3)
    differs = any(not np.array_equal(fresh[k].numpy(), expected[k].numpy()) for k in keys)
    assert differs == (name != "fedavg")


def test_a_restored_momentum_is_saved_again_before_any_round_combines():
    """A resumed FedAvgM run whose first round had no sound reply failed to checkpoint it."""
    keys = ["a", "b"]
    whole = ActiveAggregation(FedAvgM(server_momentum=0.9), "num-examples")
    sound = [reply({k: np.full((2, 3), 1.0 + i, np.float32) for k in keys}) for i in range(2)]
    whole.combine(stage_arrays(keys, 0.0), sound, 0, 1)
    state = whole.state()
    resumed = ActiveAggregation(FedAvgM(server_momentum=0.9), "num-examples")
    resumed.load_state(state)
    again = resumed.state()  # no combine since: a round without sound replies
    assert again.keys() == state.keys()
    assert all(np.array_equal(again[k], state[k]) for k in state)


def test_a_server_state_that_does_not_fit_the_active_tensors_is_refused_before_a_round():
    active = {"a": (2, 3), "b": (2, 3)}
    good = {"stage": np.array([0]), "steps": np.array([2]),
            **{f"{kind}/{k}": np.zeros(shape) for kind in ("m_t", "v_t")
               for k, shape in active.items()}}  # fmt: skip
    adam = ActiveAggregation(FedAdam(eta=0.1), "num-examples")
    adam.load_state(good, active)
    bad = {
        "broadcast": ({**good, "m_t/a": np.zeros(1)},
                      re.escape("m_t/a has shape (1,), the tensor (2, 3)")),
        "unknown tensor": ({**good, "v_t/zzz": np.zeros((2, 3))}, re.escape("extra ['zzz']")),
        "no v_t": ({k: v for k, v in good.items() if not k.startswith("v_t")},
                   "not both m_t and v_t"),
        "float step": ({**good, "steps": np.array([2.0])}, "not one integer"),
    }  # fmt: skip
    for name, (state, match) in bad.items():
        with pytest.raises(ValueError, match=match):
            adam.load_state(state, active)
        assert adam.state() == {}, name  # refused: nothing half-loaded


def test_the_stage_s_starting_norm_is_kept_in_the_state_and_checked_when_loaded():
    """The update bound's reference (the active tensors' norm when the stage began) survives
    a checkpoint, so a resumed run rejects what the uninterrupted one rejects."""
    aggregation = ActiveAggregation(None, "num-examples")
    start = stage_arrays(["a", "b"], 2.0)  # 12 values of 2: norm 2 * sqrt(12)
    assert aggregation.stage_norm(0) is None  # before the stage's first round combines
    after = aggregation.combine(start, [reply({k: np.full((2, 3), 5.0, np.float32)
                                               for k in ("a", "b")})], 0, 1)  # fmt: skip
    aggregation.combine(after, [], 0, 2)
    assert aggregation.stage_norm(0) == pytest.approx(2 * np.sqrt(12))
    assert aggregation.stage_norm(1) is None
    state = aggregation.state()
    resumed = ActiveAggregation(None, "num-examples")
    resumed.load_state({k: v.copy() for k, v in state.items()})
    assert resumed.stage_norm(0) == aggregation.stage_norm(0)
    resumed.load_state({k: v for k, v in state.items() if k != "stage-norm"})  # saved before
    assert resumed.stage_norm(0) is None  # then each round's tensors, as before
    for bad in (np.array([np.nan]), np.array([-1.0]), np.array([3]), np.array([1.0, 2.0])):
        with pytest.raises(ValueError, match="stage-norm is not one finite float >= 0"):
            resumed.load_state({**state, "stage-norm": bad})
        assert resumed.state() == {}
    resumed.combine(start, [], 1, 3)  # a new stage: its own start
    assert resumed.stage_norm(1) == pytest.approx(2 * np.sqrt(12))


def test_an_aggregation_state_of_another_optimizer_is_refused():
    adam = ActiveAggregation(FedAdam(eta=0.1), "num-examples")
    current = stage_arrays(["a"], 0.0)
    adam.combine(current, [reply({"a": np.ones((2, 3), np.float32)})], 0, 1)
    momentum = ActiveAggregation(FedAvgM(server_momentum=0.9), "num-examples")
    with pytest.raises(ValueError, match="holds m_t, v_t buffers, which the aggregator FedAvgM"):
        momentum.load_state(adam.state())
    with pytest.raises(ValueError, match="without a whole stage and step count"):
        momentum.load_state({"steps": np.array(1)})
    momentum.load_state({})  # no state: afresh
    assert momentum.state() == {}


def test_fedmae_restores_a_server_state_only_for_a_resumed_run():
    cfg = resolve_config({"aggregation": "fedadam"})
    state = {"stage": np.array([0]), "steps": np.array([1]), "m_t/w": np.zeros(2)}
    with pytest.raises(ValueError, match="for a resumed run: first_round is 1"):
        build_strategy(cfg).restore_server_state(state)
    with pytest.raises(ValueError, match="holds momentum buffers"):  # checked when given
        build_strategy(cfg, first_round=2).restore_server_state(
            {**state, "momentum/w": state["m_t/w"]}
        )
    # Given the checkpoint's model, the stage and the buffers' tensors are checked against it.
    model = ArrayRecord({k: Array(v.numpy()) for k, v in initial_state(cfg.model, 0).items()})
    both = {**state, "v_t/w": np.zeros(2)}
    with pytest.raises(
        ValueError, match=re.escape("stage [1], but round 1 (first_round - 1) is in stage 0")
    ):
        build_strategy(cfg, first_round=2).restore_server_state(
            {**both, "stage": np.array([1])}, model
        )
    with pytest.raises(ValueError, match="m_t buffers are not the stage's active tensors"):
        build_strategy(cfg, first_round=2).restore_server_state(both, model)
    # Driven by another start() (configure_train's reset), the restored state stays.
    fits = {"stage": np.array([0]), "steps": np.array([1]),
            **{f"{kind}/{k}": np.zeros(v.shape) for kind in ("m_t", "v_t")
               for k, v in model.items()}}  # fmt: skip
    strategy = build_strategy(cfg, first_round=2)
    strategy.restore_server_state(fits, model)
    strategy._new_run()
    assert strategy.server_state().keys() == fits.keys()


def test_an_aggregate_in_another_dtype_is_cast_back():
    current = stage_arrays(["a"], 0.0)
    sound = [reply({"a": np.full((2, 3), 1.0, np.float32)})] * 2
    combined = ActiveAggregation(FedAdam(eta=0.1), "num-examples").combine(current, sound, 0, 1)
    assert combined["a"].dtype == "float32"  # Flower's FedAdam steps in float64


def test_dp_clips_each_update_to_the_norm_and_tolerates_a_zero_update():
    dp = ServerSideDP(noise_multiplier=0.0, clipping_norm=1.0, seed=0)
    now = [np.zeros((2, 3), np.float32), np.ones(4, np.float32)]
    far = [np.full((2, 3), 10.0, np.float32), np.full(4, 11.0, np.float32)]
    clipped = dp.clip(far, now)
    update = np.concatenate([(c - n).ravel() for c, n in zip(clipped, now, strict=True)])
    assert np.linalg.norm(update) == pytest.approx(1.0, rel=1e-5)
    assert all(c.dtype == np.float32 for c in clipped)
    assert all(np.array_equal(c, n) for c, n in zip(dp.clip(now, now), now, strict=True))


def test_dp_noise_std_follows_flower_and_the_seed():
    arrays = ArrayRecord({"a": Array(np.zeros(20000, np.float32))})
    dp = ServerSideDP(noise_multiplier=2.0, clipping_norm=0.5, seed=7)
    a = dp.add_noise(arrays, num_replies=4, server_round=3)["a"].numpy()
    assert a.std() == pytest.approx(2.0 * 0.5 / 4, rel=0.05)  # Flower's compute_stdv
    assert np.array_equal(a, dp.add_noise(arrays, 4, 3)["a"].numpy())
    assert not np.array_equal(a, dp.add_noise(arrays, 4, 4)["a"].numpy())


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["fedmae-first", "flower-first"])
@pytest.mark.parametrize("other", [FedMedian, FedTrimmedAvg, Krum, FedAdam])
def test_mixing_fedmae_with_a_flower_strategy_by_inheritance_is_refused(order, other):
    """``class X(FedMAE, FedMedian)`` would keep FedAvg's aggregation, the other order would
    lose FedMAE's partial exchange: both fail at class creation, pointing to ``aggregator=``."""
    bases = (FedMAE, other) if order == "fedmae-first" else (other, FedMAE)
    with pytest.raises(TypeError, match=rf"aggregator={other.__name__}\("):
        type("Mixed", bases, {})


def test_a_plain_fedmae_subclass_is_fine():
    class Logged(FedMAE):
        pass

    assert issubclass(Logged, FedMAE)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: DifferentialPrivacyServerSideFixedClipping(s, 1.0, 1.0, 3),
        lambda s: DifferentialPrivacyClientSideFixedClipping(s, 1.0, 1.0, 3),
        lambda s: DifferentialPrivacyServerSideAdaptiveClipping(s, 0.1, 3),
        lambda s: DifferentialPrivacyClientSideAdaptiveClipping(s, 0.1, 3),
    ],
    ids=["server-fixed", "client-fixed", "server-adaptive", "client-adaptive"],
)
@pytest.mark.parametrize("between", [False, True], ids=["around-fedmae", "around-a-wrapper"])
def test_flower_dp_wrappers_around_fedmae_fail_at_start_naming_the_key(
    wrap, between, tiny_overrides
):
    """With a wrapper of one's own in between, DP(PassThrough(FedMAE)) ran: server-side
    clipping crashed after round 1, client-side noise changed the frozen stem silently."""
    cfg = resolve_config(tiny_overrides)
    grid = InProcessGrid(6, tiny_overrides)
    strategy = build_strategy(cfg)
    wrapped = wrap(PassThrough(strategy) if between else strategy)
    initial = ArrayRecord({k: v.contiguous() for k, v in initial_state(cfg.model, 0).items()})
    with pytest.raises(TypeError, match="dp-noise-multiplier"):
        wrapped.start(grid, initial, num_rounds=cfg.num_rounds)
    assert grid.sent == []  # refused before the first round
    with pytest.raises(TypeError, match="dp-noise-multiplier"):  # also when driven by hand
        list(wrapped.configure_train(1, initial, ConfigRecord(), grid))


def test_an_aggregator_for_xgboost_trees_is_refused():
    """FedXgbBagging ran a whole stage before its failure surfaced; FedXgbCyclic kept one
    node's tensors each round instead of combining them."""
    for rule in (FedXgbBagging(), FedXgbCyclic()):
        with pytest.raises(TypeError, match=rf"aggregator={type(rule).__name__}\(\): it combines"):
            FedMAE(depth=1, rounds_per_stage=1, new_block=dict, aggregator=rule)


def test_a_flower_dp_wrapper_as_aggregator_is_refused():
    with pytest.raises(TypeError, match="dp-noise-multiplier"):
        wrapped = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 1.0, 3)
        FedMAE(depth=1, rounds_per_stage=1, new_block=dict, aggregator=wrapped)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"new_block": None}, r"new_block must be a factory"),
        ({"depth": "2"}, r"depth and rounds_per_stage must be whole numbers, got '2', 1"),
        ({"num_train_nodes": 0}, r"num_train_nodes must be None or a whole number >= 1, got 0"),
        ({"num_train_nodes": -1}, r"must be None or a whole number >= 1, got -1"),
        ({"num_train_nodes": 2.5}, r"must be None or a whole number >= 1, got 2.5"),
        ({"arrayrecord_key": "params"}, r"fixed by FedMAE's message protocol"),
        ({"configrecord_key": "cfg"}, r"fixed by FedMAE's message protocol"),
        ({"aggregator": FedProx(proximal_mu=-1.0)}, r"proximal_mu must be a finite number >= 0"),
        ({"aggregator": FedProx(proximal_mu=float("nan"))}, r"proximal_mu must be a finite"),
        ({"num_evaluate_nodes": -1}, r"num_evaluate_nodes must be a whole number >= 0 and"),
        # a float passed the constructor and failed random.sample after a whole stage
        ({"num_evaluate_nodes": 1.5}, r"num_evaluate_nodes must be a whole number >= 0 and"),
        ({"node_wait_timeout": -1}, r"and node_wait_timeout >= 0, got 0, -1"),
        ({"first_round": 99}, r"first_round 99 is past the cascade's last round 2"),
    ],
)
def test_bad_constructor_arguments_are_refused_before_any_round(changes, pattern):
    """Each of these was accepted, then failed a whole stage later (or never said why)."""
    with pytest.raises(ValueError, match=pattern):
        FedMAE(**{"depth": 2, "rounds_per_stage": 1, "new_block": dict, **changes})
    FedMAE(depth=2, rounds_per_stage=1, new_block=dict, first_round=3)  # resumed after the end


def test_fedavg_sampling_arguments_fedmae_does_not_read_are_named(caplog):
    """fraction_evaluate=1.0 with the default num_evaluate_nodes=0 evaluated nothing, silently."""
    FedMAE(depth=1, rounds_per_stage=1, new_block=dict, fraction_evaluate=1.0,
           min_evaluate_nodes=2, num_train_nodes=3, fraction_train=0.5)  # fmt: skip
    assert ("fraction_evaluate, min_evaluate_nodes, fraction_train do not choose FedMAE's nodes"
            in caplog.text)  # fmt: skip
    caplog.clear()
    FedMAE(depth=1, rounds_per_stage=1, new_block=dict, fraction_train=0.5)  # read: no warning
    assert "do not choose" not in caplog.text


def _with_aggregator(cfg, aggregator) -> FedMAE:
    strategy = build_strategy(cfg)
    strategy.aggregation = ActiveAggregation(aggregator, strategy.weighted_by_key)
    return strategy


def _first_round_update(strategy: FedMAE, cfg, overrides) -> tuple[float, list]:
    """The L2 length of round 1's change to the active tensors, and the messages sent."""
    grid = InProcessGrid(6, overrides)
    initial = ArrayRecord({k: v.contiguous() for k, v in initial_state(cfg.model, 0).items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    after, _ = strategy.aggregate_train(1, grid.send_and_receive(sent))
    change = sum(float(((after[k].numpy() - initial[k].numpy()) ** 2).sum()) for k in after)
    return change**0.5, sent


def test_an_aggregator_that_combines_nothing_stops_the_stage_not_appends_an_untrained_block(
    tiny_overrides, caplog
):
    """Bulyan(f=1) needs 4f+3 = 7 replies; with 3 it skips every round. The run finished and
    exported the initial model as the backbone, every record saying 3 clients, nothing rejected."""
    from flwr.serverapp.strategy import Bulyan

    cfg = resolve_config({**tiny_overrides, "evaluate-clients": 0})
    strategy = _with_aggregator(cfg, Bulyan(num_malicious_nodes=1))
    initial = ArrayRecord({k: v.contiguous() for k, v in initial_state(cfg.model, 0).items()})
    with pytest.raises(RuntimeError, match=r"brought 6 sound replies, but the aggregator"):
        strategy.start(InProcessGrid(6, tiny_overrides), initial)
    assert "round 1: the aggregator Bulyan combined none of the 3 sound replies" in caplog.text
    assert strategy.last_round_metrics["aggregation-skipped"] == 1
    # start(num_rounds=1) ends mid-stage: its last round is checked as a stage end is
    with pytest.raises(RuntimeError, match=r"rounds 1-1\) brought 3 sound replies"):
        strategy.start(InProcessGrid(6, tiny_overrides), initial, num_rounds=1)


def test_fedprox_sends_its_mu_and_the_nodes_stay_nearer_the_model_they_received(
    tiny_overrides,
):
    """aggregator=FedProx(...) was plain FedAvg: proximal-mu never travelled, nodes ignored it."""
    cfg = resolve_config(tiny_overrides)
    plain, sent = _first_round_update(_with_aggregator(cfg, FedAvg()), cfg, tiny_overrides)
    assert all("proximal-mu" not in m.content["config"] for m in sent)
    prox, sent = _first_round_update(
        _with_aggregator(cfg, FedProx(proximal_mu=50.0)), cfg, tiny_overrides
    )
    assert {m.content["config"]["proximal-mu"] for m in sent} == {50.0}
    assert 0 < prox < 0.8 * plain, (prox, plain)


def test_qfedavg_steps_from_the_active_tensors_and_reads_the_nodes_loss_key(tiny_overrides):
    """QFedAvg raised 'Current global model weights are not available' after round 1."""
    from flwr.serverapp.strategy import QFedAvg

    cfg = resolve_config(tiny_overrides)
    with pytest.raises(ValueError, match="train_loss_key='train-loss'"):
        _with_aggregator(cfg, QFedAvg(client_learning_rate=0.1))
    aggregator = QFedAvg(client_learning_rate=0.1, train_loss_key="train-loss")
    change, _ = _first_round_update(_with_aggregator(cfg, aggregator), cfg, tiny_overrides)
    assert 0 < change < float("inf")


class _PoisonedFedAdam(FedAdam):
    """FedAdam whose step, once ``poison`` is set, returns NaN (as QFedAvg's q-th power of a
    negative loss, or a server optimizer with tau 0, did) after updating its moments."""

    poison = False

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if self.poison and arrays is not None:
            arrays = ArrayRecord(
                {k: Array(np.full_like(v.numpy(), np.nan)) for k, v in arrays.items()}
            )
        return arrays, metrics


class _RaisingFedAvg(FedAvg):
    def aggregate_train(self, server_round, replies):
        raise ValueError("cannot weigh these replies")


def test_a_non_finite_or_failed_aggregate_keeps_the_model_and_the_optimizer_state(caplog):
    """The combined result was checked for keys and shapes only: one NaN step became the
    global model (every later reply then rejected against it) and the exported backbone, and
    an aggregator raising on node-made values ended the run."""
    keys = ["a", "b"]
    sound = [reply({k: np.full((2, 3), 1.0 + i, np.float32) for k in keys}) for i in range(2)]
    start = stage_arrays(keys, 0.0)
    hit = ActiveAggregation(_PoisonedFedAdam(eta=0.1), "num-examples")
    after_1 = hit.combine(start, sound, 0, 1)
    saved = {k: v.copy() for k, v in hit.state().items()}
    hit.strategy.poison = True
    assert hit.combine(after_1, sound, 0, 2) is None
    assert "round 2: the aggregator _PoisonedFedAdam combined the sound replies into NaN" in (
        caplog.text
    )
    state = hit.state()
    assert state.keys() == saved.keys() and all(np.array_equal(state[k], saved[k]) for k in saved)
    hit.strategy.poison = False
    clean = ActiveAggregation(FedAdam(eta=0.1), "num-examples")
    expected = clean.combine(clean.combine(start, sound, 0, 1), sound, 0, 2)
    got = hit.combine(after_1, sound, 0, 3)  # as if round 2 had never been
    assert all(np.array_equal(got[k].numpy(), expected[k].numpy()) for k in keys)

    raising = ActiveAggregation(_RaisingFedAvg(), "num-examples")
    assert raising.combine(start, sound, 0, 1) is None
    assert "failed on the sound replies (ValueError: cannot weigh these replies)" in caplog.text
    assert raising.state()["steps"].tolist() == [0]


def test_a_server_optimizer_without_a_positive_tau_is_refused():
    """FedAdam(tau=0) turned a round whose replies equal the model into 0/0 = NaN."""
    for tau in (0.0, -1e-3, float("inf")):
        with pytest.raises(ValueError, match="tau must be a finite number > 0"):
            ActiveAggregation(FedAdam(eta=0.1, tau=tau), "num-examples")


@pytest.mark.parametrize("loss", [None, -0.5], ids=["missing", "negative"])
def test_qfedavg_rejects_a_reply_whose_loss_it_cannot_weigh(loss, tiny_overrides, caplog):
    """One node leaving train-loss out crashed the ServerApp (QFedAvg raised on the replies),
    a negative one turned every tensor into NaN (its q-th power): that reply is rejected now."""
    from flwr.serverapp.strategy import QFedAvg

    cfg = resolve_config(tiny_overrides)
    strategy = _with_aggregator(cfg, QFedAvg(client_learning_rate=0.1, train_loss_key="train-loss"))
    grid = InProcessGrid(6, tiny_overrides)
    tampered: list[int] = []

    def tamper(msg):
        if not tampered:
            tampered.append(msg.metadata.src_node_id)
            metrics = msg.content["metrics"]
            if loss is None:
                del metrics["train-loss"]
            else:
                metrics["train-loss"] = loss
        return msg

    grid.tamper = tamper
    initial = ArrayRecord({k: v.contiguous() for k, v in initial_state(cfg.model, 0).items()})
    sent = list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    after, record = strategy.aggregate_train(1, grid.send_and_receive(sent))
    assert record["rejected-metrics"] == 1 and record["clients"] == 2
    assert f"reply from node {tampered[0]} rejected (metrics): 'train-loss' missing or" in (
        caplog.text
    )
    assert all(np.all(np.isfinite(v.numpy())) for v in after.values())
    assert any(not np.array_equal(after[k].numpy(), initial[k].numpy()) for k in after)


def test_a_state_of_the_stage_before_the_checkpoint_s_round_restarts_the_stage(caplog):
    """Checkpoints written after a stage's first round lost every reply named the stage before
    (the aggregation marked a stage only when it combined); such a state is a finished stage's,
    which the run that never stopped would have reset: it resumes afresh, not refused."""
    cfg = resolve_config({"aggregation": "fedadam"})
    rounds = cfg.schedule.rounds_per_stage
    model = ArrayRecord({k: Array(v.numpy()) for k, v in initial_state(cfg.model, 0).items()})
    stale = {"stage": np.array([0]), "steps": np.array([rounds]), "m_t/w": np.zeros(2),
             "v_t/w": np.zeros(2)}  # fmt: skip
    strategy = build_strategy(cfg, first_round=rounds + 2)  # round rounds + 1: stage 1
    strategy.restore_server_state(stale, model)
    assert strategy.server_state() == {}
    assert "aggregation state is of stage 0, which ended; stage 1 goes on afresh" in caplog.text
    # a stage that is no whole number >= 0 is no earlier stage: refused, as the run refuses it
    # (the resume pre-check took stage -1 for an ended one; the run then failed after it had
    # rewritten the run folder)
    for stage in (np.array([-1]), np.array([0.5])):
        with pytest.raises(ValueError, match="server state of stage"):
            build_strategy(cfg, first_round=rounds + 2).restore_server_state(
                {**stale, "stage": stage}, model
            )
