"""FedMAE strategy: stage schedule, partial exchange, prefix caching, bad replies, resume, sampling.

Strategy and client handlers are the real ones; messages travel through conftest.LocalGrid.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import Strategy

from fedmae_flwr.config import resolve_config
from fedmae_flwr.models import CascadeMAE, block_index, fresh_block_state, initial_state
from fedmae_flwr.server_app import build_strategy
from fedmae_flwr.strategies import PREFIX_KEY, FedMAE
from fedmae_flwr.strategies.fedmae import MODEL_CONFIG
from fedmae_flwr.strategies.sampling import wait_for_nodes

from .conftest import LocalGrid


def initial_arrays(cfg) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in initial_state(cfg.model, cfg.seed).items()})


def run_rounds(strategy, grid, arrays, rounds):
    """Train ``rounds`` as Flower's start() would; returns the arrays and each round's record."""
    records = []
    for server_round in rounds:
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        arrays, record = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        records.append(record)
    return arrays, records


@pytest.fixture
def setup(tiny_overrides):
    cfg = resolve_config(tiny_overrides)
    return cfg, build_strategy(cfg), LocalGrid(6, tiny_overrides)


def test_schedule():
    cfg = resolve_config({"depth": 3, "rounds-per-stage": 4})
    plan = build_strategy(cfg).plan
    assert plan.num_rounds == 12
    assert [plan.stage_of(r) for r in (1, 4, 5, 8, 9, 12)] == [0, 0, 1, 1, 2, 2]
    assert [r for r in range(1, 13) if plan.is_stage_end(r)] == [4, 8, 12]


def test_full_run_grows_the_model_and_exchanges_only_active_tensors(setup):
    cfg, strategy, grid = setup
    seen = []
    result = strategy.start(
        grid,
        initial_arrays(cfg),
        evaluate_fn=lambda r, _: seen.append((r, strategy.last_round_metrics)),
    )
    blocks = {block_index(k) for k in result.arrays} - {None}
    assert blocks == set(range(cfg.model.depth))
    records = result.train_metrics_clientapp
    assert list(records) == list(range(1, cfg.num_rounds + 1))
    # evaluate_fn sees each round's record right after the round, as Result keeps it
    assert [(r, m["round"] if m else None) for r, m in seen] == [(0, None)] + [
        (r, r) for r in records
    ]
    assert all(dict(m.items()) == dict(records[r].items()) for r, m in seen if r)
    for entry in records.values():
        stage = entry["stage"]
        active = CascadeMAE(cfg.model, num_blocks=stage + 1).active_state()
        expected_bytes = ArrayRecord({k: v.contiguous() for k, v in active.items()}).count_bytes()
        assert entry["clients"] == cfg.schedule.clients_per_round
        assert (entry["rejected"], entry["prefix-missing"]) == (0, 0)
        assert entry["bytes-up-per-client"] == expected_bytes
        assert entry["active-bytes"] == expected_bytes
        assert entry["bytes-up-per-client"] < entry["full-model-bytes"] or stage == 0
        assert entry["train-loss"] > 0
    for msg in grid.sent:
        stage = int(msg.content["config"]["stage"])
        assert set(msg.content["arrays"]) == set(CascadeMAE(cfg.model, stage + 1).active_state())
        # The prefix is never part of the per-round payload of stage 0.
        assert (PREFIX_KEY in msg.content) <= (stage > 0)
    # The prefix reaches a node at most once per stage.
    for stage in range(1, cfg.model.depth):
        receivers = [
            m.metadata.dst_node_id
            for m in grid.sent
            if PREFIX_KEY in m.content and int(m.content["config"]["stage"]) == stage
        ]
        assert len(receivers) == len(set(receivers)) > 0


def test_trained_block_is_frozen_after_its_stage(setup):
    cfg, strategy, grid = setup
    arrays, _ = run_rounds(strategy, grid, initial_arrays(cfg), [1, 2])
    block0 = {k: v.numpy().copy() for k, v in arrays.items() if k.startswith("blocks.0.")}
    arrays, _ = run_rounds(strategy, grid, arrays, [3, 4])
    assert all(np.array_equal(arrays[k].numpy(), v) for k, v in block0.items())
    assert any(k.startswith("blocks.1.") for k in arrays)


def test_node_that_lost_its_prefix_sits_out_the_round_and_rejoins_with_it(tiny_overrides):
    overrides = {**tiny_overrides, "rounds-per-stage": 3, "clients-per-round": 6}
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), LocalGrid(6, overrides)
    arrays, _ = run_rounds(strategy, grid, initial_arrays(cfg), [1, 2, 3, 4])  # stage 1 began
    lost = sorted(grid.contexts)[:3]
    for node in lost:  # these nodes restart and lose Context.state
        grid.contexts[node].state = RecordDict()
    sent_before = len(grid.sent)
    arrays, [round5] = run_rounds(strategy, grid, arrays, [5])
    assert (round5["clients"], round5["prefix-missing"], round5["rejected"]) == (3, 3, 0)
    assert round5["prefix-sends"] == 0  # the server believed every node held it
    round5_sent = grid.sent[sent_before:]
    assert sorted(m.metadata.dst_node_id for m in round5_sent) == sorted(grid.contexts)  # once
    _, [round6] = run_rounds(strategy, grid, arrays, [6])
    assert (round6["clients"], round6["prefix-missing"]) == (6, 0)
    assert round6["prefix-sends"] == 3
    round6_sent = grid.sent[sent_before + len(round5_sent) :]
    assert sorted(m.metadata.dst_node_id for m in round6_sent if PREFIX_KEY in m.content) == lost


def test_bad_replies_are_rejected_and_the_round_goes_on(setup):
    cfg, strategy, grid = setup
    calls = {"n": 0}

    def corrupt(reply: Message) -> Message:
        calls["n"] += 1
        if calls["n"] == 1:  # NaN in a tensor
            arrays = reply.content["arrays"]
            key = next(iter(arrays))
            arrays[key] = Array(np.full(arrays[key].shape, np.nan, dtype=np.float32))
        elif calls["n"] == 2:  # a tensor the server did not send
            reply.content["arrays"]["blocks.7.extra"] = Array(np.zeros(1, dtype=np.float32))
        return reply

    grid.tamper = corrupt
    before = initial_arrays(cfg)
    arrays, [entry] = run_rounds(strategy, grid, before, [1])
    assert (entry["rejected"], entry["clients"]) == (2, 1)
    assert all(np.isfinite(v.numpy()).all() for v in arrays.values())
    assert set(arrays) == set(before)


def test_error_and_empty_replies_do_not_crash(setup):
    cfg, strategy, grid = setup
    messages = list(strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages[:1])
    empty = Message(
        RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=messages[1]
    )
    failed = Message(Error(code=0, reason="node crashed"), reply_to=messages[2])
    arrays, entry = strategy.aggregate_train(1, [*replies, empty, failed])
    assert (entry["clients"], entry["rejected"]) == (1, 1)
    assert arrays is not None


def test_a_reply_that_is_no_message_is_rejected_in_train_and_evaluate(setup):
    """triage rejects it as malformed, but ordering the replies by sender read its metadata
    first and raised (AttributeError): a Grid of one's own that passes None ended the run."""
    cfg, strategy, grid = setup
    messages = list(strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), grid))
    _, entry = strategy.aggregate_train(1, [*grid.send_and_receive(messages), None])
    assert (entry["clients"], entry["rejected-malformed"]) == (3, 1)
    assert strategy.aggregate_evaluate(2, [None]) is None


def test_evaluation_metrics_named_as_the_server_s_count_are_left_out(setup, caplog):
    """A node reporting rejected=99 put it into the record Flower keeps
    (Result.evaluate_metrics_clientapp), beside the server's own count of that name."""
    cfg, strategy, grid = setup
    arrays, _ = run_rounds(strategy, grid, initial_arrays(cfg), [1, 2])
    messages = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid))

    def forge(reply: Message) -> Message:
        reply.content["metrics"]["rejected"] = 99.0
        return reply

    grid.tamper = forge
    record = strategy.aggregate_evaluate(2, grid.send_and_receive(messages))
    assert record is not None and "rejected" not in record and record["eval-loss"] > 0
    assert "evaluation metric 'rejected' is named as the server's own key" in caplog.text
    assert strategy.evaluation_of(2)[1]["rejected"] == 0


def test_evaluate_runs_only_at_stage_ends(setup):
    cfg, strategy, grid = setup
    arrays, _ = run_rounds(strategy, grid, initial_arrays(cfg), [1])
    assert list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)) == []
    arrays, _ = run_rounds(strategy, grid, arrays, [2])
    messages = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert len(messages) == cfg.schedule.evaluate_clients
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
    metrics = strategy.aggregate_evaluate(2, grid.send_and_receive(messages))
    assert metrics is not None and metrics["eval-loss"] > 0


def test_no_evaluation_is_reported_where_no_node_was_asked(setup):
    """Flower calls aggregate_evaluate every round, with no replies where none were asked: the
    stage-end lines of runs with evaluate-clients 0 gained evaluating-nodes 0."""
    _, strategy, grid = setup
    assert strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid) == []
    assert strategy.aggregate_evaluate(1, []) is None and strategy.evaluation_of(1) is None


def test_a_small_deployment_evaluates_on_the_nodes_it_has_instead_of_failing(
    tiny_overrides, caplog
):
    """2 nodes, evaluate-clients 5 (the default): every stage end evaluates on both, with a
    warning, at once (the run waited node-wait-timeout, then failed at stage 0's end)."""
    overrides = {**tiny_overrides, "clients-per-round": 2, "evaluate-clients": 5,
                 "node-wait-timeout": 5}  # fmt: skip
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), LocalGrid(2, overrides)
    result = strategy.start(grid, initial_arrays(cfg))
    assert sorted(result.evaluate_metrics_clientapp) == [2, 4]  # both stage ends measured
    evaluations = [m for m in grid.sent if m.metadata.message_type == MessageType.EVALUATE]
    assert len(evaluations) == 4  # 2 nodes x 2 stage ends
    assert "round 2 evaluates on 2 nodes, not 5: only 2 usable nodes" in caplog.text
    # With no node left to evaluate, the stage end is not measured and the run goes on.
    strategy._excluded.update(dict.fromkeys(grid.get_node_ids(), "test"))
    assert list(strategy.configure_evaluate(4, result.arrays, ConfigRecord(), grid)) == []


class LeavingGrid(LocalGrid):
    """A device leaves right after configure_evaluate first counts the nodes."""

    looks = 0

    def get_node_ids(self):
        self.looks += 1
        nodes = super().get_node_ids()
        return nodes if self.looks == 1 else nodes[:-1]


def test_a_node_leaving_while_the_evaluation_is_sampled_does_not_make_it_wait(tiny_overrides):
    """configure_evaluate counts the usable nodes, then samples them: a device gone between the
    two made the sampling wait node-wait-timeout for it, then fail the run at a stage end."""
    overrides = {**tiny_overrides, "evaluate-clients": 3, "node-wait-timeout": 30}
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), LeavingGrid(3, overrides)
    arrays = initial_arrays(cfg)
    strategy.configure_train(1, arrays, ConfigRecord(), LocalGrid(3, overrides))
    messages = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert len(messages) == 2 and grid.looks == 2


def test_num_rounds_past_the_cascade_is_refused_and_fewer_warn(tiny_overrides, caplog):
    """A Flower user passes num_rounds to start(): past depth x rounds-per-stage there is no
    block to train (every node failed on 'num_blocks must be in [1, depth]')."""
    overrides = {**tiny_overrides, "evaluate-clients": 0}
    cfg = resolve_config(overrides)  # depth 2 x 2 rounds per stage
    strategy, grid = build_strategy(cfg), LocalGrid(6, overrides)
    with pytest.raises(ValueError, match=r"num_rounds 5 is past .* = 4; pass num_rounds <= 4"):
        strategy.start(grid, initial_arrays(cfg), num_rounds=5)
    assert grid.sent == []  # refused before any work
    result = strategy.start(grid, initial_arrays(cfg), num_rounds=2)
    assert "num_rounds 2 stops before the cascade's last round 4: the model will have 1 of" in (
        caplog.text
    )
    assert {block_index(k) for k in result.arrays} - {None} == {0}


def test_an_initial_model_of_another_architecture_is_refused_before_any_node_gets_it(
    tiny_overrides,
):
    """From Python, start() checked only the names: a model of another width reached every
    node, which failed with a size mismatch inside a Ray trace."""
    cfg = resolve_config(tiny_overrides)
    strategy, grid = build_strategy(cfg), LocalGrid(6, tiny_overrides)
    wide = initial_arrays(resolve_config({**tiny_overrides, "embed-dim": 64}))
    with pytest.raises(ValueError, match=r"blocks\.0\.norm1\.weight is float32 \(64,\), but"):
        strategy.start(grid, wide)
    # float16 (nodes reply float32: every reply was rejected, after a whole stage)
    half = ArrayRecord({k: v.half().contiguous() for k, v in initial_state(cfg.model, 0).items()})
    with pytest.raises(ValueError, match=r"is float16 .* make it float32"):
        strategy.start(grid, half)
    # no decoder, or nothing at all (each failed on every node, a stage later)
    state = initial_state(cfg.model, 0)
    headless = ArrayRecord({k: v for k, v in state.items() if not k.startswith("decoder.")})
    with pytest.raises(ValueError, match=r"the model has no decoder\.\* tensors"):
        strategy.start(grid, headless)
    with pytest.raises(ValueError, match=r"the model has no patch_embed\.\* tensors"):
        strategy.start(grid, ArrayRecord())
    # a block missing a tensor, blocks not numbered from 0
    holed = ArrayRecord({k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"})
    with pytest.raises(ValueError, match=r"the model lacks blocks\.0\.attn\.qkv\.weight"):
        strategy.start(grid, holed)
    late = {k.replace("blocks.0.", "blocks.1."): v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"the model's blocks are \[1\], not 0\.\.n-1"):
        build_strategy(cfg, first_round=3).start(grid, ArrayRecord(late))
    # the full depth at round 1 trained end to end in stage 0, silently
    full = CascadeMAE(cfg.model, num_blocks=2)
    deep = ArrayRecord({k: v.contiguous() for k, v in full.state_dict().items()})
    with pytest.raises(ValueError, match=r"the model has blocks 0\.\.1, but round 1 holds 1"):
        strategy.start(grid, deep)
    assert grid.sent == [] and grid.queries == []


def test_a_stem_of_other_channels_than_the_decoder_is_refused_without_a_decoder_factory(
    tiny_overrides,
):
    """Without new_decoder (the plugin example passes none) start() compared blocks only: a
    3-channel stem on a 1-channel decoder reached every node and failed there."""
    cfg = resolve_config(tiny_overrides)
    plan = build_strategy(cfg).plan
    bare = plan.__class__(plan.depth, plan.rounds_per_stage, plan.new_block)  # no new_decoder
    state = {k: tuple(v.shape) for k, v in initial_state(cfg.model, 0).items()}
    rgb = initial_state(resolve_config({**tiny_overrides, "in-chans": 3}).model, 0)
    tensors = {k: (shape, "float32") for k, shape in state.items()}
    bare.check_model(tensors, 1)  # the model as it is passes
    mixed = {**tensors, "patch_embed.proj.weight": (tuple(rgb["patch_embed.proj.weight"].shape),
                                                    "float32")}  # fmt: skip
    with pytest.raises(ValueError, match=r"takes 3 channel\(s\) of 4x4 patches \(48 values\), "
                       r"but decoder\.pred predicts 16"):  # fmt: skip
        bare.check_model(mixed, 1)
    narrow = {**tensors, "decoder.embed.weight": ((state["decoder.embed.weight"][0], 7), "float32")}
    with pytest.raises(ValueError, match=r"width is \d+, but decoder\.embed reads 7"):
        bare.check_model(narrow, 1)


def test_one_strategy_instance_runs_twice_as_it_ran_once(tiny_overrides):
    """A second start() kept the first run's prefix cache: fresh nodes were believed to hold
    the prefix, replied prefix-missing, and the second run differed (or failed a stage)."""
    overrides = {**tiny_overrides, "evaluate-clients": 0}
    cfg = resolve_config(overrides)
    strategy = build_strategy(cfg)
    first = strategy.start(LocalGrid(6, overrides), initial_arrays(cfg))
    second = strategy.start(LocalGrid(6, overrides), initial_arrays(cfg))
    assert [m["prefix-missing"] for m in second.train_metrics_clientapp.values()] == [0] * 4
    for key in first.arrays:
        assert np.array_equal(first.arrays[key].numpy(), second.arrays[key].numpy()), key


class PassThrough(Strategy):
    """A plain wrapper, as a plugin user composes strategies: Flower's own start() drives it."""

    def __init__(self, inner: FedMAE) -> None:
        self.inner = inner

    def summary(self) -> None:
        pass

    def configure_train(self, *args):
        return self.inner.configure_train(*args)

    def aggregate_train(self, *args):
        return self.inner.aggregate_train(*args)

    def configure_evaluate(self, *args):
        return self.inner.configure_evaluate(*args)

    def aggregate_evaluate(self, *args):
        return self.inner.aggregate_evaluate(*args)


def test_a_wrapper_s_start_gets_the_checks_fedmae_start_makes(tiny_overrides):
    """Driven by Flower's Strategy.start (through a wrapper), a full-depth initial model trained
    every block at once in 'stage 0', and rounds past the schedule grew a block the nodes
    refused: checked at the first round and refused past the last, as FedMAE.start does."""
    overrides = {**tiny_overrides, "evaluate-clients": 0}
    cfg = resolve_config(overrides)
    full = ArrayRecord(
        {k: v.contiguous() for k, v in CascadeMAE(cfg.model, num_blocks=2).state_dict().items()}
    )
    with pytest.raises(ValueError, match="block"):
        PassThrough(build_strategy(cfg)).start(LocalGrid(6, overrides), full, num_rounds=4)
    strategy = build_strategy(cfg)
    with pytest.raises(ValueError, match=r"round 5 is past the cascade's last round 4"):
        PassThrough(strategy).start(LocalGrid(6, overrides), initial_arrays(cfg), num_rounds=5)
    # a second run through the wrapper begins afresh, as a second FedMAE.start does
    result = PassThrough(strategy).start(LocalGrid(6, overrides), initial_arrays(cfg), num_rounds=4)
    assert {block_index(k) for k in result.arrays} - {None} == {0, 1}
    assert [m["prefix-missing"] for m in result.train_metrics_clientapp.values()] == [0] * 4


def test_the_server_s_model_config_travels_with_each_message(setup):
    cfg, strategy, grid = setup
    messages = list(strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), grid))
    sent = {json.dumps(dataclasses.asdict(cfg.model))}
    assert {m.content["config"][MODEL_CONFIG] for m in messages} == sent
    with pytest.raises(ValueError, match=r"num_evaluate_nodes must be a whole number >= 0.*1.5"):
        FedMAE(depth=2, rounds_per_stage=1, new_block=strategy.plan.new_block,
               num_evaluate_nodes=1.5)  # fmt: skip


def test_a_new_block_factory_that_names_another_block_is_refused(tiny_overrides):
    """new_block keyed every block blocks.0: the trained block 0 was overwritten, and stage 1
    failed with 'frozen_blocks must be in [0, 0], got 1'."""
    cfg = resolve_config(tiny_overrides)
    strategy = build_strategy(cfg)
    always_block_0 = strategy.plan.new_block
    plan = strategy.plan.__class__(2, 2, lambda i: always_block_0(0), strategy.plan.new_decoder)
    with pytest.raises(ValueError, match=r"new_block\(1\) must return block 1's tensors, named"):
        plan.grow(dict(initial_state(cfg.model, 0)), 3)
    # next_block_init='copy' from a model with no block yet: block 0 is new_block's (it was
    # an empty copy of a block -1, and every node failed)
    copying = strategy.plan.__class__(2, 2, always_block_0, next_block_init="copy")
    stem = {k: v for k, v in initial_state(cfg.model, 0).items() if not k.startswith("blocks.")}
    grown = copying.grow(stem, 1)
    assert sorted(grown.keys() - stem.keys()) == sorted(always_block_0(0))


def test_a_strategy_built_for_a_later_round_numbers_rounds_as_the_whole_run(tiny_overrides):
    overrides = {**tiny_overrides, "evaluate-clients": 0}
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg, first_round=3), LocalGrid(6, overrides)
    seen = []
    result = strategy.start(
        grid, initial_arrays(cfg), evaluate_fn=lambda r, _: seen.append(r) or None
    )
    assert strategy.first_round == 3
    assert seen == [0, 3, 4]
    assert list(result.train_metrics_clientapp) == [3, 4]
    assert [m["round"] for m in result.train_metrics_clientapp.values()] == [3, 4]
    assert {int(m.content["config"]["server-round"]) for m in grid.sent} == {3, 4}
    assert {block_index(k) for k in result.arrays} - {None} == {0, 1}
    # a new server cannot know what the nodes hold: round 3's nodes all get the prefix
    assert result.train_metrics_clientapp[3]["prefix-sends"] == cfg.schedule.clients_per_round
    # Resumed after the last round: nothing to train (the constructor accepted it, start()
    # refused it); past a shorter num_rounds it is still refused.
    sent_before, model = len(grid.sent), initial_arrays(cfg)
    done = build_strategy(cfg, first_round=5).start(grid, model)
    assert done.arrays is model and len(grid.sent) == sent_before
    with pytest.raises(ValueError, match="past the last round 3"):
        build_strategy(cfg, first_round=5).start(grid, model, num_rounds=3)
    with pytest.raises(ValueError, match="first_round"):
        build_strategy(cfg, first_round=0)


class FakeClock:
    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Nodes:
    """A grid stand-in whose connected nodes grow with a clock."""

    def __init__(self, clock: FakeClock, joins: dict[float, int]) -> None:
        self.clock, self.joins = clock, joins

    def get_node_ids(self):
        n = max(count for t, count in self.joins.items() if t <= self.clock.now)
        return [100 + i for i in reversed(range(n))]


def test_node_wait_rechecks_every_second_and_gives_up_with_a_clear_error():
    clock = FakeClock()
    grid = Nodes(clock, {0.0: 1, 2.5: 2})
    with pytest.raises(RuntimeError) as err:
        wait_for_nodes(grid, wanted=3, timeout=5.0, sleep=clock.sleep, clock=lambda: clock.now)
    assert clock.sleeps == [1.0] * 5
    message = str(err.value)
    assert "2 nodes connected but 3 needed" in message
    assert "clients-per-round" in message and "min-available-clients" in message
    clock = FakeClock()
    grid = Nodes(clock, {0.0: 1, 2.5: 3})
    nodes = wait_for_nodes(grid, 3, 300.0, sleep=clock.sleep, clock=lambda: clock.now)
    assert nodes == [100, 101, 102] and clock.now == 3.0


def test_excluded_nodes_do_not_count_as_connected_and_the_error_says_so():
    clock = FakeClock()
    grid = Nodes(clock, {0.0: 4})
    with pytest.raises(RuntimeError) as err:
        wait_for_nodes(grid, 3, 2.0, clock.sleep, lambda: clock.now,
                       excluded=dict.fromkeys([100, 101, 999], "no data-path"))  # fmt: skip
    assert "2 nodes connected but 3 needed" in str(err.value)
    assert "2 more connected but excluded" in str(err.value)
    assert "said: no data-path" in str(err.value)  # the cause, not only "see the log"
    assert wait_for_nodes(grid, 3, 0.0, excluded={101: "x"}) == [100, 102, 103]


def test_a_simulation_that_cannot_get_more_nodes_fails_once_its_count_settles():
    """Flower's simulation registers every virtual node at its start: a round needing more
    waited the whole node-wait-timeout (default 300 s) for nodes that could not come."""
    from fedmae_flwr.strategies.sampling import SIMULATION_SETTLE_S

    clock = FakeClock()
    grid = Nodes(clock, {0.0: 4})
    unusable = {100: "[fedmae:node-unusable] Node 100: num-partitions must be in [1, 3]",
                101: "the same"}  # fmt: skip
    with pytest.raises(RuntimeError) as err:
        wait_for_nodes(grid, 3, 300.0, clock.sleep, lambda: clock.now, unusable, fixed=True)
    assert clock.now == SIMULATION_SETTLE_S < 300
    message = str(err.value)
    assert "2 usable nodes but 3 needed (2 more connected but excluded" in message
    assert "node 101 said: the same" in message or "num-partitions must be in [1, 3]" in message
    assert "(4 here: federation option num-supernodes), so waiting cannot help" in message
    # Nodes still registering (the count changing) are waited for.
    clock = FakeClock()
    grid = Nodes(clock, {0.0: 1, 8.0: 2, 16.0: 3})
    assert wait_for_nodes(grid, 3, 300.0, clock.sleep, lambda: clock.now, fixed=True) == [
        100, 101, 102
    ]  # fmt: skip


def test_min_available_clients_below_clients_per_round_trains_with_whoever_is_there(
    tiny_overrides, caplog
):
    """3 clients per round, 2 nodes, min-available-clients 2: every round trains on both (with
    a warning) instead of waiting for a third; unset, the round waits for 3 (and fails)."""
    overrides = {**tiny_overrides, "min-available-clients": 2, "evaluate-clients": 0,
                 "node-wait-timeout": 5}  # fmt: skip
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), LocalGrid(2, overrides)
    assert strategy.partial_rounds and strategy.num_train_nodes == 3
    result = strategy.start(grid, initial_arrays(cfg))
    assert [m["clients"] for m in result.train_metrics_clientapp.values()] == [2, 2, 2, 2]
    assert "round 1 trains on the 2 usable nodes connected, not 3" in caplog.text
    # Fewer than min-available-clients: the round waits and fails as before.
    strategy = build_strategy(resolve_config({**overrides, "node-wait-timeout": 0.01}))
    with pytest.raises(RuntimeError, match="1 nodes connected but 2 needed"):
        strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), LocalGrid(1, overrides))
    # Above clients-per-round it is Flower's minimum: wait for 4, sample 3.
    strategy = build_strategy(resolve_config({**overrides, "min-available-clients": 4}))
    assert not strategy.partial_rounds and strategy.min_available_nodes == 4
    messages = strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), LocalGrid(4, {}))
    assert len(list(messages)) == 3


def test_sampling_with_too_few_nodes_fails_instead_of_waiting_forever(tiny_overrides):
    cfg = resolve_config(tiny_overrides)  # 3 clients per round
    strategy = build_strategy(cfg)
    strategy.node_wait_timeout = 0.0
    with pytest.raises(RuntimeError, match="2 nodes connected but 3 needed"):
        strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), LocalGrid(2, {}))
    # A plugin's FedMAE(num_train_nodes=1) on 1 node: the 2 came from FedAvg's default, unnamed
    plugin = FedMAE(depth=2, rounds_per_stage=2, new_block=strategy.plan.new_block,
                    num_train_nodes=1, node_wait_timeout=0.0)  # fmt: skip
    with pytest.raises(RuntimeError) as err:
        plugin.configure_train(1, initial_arrays(cfg), ConfigRecord(), LocalGrid(1, {}))
    assert ("1 nodes connected but 2 needed, after waiting 0 s. 2 is the larger of "
            "min_available_nodes 2 (FedAvg's default: 2) and the round's 1 train nodes "
            "(num_train_nodes).") in str(err.value)  # fmt: skip
    # num_train_nodes None samples as FedAvg: the count comes from min_train_nodes, named
    fedavg_like = FedMAE(depth=2, rounds_per_stage=2, new_block=strategy.plan.new_block,
                         min_available_nodes=1, node_wait_timeout=0.0)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"the round's 2 train nodes \(num_train_nodes None: "
                       r"min_train_nodes 2, fraction_train 1\)") as err:  # fmt: skip
        fedavg_like.configure_train(1, initial_arrays(cfg), ConfigRecord(), LocalGrid(1, {}))
    assert "min_available_nodes 1 and" in str(err.value)  # FedAvg's default named only when 2


def test_a_node_that_failed_or_went_silent_gets_the_prefix_with_its_next_message(tiny_overrides):
    """A crash loses Context.state: no round is wasted on the node saying it lacks the prefix."""
    from flwr.app import Error, Message

    overrides = {**tiny_overrides, "rounds-per-stage": 3, "clients-per-round": 6}
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), LocalGrid(6, overrides)
    arrays, _ = run_rounds(strategy, grid, initial_arrays(cfg), [1, 2, 3])
    failed, silent = sorted(grid.contexts)[:2]
    deliver = grid.send_and_receive

    def crash_two(messages, *args, **kwargs):  # round 4 only: then the grid is itself again
        grid.send_and_receive = deliver
        replies = []
        for reply in deliver(messages, *args, **kwargs):
            node = reply.metadata.src_node_id
            if node in (failed, silent):
                grid.contexts[node].state = RecordDict()  # the process died with its state
            if node == failed:
                sent = next(m for m in messages if m.metadata.dst_node_id == node)
                replies.append(Message(Error(code=0, reason="crashed"), reply_to=sent))
            elif node != silent:
                replies.append(reply)
        return replies

    grid.send_and_receive = crash_two
    arrays, [round4] = run_rounds(strategy, grid, arrays, [4])
    assert (round4["clients"], round4["rejected"]) == (4, 1)
    sent_before = len(grid.sent)
    _, [round5] = run_rounds(strategy, grid, arrays, [5])
    assert (round5["clients"], round5["prefix-missing"], round5["prefix-sends"]) == (6, 0, 2)
    holders = {m.metadata.dst_node_id for m in grid.sent[sent_before:] if PREFIX_KEY in m.content}
    assert holders == {failed, silent}


def test_a_node_replying_just_inside_the_update_bound_cannot_compound_it(tiny_overrides):
    """The bound was relative to each round's tensors: a node replying ``sent x 10.9`` (update
    9.9 x their norm, inside the default 10) was never rejected and, one reply of 6 in FedAvg,
    multiplied the active tensors' norm by ~2.6 each round (~49 x over a 4-round stage). It is
    relative to their norm at the stage's start: the node is rejected from round 2 on, and no
    node inside the bound moves the tensors by more than 10 x that norm / 6 per round."""
    overrides = {**tiny_overrides, "rounds-per-stage": 4, "clients-per-round": 6}
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), LocalGrid(6, overrides)
    attacker = sorted(grid.contexts)[0]

    def inflate(reply: Message) -> Message:
        if reply.metadata.src_node_id == attacker:
            sent = [m for m in grid.sent if m.metadata.dst_node_id == attacker][-1]
            arrays = reply.content["arrays"]
            for key, array in sent.content["arrays"].items():
                arrays[key] = Array(
                    array.numpy() * np.float32(1 + 0.99 * cfg.robust.max_update_norm)
                )
        return reply

    def norm(arrays: ArrayRecord) -> float:
        active = strategy.plan.split(arrays, 1)[0]
        return float(
            np.sqrt(sum(np.sum(v.numpy().astype(np.float64) ** 2) for v in active.values()))
        )

    grid.tamper = inflate
    start = initial_arrays(cfg)
    arrays, records = run_rounds(strategy, grid, start, [1, 2, 3, 4])
    assert [r.get("rejected-update-norm", 0) for r in records] == [0, 1, 1, 1]
    assert all(r["clients"] == 5 for r in records[1:])
    linear = 1 + 4 * cfg.robust.max_update_norm / 6  # what four accepted replies could do
    assert norm(arrays) < min(3.0, linear) * norm(start)


def test_with_model_config_start_refuses_a_model_the_nodes_could_not_load(tiny_overrides):
    """With ``model=`` and no decoder factory (the README's plugin example) start() checked the
    blocks only: a model lacking cls_token or norm.*, with a tensor too many, another decoder
    depth or a float16 stem reached every node, which failed to load it for a whole stage; a
    depth other than model.depth trained stages 0..depth-1, then failed and lost them all."""
    cfg = resolve_config(tiny_overrides)
    vit = cfg.model

    def plugin(**changes) -> FedMAE:
        block = lambda i: {k: v.numpy() for k, v in fresh_block_state(vit, i, seed=i).items()}  # noqa: E731
        return FedMAE(**{"depth": vit.depth, "rounds_per_stage": 2, "new_block": block,
                         "num_train_nodes": 3, "model": vit, **changes})  # fmt: skip

    state = initial_state(vit, 0)
    decoder2 = initial_state(dataclasses.replace(vit, decoder_depth=2), 0)
    bad = {
        "no-cls": ({k: v for k, v in state.items() if k != "cls_token"},
                   r"missing \['cls_token'\]"),
        "extra": ({**state, "blocks.0.extra": state["norm.bias"]}, r"not in the model \['blocks"),
        "decoder-depth-2": (decoder2, r"not in the model \['decoder\.blocks\.1\."),
        "half-stem": ({**state, "cls_token": state["cls_token"].half()}, r"dtypes \['float16'\]"),
    }  # fmt: skip
    grid = LocalGrid(6, tiny_overrides)
    for name, (tensors, match) in bad.items():
        arrays = ArrayRecord({k: v.contiguous() for k, v in tensors.items()})
        with pytest.raises(ValueError, match="the initial model, with model=: .*" + match):
            plugin().start(grid, arrays)
        assert grid.sent == [], name
    with pytest.raises(ValueError, match=r"depth 3 is more than model\.depth 2"):
        plugin(depth=3)
    plugin(depth=1)  # a shallower cascade: the nodes build fewer blocks, fine
    # a fresh model of no block gets block 0 from new_block: accepted, as without model=
    stem_only = ArrayRecord({k: v.contiguous() for k, v in state.items()
                             if not k.startswith("blocks.")})  # fmt: skip
    plugin(rounds_per_stage=1).start(grid, stem_only, num_rounds=1)
    assert len(grid.sent) == 3
    kebab = {k.replace("_", "-"): v for k, v in dataclasses.asdict(vit).items()}
    assert plugin(model=kebab).model_config == plugin().model_config  # a mapping of its fields
