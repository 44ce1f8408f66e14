"""FedMAE strategy: stage schedule, partial exchange, prefix caching and re-send, bad replies.

Strategy and client handlers are the real ones; messages travel through conftest.LocalGrid.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedmae_flwr.config import resolve_config
from fedmae_flwr.models import CascadeMAE, block_index, initial_state
from fedmae_flwr.server_app import build_strategy
from fedmae_flwr.strategies import PREFIX_KEY

from .conftest import LocalGrid


def initial_arrays(cfg) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in initial_state(cfg.model, cfg.seed).items()})


def run_rounds(strategy, grid, arrays, rounds):
    for server_round in rounds:
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
        arrays, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    return arrays


@pytest.fixture
def setup(tiny_overrides):
    cfg = resolve_config(tiny_overrides)
    return cfg, build_strategy(cfg), LocalGrid(6, tiny_overrides)


def test_schedule():
    cfg = resolve_config({"depth": 3, "rounds-per-stage": 4})
    strategy = build_strategy(cfg)
    assert strategy.num_rounds == 12
    assert [strategy.stage_of(r) for r in (1, 4, 5, 8, 9, 12)] == [0, 0, 1, 1, 2, 2]
    assert [r for r in range(1, 13) if strategy.is_stage_end(r)] == [4, 8, 12]


def test_full_run_grows_the_model_and_exchanges_only_active_tensors(setup):
    cfg, strategy, grid = setup
    result = strategy.start(grid, initial_arrays(cfg), num_rounds=cfg.num_rounds)
    blocks = {block_index(k) for k in result.arrays} - {None}
    assert blocks == set(range(cfg.model.depth))
    assert len(strategy.round_log) == cfg.num_rounds
    for entry in strategy.round_log:
        stage = entry["stage"]
        active = CascadeMAE(cfg.model, num_blocks=stage + 1).active_state()
        expected_bytes = ArrayRecord({k: v.contiguous() for k, v in active.items()}).count_bytes()
        assert entry["clients"] == cfg.schedule.clients_per_round
        assert entry["bytes-up-per-client"] == expected_bytes
        assert entry["active-bytes"] == expected_bytes
        assert entry["bytes-up-per-client"] < entry["full-model-bytes"] or stage == 0
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
    arrays = run_rounds(strategy, grid, initial_arrays(cfg), [1, 2])
    block0 = {k: v.numpy().copy() for k, v in arrays.items() if k.startswith("blocks.0.")}
    arrays = run_rounds(strategy, grid, arrays, [3, 4])
    assert all(np.array_equal(arrays[k].numpy(), v) for k, v in block0.items())
    assert any(k.startswith("blocks.1.") for k in arrays)


def test_node_that_lost_its_prefix_gets_it_again_in_the_same_round(setup):
    cfg, strategy, grid = setup
    arrays = run_rounds(strategy, grid, initial_arrays(cfg), [1, 2, 3])  # stage 1 began
    holders = {m.metadata.dst_node_id for m in grid.sent if PREFIX_KEY in m.content}
    for node in holders:  # every holder restarts and loses Context.state
        grid.contexts[node].state = RecordDict()
    sent_before = len(grid.sent)
    strategy.num_train_nodes = len(grid.contexts)  # sample every node, holders included
    run_rounds(strategy, grid, arrays, [4])
    entry = strategy.round_log[-1]
    assert entry["clients"] == len(grid.contexts)  # nobody lost
    round4 = [m.metadata.dst_node_id for m in grid.sent[sent_before:]]
    resent_to = {n for n in round4 if round4.count(n) == 2}
    assert resent_to == holders
    # first sends to the 3 non-holders + re-sends to the 3 holders
    assert entry["prefix-sends"] == len(grid.contexts)


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
    arrays = run_rounds(strategy, grid, before, [1])
    entry = strategy.round_log[-1]
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
    from flwr.app import Error

    failed = Message(Error(code=0, reason="node crashed"), reply_to=messages[2])
    arrays, _ = strategy.aggregate_train(1, [*replies, empty, failed])
    entry = strategy.round_log[-1]
    assert (entry["clients"], entry["rejected"]) == (1, 1)
    assert arrays is not None


def test_next_block_copy_and_decoder_reset(tiny_overrides):
    cfg = resolve_config(
        {**tiny_overrides, "next-block-init": "copy", "decoder-per-stage": "reset"}
    )
    strategy = build_strategy(cfg)
    arrays = initial_arrays(cfg)
    grown = strategy.grow(arrays, stage=1)
    for key in (k for k in arrays if k.startswith("blocks.0.")):
        assert np.array_equal(
            grown[key.replace("blocks.0.", "blocks.1.")].numpy(), arrays[key].numpy()
        )
    decoder_keys = [k for k in arrays if k.startswith("decoder.")]
    assert any(not np.array_equal(grown[k].numpy(), arrays[k].numpy()) for k in decoder_keys)


def test_evaluate_runs_only_at_stage_ends(setup):
    cfg, strategy, grid = setup
    arrays = run_rounds(strategy, grid, initial_arrays(cfg), [1])
    assert list(strategy.configure_evaluate(1, arrays, ConfigRecord(), grid)) == []
    arrays = run_rounds(strategy, grid, arrays, [2])
    messages = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), grid))
    assert len(messages) == cfg.schedule.evaluate_clients
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
    metrics = strategy.aggregate_evaluate(2, grid.send_and_receive(messages))
    assert metrics is not None and metrics["eval-loss"] > 0
