"""The stage plan alone: schedule, growth (fresh/copy, decoder reset), active/prefix split."""

from __future__ import annotations

import numpy as np
import pytest

from fedmae_flwr.config import resolve_config
from fedmae_flwr.models import active_key, initial_state, prefix_key
from fedmae_flwr.server_app import build_strategy
from fedmae_flwr.strategies import StagePlan


def fresh_block(index: int) -> dict[str, np.ndarray]:
    return {f"blocks.{index}.w": np.full(2, float(index)), f"blocks.{index}.b": np.zeros(1)}


def fresh_decoder(index: int) -> dict[str, np.ndarray]:
    return {"decoder.w": np.full(3, -float(index))}


def tiny_state() -> dict[str, np.ndarray]:
    return {
        "cls_token": np.ones(1),
        "patch_embed.proj.weight": np.ones(4),
        **fresh_block(0),
        "norm.weight": np.ones(2),
        "decoder.w": np.ones(3),
    }


def test_schedule_progressive_and_end_to_end():
    plan = StagePlan(3, 2, fresh_block)
    assert plan.num_rounds == 6
    assert [plan.stage_of(r) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert [r for r in range(1, 7) if plan.is_stage_end(r)] == [2, 4, 6]
    assert [plan.frozen_blocks(r) for r in range(1, 7)] == [0, 0, 1, 1, 2, 2]
    assert [plan.blocks_at(r) for r in range(1, 7)] == [1, 1, 2, 2, 3, 3]
    e2e = StagePlan(3, 2, fresh_block, progressive=False)
    assert [e2e.frozen_blocks(r) for r in (1, 6)] == [0, 0]
    assert [e2e.blocks_at(r) for r in (1, 6)] == [3, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"depth": 0}, "depth"),
        ({"rounds_per_stage": 0}, "rounds_per_stage"),
        ({"next_block_init": "zero"}, "next_block_init"),
        ({"decoder_per_stage": "drop"}, "decoder_per_stage"),
        ({"decoder_per_stage": "reset"}, "new_decoder"),
    ],
)
def test_bad_plans_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StagePlan(**{"depth": 2, "rounds_per_stage": 2, "new_block": fresh_block, **kwargs})


def test_grow_appends_fresh_blocks_and_leaves_its_input_alone():
    plan = StagePlan(3, 2, fresh_block)
    state = tiny_state()
    before = {k: v.copy() for k, v in state.items()}
    assert plan.grow(state, 2).keys() == state.keys()  # stage 0: nothing to add
    grown = plan.grow(state, 5)  # stage 2: blocks 1 and 2 appended
    assert state.keys() == before.keys()
    assert all(np.array_equal(state[k], v) for k, v in before.items())
    assert all(grown[k] is v for k, v in state.items())  # untouched tensors are not copied
    assert list(grown)[-4:] == ["blocks.1.w", "blocks.1.b", "blocks.2.w", "blocks.2.b"]
    assert np.array_equal(grown["blocks.2.w"], [2.0, 2.0])
    assert plan.grow(grown, 6) == grown  # already grown


def test_grow_copies_the_previous_block_and_resets_the_decoder():
    plan = StagePlan(2, 1, fresh_block, fresh_decoder, next_block_init="copy",
                     decoder_per_stage="reset")  # fmt: skip
    state = tiny_state()
    state["blocks.0.w"] = np.array([5.0, 6.0])
    grown = plan.grow(state, 2)
    assert np.array_equal(grown["blocks.1.w"], [5.0, 6.0])
    assert grown["blocks.1.w"] is not state["blocks.0.w"]  # a copy, not a shared buffer
    assert np.array_equal(grown["decoder.w"], [-1.0, -1.0, -1.0])
    assert np.array_equal(state["decoder.w"], [1.0, 1.0, 1.0])


def test_end_to_end_grows_the_whole_depth_at_once():
    plan = StagePlan(3, 2, fresh_block, progressive=False)
    grown = plan.grow(tiny_state(), 1)
    active, prefix = plan.split(grown, 1)
    assert {k.split(".")[1] for k in grown if k.startswith("blocks.")} == {"0", "1", "2"}
    assert active.keys() == grown.keys() and prefix == {}


def test_split_matches_the_model_key_rules():
    plan = StagePlan(3, 2, fresh_block)
    grown = plan.grow(tiny_state(), 3)  # stage 1: block 0 frozen, block 1 trains
    active, prefix = plan.split(grown, 3)
    assert set(active) == {k for k in grown if active_key(k, 1)}
    assert set(prefix) == {k for k in grown if prefix_key(k, 1)}
    assert set(active) == {"blocks.1.w", "blocks.1.b", "norm.weight", "decoder.w"}
    assert set(prefix) == {"cls_token", "patch_embed.proj.weight", "blocks.0.w", "blocks.0.b"}
    active0, prefix0 = plan.split(tiny_state(), 1)
    assert prefix0 == {} and active0.keys() == tiny_state().keys()


def test_the_apps_plan_grows_real_blocks(tiny_overrides):
    cfg = resolve_config(
        {**tiny_overrides, "next-block-init": "copy", "decoder-per-stage": "reset"}
    )
    plan = build_strategy(cfg).plan
    state = {k: v.numpy() for k, v in initial_state(cfg.model, cfg.seed).items()}
    grown = plan.grow(state, cfg.schedule.rounds_per_stage + 1)
    for key in (k for k in state if k.startswith("blocks.0.")):
        assert np.array_equal(grown[key.replace("blocks.0.", "blocks.1.")], state[key])
    decoder_keys = [k for k in state if k.startswith("decoder.")]
    assert any(not np.array_equal(grown[k], state[k]) for k in decoder_keys)
