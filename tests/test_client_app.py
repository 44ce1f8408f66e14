"""ClientApp handlers called directly with real Flower Messages and Contexts."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedmae_flwr import client_app
from fedmae_flwr.config import resolve_config
from fedmae_flwr.models import CascadeMAE, active_key, prefix_key
from fedmae_flwr.strategies import PREFIX_KEY, PREFIX_MISSING

from .conftest import LocalGrid


def message(model: CascadeMAE, stage: int, version: str, with_prefix: bool, kind=MessageType.TRAIN):
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v for k, v in state.items() if active_key(k, stage)}),
            "config": ConfigRecord(
                {
                    "server-round": 1,
                    "stage": stage,
                    "frozen-blocks": stage,
                    "prefix-version": version,
                }
            ),
        }
    )
    if with_prefix:
        content[PREFIX_KEY] = ArrayRecord({k: v for k, v in state.items() if prefix_key(k, stage)})
    return Message(content=content, message_type=kind, dst_node_id=1000)


def test_train_replies_with_the_active_tensors_only(tiny_overrides):
    grid = LocalGrid(4, tiny_overrides)  # sets the process' task identity and node contexts
    context = grid.contexts[1000]
    cfg = resolve_config(tiny_overrides)
    model = CascadeMAE(cfg.model, num_blocks=2)
    reply = client_app.train(message(model, 1, "v1", with_prefix=True), context, tiny_overrides)
    arrays = reply.content["arrays"]
    assert set(arrays) == {k for k in model.state_dict() if active_key(k, 1)}
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 180  # 800 / 4 nodes, 10 % held out
    assert metrics["train-loss"] > 0 and metrics["train-seconds"] > 0
    # the prefix is kept for later rounds of the stage ...
    again = client_app.train(message(model, 1, "v1", with_prefix=False), context, tiny_overrides)
    assert again.content["metrics"]["num-examples"] == 180
    # ... but a new version it does not hold is reported missing, not guessed
    missing = client_app.train(message(model, 1, "v2", with_prefix=False), context, tiny_overrides)
    assert missing.content["metrics"][PREFIX_MISSING] == 1
    assert missing.content["metrics"]["num-examples"] == 0


def test_train_with_mae_augmentations(tiny_overrides):
    overrides = {**tiny_overrides, "crop-scale-min": 0.2, "horizontal-flip": True}
    context = LocalGrid(4, overrides).contexts[1001]
    model = CascadeMAE(resolve_config(overrides).model, num_blocks=1)
    reply = client_app.train(message(model, 0, "", with_prefix=False), context, overrides)
    assert reply.content["metrics"]["train-loss"] > 0


def test_evaluate_scores_the_heldout_split(tiny_overrides):
    context = LocalGrid(4, tiny_overrides).contexts[1002]
    model = CascadeMAE(resolve_config(tiny_overrides).model, num_blocks=1)
    msg = message(model, 0, "", with_prefix=False, kind=MessageType.EVALUATE)
    first = client_app.evaluate(msg, context, tiny_overrides).content["metrics"]
    second = client_app.evaluate(msg, context, tiny_overrides).content["metrics"]
    assert first["num-examples"] == 20
    assert first["eval-loss"] == second["eval-loss"] > 0  # seeded masks: comparable scores


def test_deployed_node_reads_only_its_own_folder(tmp_path, tiny_overrides):
    """A SuperNode started with --node-config "data-path=..." trains on that folder alone."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "own" / cls).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "own" / cls / f"{i}.png")
    (tmp_path / "own" / "cats" / "broken.png").write_bytes(b"")  # skipped, counted
    overrides = {**tiny_overrides, "dataset": "imagefolder", "data-path": "/not/this/one"}
    LocalGrid(1, overrides)  # the process' task identity, as in a ServerApp
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(tmp_path / "own")},
        state=RecordDict(),
        run_config={},
    )
    model = CascadeMAE(resolve_config(overrides).model, num_blocks=1)
    reply = client_app.train(message(model, 0, "", with_prefix=False), context, overrides)
    metrics = reply.content["metrics"]
    # 21 files, the broken one skipped: a device's folder is all its own (the source's test
    # split too, which was thrown away before), 2 of the 20 held out -> 18 to train on
    assert metrics["num-examples"] == 18
    assert metrics["skipped-images"] == 1


def test_a_node_config_key_fedmae_does_not_read_is_named(tiny_overrides, caplog, tmp_path):
    """A misspelled node_key left the device sampled by its node id, without a word."""
    context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={}, node_config={
        "partition-id": 0, "num-partitions": 6, "node_key": "pi-1",
        "cache-dir": str(tmp_path / "cache")})  # fmt: skip
    client_app.node_data(context, resolve_config(tiny_overrides))
    assert "node-config 'node_key': not read by FedMAE, which reads cache-dir, data-path" in (
        caplog.text
    )
    # A deployed node's next message (a process of its own) does not say it again each round ...
    caplog.clear()
    client_app.node_data(context, resolve_config(tiny_overrides))
    assert "not read by FedMAE" not in caplog.text
    # ... unless it keeps no cache to remember it in
    context.node_config["cache-dir"] = "off"
    for _ in range(2):
        client_app.node_data(context, resolve_config(tiny_overrides))
    assert caplog.text.count("not read by FedMAE") == 2


def test_a_node_with_an_empty_partition_replies_with_zero_examples(tiny_overrides):
    # Dirichlet(0.01) over 60 nodes leaves partition 0 of the synthetic set empty (seed 0).
    overrides = {**tiny_overrides, "partitioner": "dirichlet", "dirichlet-alpha": 0.01}
    grid = LocalGrid(60, overrides)
    model = CascadeMAE(resolve_config(overrides).model, num_blocks=1)
    reply = client_app.train(
        message(model, 0, "", with_prefix=False), grid.contexts[1000], overrides
    )
    assert reply.content["metrics"]["num-examples"] == 0
    assert set(reply.content["arrays"]) == {k for k in model.state_dict() if active_key(k, 0)}


def test_a_run_config_value_reaches_the_optimizer(tiny_overrides, monkeypatch):
    """--run-config lr -> cfg.train.lr (resolve_config) -> train_local -> AdamW: three hops."""
    import torch

    seen = []
    real_adamw = torch.optim.AdamW

    def recording_adamw(params, **kwargs):
        optimizer = real_adamw(params, **kwargs)
        seen.append([(group["lr"], group["weight_decay"]) for group in optimizer.param_groups])
        return optimizer

    monkeypatch.setattr(torch.optim, "AdamW", recording_adamw)
    overrides = {**tiny_overrides, "lr": 0.0123, "weight-decay": 0.07}
    context = LocalGrid(4, overrides).contexts[1002]
    model = CascadeMAE(resolve_config(overrides).model, num_blocks=1)
    client_app.train(message(model, 0, "", with_prefix=False), context, overrides)
    # MAE's grouping: biases and norms without weight decay, the rest with the configured one.
    assert sorted(seen[0]) == [(0.0123, 0.0), (0.0123, 0.07)]
