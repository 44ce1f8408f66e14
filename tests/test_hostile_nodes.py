"""Hostile nodes: a run survives every kind of bad reply, and fails loud where it cannot go on.

Each attack goes through the whole ServerApp run (``server_app.run``) over the in-process grid
with the real ClientApp handlers: in every train round the first sampled node's reply is
replaced by a hostile one. The run must finish, reject and count that reply, and end with a
model equal bit for bit to the run in which the same node sent an error reply instead (same
node ids, same seeded sampling, same honest replies).

    .venv/bin/python -m pytest -q tests/test_hostile_nodes.py
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path

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
from flwr.superlink.grid import InMemoryGrid

from fedmae_flwr.config import resolve_config
from fedmae_flwr.models import initial_state
from fedmae_flwr.models.cascade import KEY_CONTRACT
from fedmae_flwr.node_data_report import known_largest_partition
from fedmae_flwr.run_outputs import load_checkpoint
from fedmae_flwr.server_app import build_strategy, run
from fedmae_flwr.strategies import PREFIX_KEY, PREFIX_MISSING, FedMAE
from fedmae_flwr.strategies import replies as kinds

from .conftest import TINY_FEDERATION
from .local_grid import InProcessGrid

Attack = Callable[[Message, Message], Message]  # (honest reply, message it answers) -> reply


# --- the attacks ---------------------------------------------------------------------------------
def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _metrics(reply: Message) -> MetricRecord:
    return reply.content["metrics"]


def _on_arrays(change: Callable[[np.ndarray], np.ndarray]) -> Attack:
    """Every returned tensor replaced by ``change(tensor)``, header and data alike."""

    def attack(reply: Message, _: Message) -> Message:
        arrays = reply.content["arrays"]
        for key in list(arrays):
            arrays[key] = Array(np.ascontiguousarray(change(arrays[key].numpy())))
        return reply

    return attack


def _on_first_array(change: Callable[[Array], Array]) -> Attack:
    def attack(reply: Message, _: Message) -> Message:
        arrays = reply.content["arrays"]
        key = sorted(arrays)[0]
        arrays[key] = change(arrays[key])
        return reply

    return attack


def _set_metric(key: str, value: object, bypass: bool = False) -> Attack:
    def attack(reply: Message, _: Message) -> Message:
        if bypass:  # a value Flower's own MetricRecord check refuses, as a foreign node may send
            _metrics(reply)._data[key] = value
        else:
            _metrics(reply)[key] = value  # type: ignore[assignment]
        return reply

    return attack


def _examples_without_work(reply: Message, sent: Message) -> Message:
    _metrics(reply)["num-examples"] = 1e12
    return _on_arrays(np.zeros_like)(reply, sent)


def _renamed_key(reply: Message, _: Message) -> Message:
    arrays = reply.content["arrays"]
    key = sorted(arrays)[0]
    arrays[key + ".renamed"] = arrays.pop(key)
    return reply


def _extra_arrayrecord(reply: Message, _: Message) -> Message:
    reply.content["more-arrays"] = ArrayRecord({"x": Array(np.zeros(3, np.float32))})
    return reply


def _no_metricrecord(reply: Message, _: Message) -> Message:
    del reply.content["metrics"]
    return reply


def _nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[0] = np.nan
    return a


def _lying_shape(a: Array) -> Array:
    """The header of the sent tensor over data of another shape (same dtype)."""
    data = np.zeros(2 + int(np.prod(a.shape)), np.float32)
    return Array(a.dtype, tuple(a.shape), "numpy.ndarray", _npy(data))


# kind -> (attack, the rejection kind it must be counted as)
ATTACKS: dict[str, tuple[Attack, str]] = {
    "list-train-loss": (_set_metric("train-loss", [0.5, 0.6]), kinds.METRICS),
    "list-prefix-missing": (_set_metric(PREFIX_MISSING, [1]), kinds.METRICS),
    "string-metric": (_set_metric("train-loss", "0.5", bypass=True), kinds.METRICS),
    "negative-num-examples": (_set_metric("num-examples", -5), kinds.WEIGHT),
    "missing-metricrecord": (_no_metricrecord, kinds.METRICS),
    "non-numpy-stype": (
        _on_first_array(lambda a: Array(a.dtype, tuple(a.shape), "torch.Tensor", a.data)),
        kinds.MALFORMED,
    ),
    "garbage-bytes": (
        _on_first_array(lambda a: Array(a.dtype, tuple(a.shape), "numpy.ndarray", b"\x00junk")),
        kinds.MALFORMED,
    ),
    "header-shape-not-data": (_on_first_array(_lying_shape), kinds.HEADER),
    "float64-under-float32-header": (
        _on_first_array(
            lambda a: Array(a.dtype, tuple(a.shape), "numpy.ndarray", _npy(a.numpy().astype("f8")))
        ),
        kinds.HEADER,
    ),
    "float64-model": (_on_arrays(lambda a: a.astype(np.float64)), kinds.LAYOUT),
    "values-1e30": (_on_arrays(lambda a: np.full_like(a, 1e30)), kinds.UPDATE_NORM),
    "float32-max": (
        _on_arrays(lambda a: np.full_like(a, np.finfo(np.float32).max)),
        kinds.UPDATE_NORM,
    ),
    "scaled-1e6": (_on_arrays(lambda a: a * np.float32(1e6)), kinds.UPDATE_NORM),
    "1e12-examples-zero-arrays": (_examples_without_work, kinds.EXAMPLES_CAP),
    "nan": (_on_arrays(_nan), kinds.NON_FINITE),
    "inf": (_on_arrays(lambda a: np.full_like(a, np.inf)), kinds.NON_FINITE),
    "wrong-keys": (_renamed_key, kinds.ARRAYS),
    "extra-arrayrecord": (_extra_arrayrecord, kinds.ARRAYS),
}


def _error_reply(_: Message, sent: Message) -> Message:
    return Message(Error(code=0, reason="node failed"), reply_to=sent)


# --- the runs ------------------------------------------------------------------------------------
class FirstReplyOfEachRound:
    """A ``tamper`` hook: the first train reply of each round goes through ``attack``."""

    def __init__(self, grid: InProcessGrid, attack: Attack) -> None:
        self.grid, self.attack = grid, attack
        self.rounds: dict[int, int] = {}  # round -> attacker node

    def __call__(self, reply: Message) -> Message:
        sent = self.grid.sent[-1]
        if sent.metadata.message_type != MessageType.TRAIN:
            return reply
        server_round = int(sent.content["config"]["server-round"])
        if server_round in self.rounds:
            return reply
        self.rounds[server_round] = sent.metadata.dst_node_id
        return self.attack(reply, sent)


@pytest.fixture(scope="module")
def overrides(fmnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 blocks x 2 rounds, 3 of 6 nodes per round; downstream evaluation kept minimal."""
    return {
        "data-path": str(fmnist_dir),
        "output-dir": str(tmp_path_factory.mktemp("hostile")),
        **TINY_FEDERATION,
        "eval-images": 20,
        "grid-images": 2,
        "probe-train-images": 100,
        "probe-epochs": 1,
        "finetune-labels": 0,
        "evaluate-random-init": False,
        "test-images": 50,
        "device": "cpu",
    }


def run_attacked(overrides: dict, name: str, attack: Attack) -> tuple[Path, dict[int, int]]:
    """The whole run with ``attack`` on each train round's first reply; its folder, attackers."""
    config = {**overrides, "run-name": name}
    grid = InProcessGrid(6, config)
    grid.tamper = tamper = FirstReplyOfEachRound(grid, attack)
    run(grid, resolve_config(config))
    return Path(config["output-dir"]) / name, tamper.rounds


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def comparable(row: dict) -> dict:
    """A metrics line without timings, memory and rejection kinds."""
    return {
        k: v
        for k, v in row.items()
        if not (k.startswith("rejected-") or "seconds" in k or "mbytes" in k)
    }


def final_model(folder: Path) -> dict[str, np.ndarray]:
    server_round, arrays, *_ = load_checkpoint(folder)
    assert server_round == 4
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.fixture(scope="module")
def reference(overrides: dict) -> tuple[Path, dict[int, int]]:
    """The same run, the attacked replies replaced by error replies."""
    return run_attacked(overrides, "reference", _error_reply)


def test_the_reference_run_counts_its_error_replies(reference):
    folder, attackers = reference
    assert sorted(attackers) == [1, 2, 3, 4]
    for row in rows(folder):
        assert (row["rejected"], row["rejected-error"], row["clients"]) == (1, 1, 2)


@pytest.mark.parametrize("attack_name", list(ATTACKS))
def test_a_hostile_reply_is_rejected_counted_and_changes_nothing(
    attack_name: str, overrides: dict, reference, caplog
):
    attack, kind = ATTACKS[attack_name]
    folder, attackers = run_attacked(overrides, attack_name, attack)
    ref_folder, ref_attackers = reference
    assert attackers == ref_attackers  # the same nodes, in the same rounds

    attacked_rows, ref_rows = rows(folder), rows(ref_folder)
    assert [r["round"] for r in attacked_rows] == [1, 2, 3, 4]  # the run finished
    for row in attacked_rows:
        assert (row["rejected"], row.get(f"rejected-{kind}"), row["clients"]) == (1, 1, 2), row
    assert [comparable(r) for r in attacked_rows] == [comparable(r) for r in ref_rows]

    got, want = final_model(folder), final_model(ref_folder)
    assert got.keys() == want.keys()
    for key in want:  # bit for bit, dtype included
        assert got[key].dtype == want[key].dtype and got[key].tobytes() == want[key].tobytes()
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["communication"]["rejected-replies"] == 4
    assert np.isfinite(summary["final-psnr"])

    logged = [r.getMessage() for r in caplog.records if f"rejected ({kind})" in r.getMessage()]
    assert sorted(re.findall(r"from node (\d+)", " ".join(logged))) == sorted(
        str(n) for n in attackers.values()
    )


# --- what nodes report --------------------------------------------------------------------------
FORGED = {"psnr": 99.0, "stage-end": 1, "rejected-error": 7, "aggregation-skipped": 1,
          "seconds": 1e9, "evaluation-rejected": 5}  # fmt: skip


def _forged_metrics(reply: Message, _: Message) -> Message:
    """Sound arrays, but metrics named as the server's own: one node's `psnr` made a round line
    look like a stage end; the run failed after its export, and again at every resume."""
    for key, value in FORGED.items():
        _metrics(reply)[key] = value
    return reply


def test_metrics_named_as_the_servers_own_are_left_out_and_change_nothing(overrides, caplog):
    config = {**overrides, "run-name": "forged-metrics"}
    grid = InProcessGrid(6, config)
    forging = FirstReplyOfEachRound(grid, _forged_metrics)
    failed_evaluations = []

    def tamper(reply: Message) -> Message:  # and the first evaluation reply of each stage fails
        sent = grid.sent[-1]
        stage = sent.content["config"]["stage"]
        if sent.metadata.message_type == MessageType.EVALUATE and stage not in failed_evaluations:
            failed_evaluations.append(stage)
            return _error_reply(reply, sent)
        return forging(reply)

    grid.tamper = tamper
    run(grid, resolve_config(config))
    folder = Path(config["output-dir"]) / "forged-metrics"
    clean, _ = run_attacked(overrides, "untouched", lambda reply, _: reply)

    got = rows(folder)
    assert [r["round"] for r in got] == [1, 2, 3, 4]
    for row in got:
        assert not {"rejected-error", "aggregation-skipped"} & row.keys(), row
        assert row["seconds"] < 1e9 and ("psnr" in row) == (row["round"] in (2, 4))
        assert bool(row.get("stage-end")) == (row["round"] in (2, 4))
    stages = json.loads((folder / "summary.json").read_text())["stages"]
    assert [s["stage"] for s in stages] == [0, 1]
    # One evaluating node of two failed at each stage end: counted, the other one's loss kept.
    assert [(s["evaluating-nodes"], s["evaluation-rejected"]) for s in stages] == [(1, 1)] * 2
    assert all(np.isfinite(s["node-heldout-loss"]) for s in stages)
    got_model, want = final_model(folder), final_model(clean)
    assert all(got_model[k].tobytes() == want[k].tobytes() for k in want)
    assert "are named as the server's own keys" in caplog.text
    assert "are this recorder's own keys: left out" in caplog.text


# --- fail loud ---------------------------------------------------------------------------------
def test_a_stage_without_one_sound_reply_fails_the_run(overrides: dict):
    """Every train reply of stage 1 is poisoned: no untrained block 1 is appended."""
    config = {**overrides, "run-name": "all-poisoned"}
    grid = InProcessGrid(6, config)

    def poison_stage_1(reply: Message) -> Message:
        sent = grid.sent[-1]
        if sent.metadata.message_type == MessageType.TRAIN and sent.content["config"]["stage"]:
            return ATTACKS["scaled-1e6"][0](reply, sent)
        return reply

    grid.tamper = poison_stage_1
    with pytest.raises(RuntimeError) as err:
        run(grid, resolve_config(config))
    message = str(err.value)
    assert "stage 1 (rounds 3-4) ended without one sound reply" in message
    assert "6 x update-norm (e.g. node 10" in message and "exceeds 10 x" in message
    folder = Path(config["output-dir"]) / "all-poisoned"
    assert [r["round"] for r in rows(folder)] == [1, 2, 3]
    assert not (folder / "backbone.safetensors").exists()


def _initial(cfg) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in initial_state(cfg.model, cfg.seed).items()})


def test_an_initial_model_with_unknown_keys_is_refused(overrides: dict):
    cfg = resolve_config(overrides)
    arrays = _initial(cfg)
    arrays["head.weight"] = Array(np.zeros((10, 32), np.float32))
    arrays["fc_norm.bias"] = Array(np.zeros(32, np.float32))
    with pytest.raises(ValueError) as err:
        build_strategy(cfg).start(InProcessGrid(6, overrides), arrays)
    assert "fc_norm.bias, head.weight" in str(err.value) and KEY_CONTRACT in str(err.value)


class EchoGrid(InProcessGrid):
    """Nodes that return the active tensors they got, each moved by 0.01 (no ClientApp); they
    leave key queries unanswered (ordered by node id then)."""

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            if msg.metadata.message_type == MessageType.QUERY:
                continue
            self.sent.append(msg)
            arrays = ArrayRecord(
                {k: Array(v.numpy() + np.float32(0.01)) for k, v in msg.content["arrays"].items()}
            )
            metrics = MetricRecord({"num-examples": 10})
            replies.append(
                Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)
            )
        return replies


def test_a_learned_pos_embed_trains_in_stage_0_and_is_frozen_prefix_after(overrides: dict):
    """A plain timm ViT's learned position table travels with the stem (an app of one's own:
    the project's nodes build MAE's fixed sin-cos table, so with model= start() refuses it)."""
    cfg = resolve_config({**overrides, "evaluate-clients": 0})
    arrays = _initial(cfg)
    arrays["pos_embed"] = Array(np.zeros((1, 1 + cfg.model.num_patches, 32), np.float32))
    grid = EchoGrid(6, overrides)
    with pytest.raises(ValueError, match="pos_embed: this cascade's position table is MAE's"):
        build_strategy(cfg).start(grid, arrays)
    plan = build_strategy(cfg).plan
    own = FedMAE(depth=plan.depth, rounds_per_stage=plan.rounds_per_stage,
                 new_block=plan.new_block, new_decoder=plan.new_decoder,
                 num_train_nodes=cfg.schedule.clients_per_round)  # fmt: skip
    result = own.start(grid, arrays)
    for msg in grid.sent:
        stage = int(msg.content["config"]["stage"])
        assert ("pos_embed" in msg.content["arrays"]) == (stage == 0)
        if PREFIX_KEY in msg.content:
            assert "pos_embed" in msg.content[PREFIX_KEY]
    assert any(PREFIX_KEY in m.content for m in grid.sent)
    # trained by stage 0's two rounds (+0.01 each), then frozen
    assert np.allclose(result.arrays["pos_embed"].numpy(), 0.02)
    assert result.arrays["pos_embed"].numpy().dtype == np.float32


def test_the_num_examples_cap_comes_from_partitions_only_in_simulation(overrides: dict):
    class Simulation(InMemoryGrid):
        def __init__(self) -> None:  # no SuperLink state needed to tell the kind of grid
            pass

    summary = {"max-images": 134}
    assert known_largest_partition(Simulation(), summary) == 134
    assert known_largest_partition(InProcessGrid(2, overrides), summary) == 134
    assert known_largest_partition(EchoGrid.__new__(EchoGrid), {}) is None
    deployed = type("Deployed", (), {})()  # any other grid: nodes read their own folders
    assert known_largest_partition(deployed, summary) is None  # type: ignore[arg-type]
    cfg = resolve_config(overrides)
    assert build_strategy(cfg, largest_partition=134).max_examples == 134
    assert build_strategy(cfg).max_examples is None
    capped = resolve_config({**overrides, "max-examples": 50, "max-update-norm": 0})
    strategy = build_strategy(capped, largest_partition=134)
    assert (strategy.max_examples, strategy.max_update_norm) == (50, 0)


def test_an_update_bound_of_zero_lets_a_scaled_reply_through(overrides: dict):
    """``max-update-norm=0`` turns the bound off (shown at the strategy, without the app)."""
    cfg = resolve_config({**overrides, "max-update-norm": 0})
    strategy, grid = build_strategy(cfg), InProcessGrid(6, overrides)
    messages = list(strategy.configure_train(1, _initial(cfg), ConfigRecord(), grid))
    honest = grid.send_and_receive(messages[:1])
    scaled = ATTACKS["scaled-1e6"][0](honest[0], messages[0])
    _, record = strategy.aggregate_train(1, [scaled])
    assert (record["clients"], record["rejected"]) == (1, 0)
