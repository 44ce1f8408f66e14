"""A Flower app of a user's own (examples/plugin_app.py) on the public plugin surface only.

Its own ViT shapes and synthetic images, no project run config or data loaders: FedMAE on the
server, ``fedmae_flwr.client`` helpers on the nodes, ``export_backbone`` of ``Result.arrays``. The
README shows the same file (checked below).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import timm
import torch
from flwr.app import ArrayRecord, Context, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedmae_flwr.client import evaluate_reply, train_reply
from fedmae_flwr.config import ConfigError
from fedmae_flwr.models import (
    CascadeMAE,
    active_key,
    export_backbone,
    fresh_block_state,
    initial_state,
    load_backbone,
)
from fedmae_flwr.strategies import PREFIX_MISSING, FedMAE
from fedmae_flwr.strategies.fedmae import MODEL_CONFIG

from .test_client_app import message

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugin_app.py"
README_SECTION = "## Use the strategy in another Flower project"


@pytest.fixture
def app(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """examples/plugin_app.py, importable here and (Flower passes sys.path on) in Ray workers."""
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    return importlib.import_module(EXAMPLE.stem)


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> Context:
    """Node 3 of a simulation, and the process identity a reply takes its sender from."""
    for name in ("run_id", "node_id", "task_id"):
        monkeypatch.setattr(TaskIdentity, f"_{name}", 1)
    return Context(run_id=1, node_id=103, node_config={"partition-id": 3, "num-partitions": 4},
                   state=RecordDict(), run_config={})  # fmt: skip


def test_the_readme_shows_the_example_app_verbatim():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index(README_SECTION) :]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None and code.group(1) == EXAMPLE.read_text(), (
        f"README's '{README_SECTION}' must show {EXAMPLE.relative_to(ROOT)} as it is"
    )
    assert len(EXAMPLE.read_text().splitlines()) <= 60


def test_the_helpers_answer_the_protocol_with_the_apps_own_shapes(app, node):
    model = CascadeMAE(app.VIT, num_blocks=2)
    reply = app.train(message(model, 1, "v1", with_prefix=True), node)
    assert set(reply.content["arrays"]) == {k for k in model.state_dict() if active_key(k, 1)}
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 64 and metrics["train-loss"] > 0
    # the prefix stays in Context.state for the rest of the stage ...
    again = app.train(message(model, 1, "v1", with_prefix=False), node)
    assert again.content["metrics"]["num-examples"] == 64
    # ... an unknown version is reported missing, for the server to send it again
    missing = app.train(message(model, 1, "v2", with_prefix=False), node).content["metrics"]
    assert (missing[PREFIX_MISSING], missing["num-examples"]) == (1, 0)

    msg = message(model, 1, "v1", with_prefix=False, kind=MessageType.EVALUATE)
    first, second = (app.evaluate(msg, node).content["metrics"] for _ in range(2))
    assert first["num-examples"] == 16
    assert first["eval-loss"] == second["eval-loss"] > 0  # seeded masks


def test_shapes_as_a_mapping_and_clear_errors(app, node):
    model = CascadeMAE(app.VIT, num_blocks=1)
    images = app.node_images(node)[:8]
    kebab = {k.replace("_", "-"): v for k, v in dataclasses.asdict(app.VIT).items()}
    reply = train_reply(message(model, 0, "", False), node, images, model=kebab, train={})
    assert reply.content["metrics"]["num-examples"] == 8
    with pytest.raises(ValueError, match=r"images must be \[N, 3, 16, 16\].*got \[8, 1, 28, 28\]"):
        train_reply(message(model, 0, "", False), node, torch.zeros(8, 1, 28, 28), model=app.VIT)
    # float64 pixels (numpy's / 255.) failed deep in the first layer: cast; uint8 is refused
    as_double = train_reply(message(model, 0, "", False), node, images.double(), model=app.VIT)
    assert as_double.content["metrics"]["num-examples"] == 8
    with pytest.raises(ValueError, match=r"images must be a float tensor .*got torch.uint8"):
        evaluate_reply(message(model, 0, "", False, kind=MessageType.EVALUATE), node,
                       images.to(torch.uint8), model=app.VIT)  # fmt: skip
    none = torch.empty(0, 3, 16, 16, dtype=torch.uint8)  # no images: any dtype, 0 examples
    reply = train_reply(message(model, 0, "", False), node, none, model=app.VIT)
    assert reply.content["metrics"]["num-examples"] == 0
    with pytest.raises(ConfigError, match="Unknown TrainConfig fields \\['epochs'\\]"):
        train_reply(message(model, 0, "", False), node, images, model=app.VIT, train={"epochs": 2})
    with pytest.raises(ValueError, match=r"finite numbers, one per key, got \{'loss-per-epoch'"):
        train_reply(message(model, 0, "", False), node, images, model=app.VIT,
                    metrics={"loss-per-epoch": [0.5, 0.4]})  # fmt: skip
    with pytest.raises(ValueError, match="own keys \\['num-examples'\\]"):
        train_reply(message(model, 0, "", False), node, images, model=app.VIT,
                    metrics={"num-examples": 1})  # fmt: skip


def test_a_node_with_another_model_config_refuses_naming_the_fields(app, node):
    """Heads, image size or mask ratio change no tensor shape: nodes trained a 6-head model
    that the server exported as 3-head, with no rejection."""
    msg = message(CascadeMAE(app.VIT, num_blocks=1), 0, "", False)
    msg.content["config"][MODEL_CONFIG] = json.dumps(dataclasses.asdict(app.VIT))
    images = app.node_images(node)[:8]
    assert train_reply(msg, node, images, model=app.VIT).content["metrics"]["num-examples"] == 8
    other = dataclasses.replace(app.VIT, num_heads=6, mask_ratio=0.5)
    expected = (r"\[fedmae:node-unusable\] Node 103: its ModelConfig differs from the server's "
                r"in num_heads 3 \(this node: 6\), mask_ratio 0.75 \(this node: 0.5\)")  # fmt: skip
    with pytest.raises(ConfigError, match=expected):
        train_reply(msg, node, images, model=other)
    msg.metadata.message_type = MessageType.EVALUATE
    with pytest.raises(ConfigError, match=expected):
        evaluate_reply(msg, node, images, model=other)


def test_an_array_record_exports_like_the_state_dict(app, tmp_path):
    model = CascadeMAE(app.VIT, num_blocks=2).eval()
    export_backbone(app.VIT, model.state_dict(), tmp_path / "torch")
    export_backbone(app.VIT, ArrayRecord(model.state_dict()), tmp_path / "record")
    ours, theirs = (load_file(tmp_path / f / "backbone.safetensors") for f in ("torch", "record"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = load_backbone(tmp_path / "record")(x)
        assert torch.allclose(features, model.forward_features(x)[:, 1:].mean(1), atol=1e-6)


@pytest.mark.slow
def test_the_app_pretrains_in_a_flower_simulation(app, tmp_path, monkeypatch):
    from flwr.simulation import run_simulation

    results = []

    class RecordingFedMAE(FedMAE):
        def start(self, *args, **kwargs):
            results.append(super().start(*args, **kwargs))
            return results[-1]

    monkeypatch.setattr(app, "FedMAE", RecordingFedMAE)
    monkeypatch.setattr(app, "BACKBONE_DIR", str(tmp_path / "backbone"))
    run_simulation(
        server_app=app.server,
        client_app=app.client,
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
    )
    rounds = results[0].train_metrics_clientapp
    assert sorted(rounds) == [1, 2, 3, 4]
    assert all(r["clients"] == 3 and r["rejected"] == 0 for r in rounds.values())
    assert 1 <= rounds[3]["prefix-sends"] <= 3 and rounds[4]["prefix-missing"] == 0
    scores = results[0].evaluate_metrics_clientapp  # evaluate_reply at each stage end
    assert sorted(scores) == [2, 4] and all(m["eval-loss"] > 0 for m in scores.values())

    meta = json.loads((tmp_path / "backbone" / "backbone.json").read_text())
    backbone = timm.create_model(meta["model_name"], pretrained=False, **meta["kwargs"])
    weights = load_file(tmp_path / "backbone" / "backbone.safetensors")
    backbone.load_state_dict(weights, strict=True)
    assert len(backbone.blocks) == 2 and backbone.num_features == 48
    with torch.no_grad():
        assert backbone.eval()(torch.randn(2, 3, 16, 16)).shape == (2, 48)
    # Both stages took the nodes' replies: the stem (stage 0) and block 1 (stage 1, which needs
    # the prefix on the nodes) moved away from their initial values.
    stem = initial_state(app.VIT, seed=0)["patch_embed.proj.weight"]
    block_1 = fresh_block_state(app.VIT, 1, seed=1)["blocks.1.attn.qkv.weight"]
    assert not torch.allclose(weights["patch_embed.proj.weight"], stem)
    assert not torch.allclose(weights["blocks.1.attn.qkv.weight"], block_1)
