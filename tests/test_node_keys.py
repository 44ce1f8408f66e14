"""Sampling by node key: one seed trains the same data whatever node ids Flower hands out.

A Flower simulation draws new random node ids every run; these tests give the in-process grid
such ids (and hostile or missing answers to the key query) and check what the strategy samples
and trains. tests/test_simulation.py checks the same on Flower's Ray engine.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict

from fedmae_flwr.client import identify_reply, node_key
from fedmae_flwr.config import ConfigError, resolve_config
from fedmae_flwr.server_app import build_strategy, run
from fedmae_flwr.strategies.node_keys import NODE_KEY, NodeKeys, key_of_reply, natural_order

from .local_grid import InProcessGrid
from .test_strategy import initial_arrays


def random_ids(count: int, seed: int) -> list[int]:
    """Node ids as a Flower simulation draws them: random 63-bit integers."""
    return random.Random(seed).sample(range(1, 2**63), count)


def partition_of(grid: InProcessGrid, node_id: int) -> int:
    return int(grid.contexts[node_id].node_config["partition-id"])


def sampled_partitions(overrides: dict, node_ids: list[int] | None, rounds: int) -> list[list]:
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), InProcessGrid(6, overrides, node_ids=node_ids)
    arrays, samples = initial_arrays(cfg), []
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
        samples.append([partition_of(grid, m.metadata.dst_node_id) for m in messages])
    return samples


def test_the_sampled_partitions_do_not_depend_on_the_node_ids(tiny_overrides):
    by_partition = sampled_partitions(tiny_overrides, None, rounds=4)
    for seed in (1, 2):
        assert sampled_partitions(tiny_overrides, random_ids(6, seed), rounds=4) == by_partition
    # the seed still matters: another seed, another sample
    other_seed = sampled_partitions({**tiny_overrides, "seed": 1}, random_ids(6, 1), rounds=4)
    assert other_seed != by_partition


def test_each_node_is_asked_for_its_key_once_per_run(tiny_overrides):
    cfg = resolve_config(tiny_overrides)
    strategy, grid = build_strategy(cfg), InProcessGrid(6, tiny_overrides)
    arrays = initial_arrays(cfg)
    for server_round in (1, 2, 3):
        strategy.configure_train(server_round, arrays, ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in grid.queries) == sorted(grid.contexts)
    assert {m.metadata.message_type for m in grid.queries} == {MessageType.QUERY}


@pytest.mark.parametrize("ids_seed", [3, 4])
def test_a_run_on_other_node_ids_trains_the_same_model(tiny_overrides, ids_seed):
    """Whole runs (server_app.run) on default and on random node ids: the same rounds, bit for
    bit (train losses are float sums over the replies, so their order is fixed too)."""
    quick = {**tiny_overrides, "finetune-labels": 0, "evaluate-random-init": False}
    rows = []
    for name, ids in (("ids-default", None), (f"ids-random-{ids_seed}", random_ids(6, ids_seed))):
        overrides = {**quick, "run-name": name}
        grid = InProcessGrid(6, overrides, node_ids=ids)
        if ids is not None:  # replies arrive in another order than sent, as from Ray
            grid.send_and_receive = reversed_replies(grid.send_and_receive)
        run(grid, resolve_config(overrides))
        lines = (Path(quick["output-dir"]) / name / "metrics.jsonl").read_text().splitlines()
        rows.append([json.loads(line) for line in lines])
    keys = ("train-loss", "clients", "examples", "psnr")
    default_ids, random_ids_ = ([[r.get(k) for k in keys] for r in run] for run in rows)
    assert default_ids == random_ids_


def reversed_replies(send_and_receive):
    def wrapped(messages, *, timeout=None):
        return list(reversed(send_and_receive(messages, timeout=timeout)))

    return wrapped


class HostileKeysGrid(InProcessGrid):
    """Nodes 1000-1002 answer the key query badly; 1003 and 1004 claim one key."""

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.QUERY:
            return super().send_and_receive(messages, timeout=timeout)
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.queries.append(msg)
            if node == 1000:
                continue  # no reply in time
            if node == 1001:
                replies.append(Message(Error(code=0, reason="no query handler"), reply_to=msg))
            elif node == 1002:
                bad = ConfigRecord({NODE_KEY: "x" * 10_000})
                replies.append(Message(RecordDict({"config": bad}), reply_to=msg))
            elif node in (1003, 1004):
                same = ConfigRecord({NODE_KEY: "partition-3"})
                replies.append(Message(RecordDict({"config": same}), reply_to=msg))
            else:
                replies.append(identify_reply(msg, self.contexts[node]))
        return replies


def test_bad_key_answers_fall_back_to_node_ids_and_the_run_goes_on(tiny_overrides, caplog):
    config = {**tiny_overrides, "run-name": "hostile-keys", "finetune-labels": 0,
              "evaluate-random-init": False}  # fmt: skip
    grid = HostileKeysGrid(6, config)
    with caplog.at_level(logging.INFO):
        summary = run(grid, resolve_config(config))
    assert summary["depth"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert any("3 nodes gave no key" in m for m in messages), messages
    assert any("several nodes name the keys ['partition-3']" in m for m in messages)


def test_node_keys_order_naturally_with_fallbacks_and_ties():
    keys = NodeKeys()
    keys._keys = {7: "partition-10", 5: "partition-2", 9: "partition-2", 3: "node-3"}
    assert keys.order([7, 5, 9, 3, 11]) == [3, 11, 5, 9, 7]  # node-3 < node-11 < partition-2 ...
    assert natural_order("partition-2") < natural_order("partition-10")


def test_key_of_reply_takes_only_a_short_printable_string():
    query = Message(RecordDict(), message_type=MessageType.QUERY, dst_node_id=1)
    reply = lambda value: Message(RecordDict({"config": ConfigRecord({NODE_KEY: value})}),  # noqa: E731
                                  reply_to=query)  # fmt: skip
    assert key_of_reply(reply("partition-4")) == "partition-4"
    for bad in ("", "a\nb", "y" * 201, 4, 1.5, True):
        assert key_of_reply(reply(bad)) is None, bad
    assert key_of_reply(Message(RecordDict({}), reply_to=query)) is None
    assert key_of_reply(Message(Error(code=1, reason="boom"), reply_to=query)) is None


def test_a_node_is_known_by_its_node_key_else_its_partition_else_its_id():
    def context(node_config):
        return Context(run_id=1, node_id=77, node_config=node_config, state=RecordDict(),
                       run_config={})  # fmt: skip

    assert node_key(context({"node-key": "camera-3", "partition-id": 1})) == "camera-3"
    assert node_key(context({"partition-id": 4, "num-partitions": 9})) == "partition-4"
    assert node_key(context({"data-path": "/data"})) == "node-77"
    for bad in ("", "z" * 201, "tab\there"):
        with pytest.raises(ConfigError, match="node-config 'node-key' must be 1 to 200"):
            node_key(context({"node-key": bad}))


def test_sample_by_node_id_sends_no_queries_and_follows_the_ids(tiny_overrides):
    overrides = {**tiny_overrides, "sample-by": "node-id"}
    cfg = resolve_config(overrides)
    strategy, grid = build_strategy(cfg), InProcessGrid(6, overrides, node_ids=random_ids(6, 5))
    messages = list(strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), grid))
    assert grid.queries == [] and len(messages) == 3
    # the sample is the one drawn over the sorted ids: it moves with Flower's ids
    shifted = InProcessGrid(6, overrides, node_ids=[*sorted(grid.contexts)[1:], 1])
    again = strategy.configure_train(1, initial_arrays(cfg), ConfigRecord(), shifted)
    assert [partition_of(grid, m.metadata.dst_node_id) for m in messages] != [
        partition_of(shifted, m.metadata.dst_node_id) for m in again
    ]
    with pytest.raises(ConfigError, match="sample-by"):
        resolve_config({**tiny_overrides, "sample-by": "random"})
