"""FedMAE for any Flower ClientApp: answer the strategy's messages with the node's own images.

A ClientApp joins a :class:`fedmae_flwr.strategies.FedMAE` run with its images and the model's
shapes, and no run config::

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(msg, context, images, model=ModelConfig(...), seed=0)

The helpers speak the protocol documented in :mod:`fedmae_flwr.strategies.fedmae`: they rebuild
the stage's model from the message's active tensors and the frozen prefix the node keeps in its
``Context.state`` (it arrives once per stage), reply ``prefix-missing`` when the node lacks the
announced prefix, and send back only the trained tensors with ``num-examples``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import log
from torch import Tensor

from fedmae_flwr.config import ConfigError, ModelConfig, TrainConfig, as_section
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.local_training import reconstruction_loss, train_local
from fedmae_flwr.models.cascade import CascadeMAE, model_from_state
from fedmae_flwr.seeding import derive_seed
from fedmae_flwr.strategies import NODE_UNUSABLE, PREFIX_KEY, PREFIX_MISSING
from fedmae_flwr.strategies.fedmae import MODEL_CONFIG
from fedmae_flwr.strategies.node_keys import MAX_KEY_CHARS, NODE_KEY, fallback_key
from fedmae_flwr.strategies.replies import finite_number

# Where a node keeps the stage's frozen prefix between rounds (Flower persists Context.state).
STATE_PREFIX = "fedmae-prefix"
STATE_PREFIX_META = "fedmae-prefix-meta"


def train_reply(
    msg: Message,
    context: Context,
    images: Tensor,
    *,
    model: ModelConfig | Mapping[str, Any],
    train: TrainConfig | Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str | torch.device = "auto",
    metrics: Mapping[str, int | float] | None = None,
) -> Message:
    """The reply to a FedMAE ``train`` message: local MAE epochs on the stage's active block.

    Args:
        msg, context: what Flower hands the ClientApp's ``@app.train()`` handler.
        images: the node's training images ``[N, C, H, W]``, float, normalised as you like (the
            MAE target is these values); they may stay on the CPU. ``N = 0`` replies with
            ``num-examples = 0`` and the tensors as received.
        model: the shapes the server's model has (``ModelConfig`` or its fields as a mapping).
        train: local epochs, batch size, AdamW and augmentations (default ``TrainConfig()``).
            ``client_threads`` is not applied: torch's thread count belongs to the process.
        seed: the run's seed; masks and batch order are drawn from ``(seed, round, node)``,
            the node being ``node_config["partition-id"]`` where set, else the node id.
        device: ``"auto"`` (CUDA when this process sees one), ``"cpu"``, ``"cuda"`` or a
            ``torch.device``.
        metrics: more entries for the reply's MetricRecord (e.g. your data's counts): finite
            numbers (the server rejects lists, which Flower allows), averaged over the nodes
            that report them.

    Returns:
        ``"arrays"`` (the trained active tensors) and ``"metrics"`` (``num-examples``,
        ``train-loss``, ``train-seconds``, ``train-mbytes``, then ``metrics``); or only
        ``prefix-missing = 1`` and ``num-examples = 0`` when the node lacks the stage's prefix.
    """
    shapes, settings = as_section(ModelConfig, model), as_section(TrainConfig, train or {})
    images = _checked_images(images, shapes)
    net = _stage_model(msg, context, shapes)
    if net is None:
        return _missing_prefix_reply(msg)
    net.to(_device(device))
    if len(images) == 0:
        log(WARNING, "Node %s has no training images: replying with 0 examples", _node(context))
        loss, seconds, mbytes = 0.0, 0.0, 0.0
    else:
        round_seed = derive_seed(seed, "client-train", _server_round(msg), _node(context))
        mu = float(msg.content["config"].get("proximal-mu", 0.0))  # aggregator=FedProx(...)
        if not mu >= 0:
            raise ValueError(f"proximal-mu must be a number >= 0, got {mu}")
        result = train_local(net, images, settings, round_seed, proximal_mu=mu)
        loss, seconds, mbytes = result.loss, result.seconds, result.peak_bytes / 2**20
    arrays = ArrayRecord({k: v.detach().contiguous() for k, v in net.active_state().items()})
    own = {"num-examples": len(images), "train-loss": loss, "train-seconds": seconds,
           "train-mbytes": mbytes}  # fmt: skip
    if clash := sorted(own.keys() & dict(metrics or {}).keys()):
        raise ValueError(f"metrics may not set the reply's own keys {clash}")
    if odd := {k: v for k, v in (metrics or {}).items() if not finite_number(v)}:
        # Flower allows lists; the server rejects a reply holding one (every reply, every round)
        raise ValueError(f"metrics must be finite numbers, one per key, got {odd!r:.200}")
    record = MetricRecord({**own, **(metrics or {})})
    return Message(RecordDict({"arrays": arrays, "metrics": record}), reply_to=msg)


def evaluate_reply(
    msg: Message,
    context: Context,
    images: Tensor,
    *,
    model: ModelConfig | Mapping[str, Any],
    seed: int = 0,
    device: str | torch.device = "auto",
) -> Message:
    """The reply to a FedMAE ``evaluate`` message: masked-reconstruction loss on ``images``.

    Masks come from ``seed`` alone, so a node's scores compare across stages. Arguments as
    :func:`train_reply`; the reply's ``"metrics"`` hold ``num-examples`` and ``eval-loss`` (or
    ``prefix-missing = 1``).
    """
    shapes = as_section(ModelConfig, model)
    images = _checked_images(images, shapes)
    net = _stage_model(msg, context, shapes)
    if net is None:
        return _missing_prefix_reply(msg)
    net.to(_device(device))
    loss = reconstruction_loss(net, images, seed=seed) if len(images) else 0.0
    metrics = MetricRecord({"num-examples": len(images), "eval-loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def node_key(context: Context) -> str:
    """The name this node goes by in every run: node-config ``node-key`` if set, else
    ``partition-<id>`` (a simulation's partition), else its Flower node id.

    Raises:
        ConfigError: a ``node-key`` that is empty, longer than 200 characters or unprintable.
    """
    node = context.node_config
    if "node-key" in node:
        key = str(node["node-key"])
        if not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable():
            raise ConfigError(
                f"node-config 'node-key' must be 1 to {MAX_KEY_CHARS} printable characters, "
                f"got {key!r}"
            )
        return key
    if "partition-id" in node:
        return f"partition-{node['partition-id']}"
    return fallback_key(context.node_id)


def identify_reply(msg: Message, context: Context) -> Message:
    """The reply to the strategy's ``query`` for this node's key (:func:`node_key`).

    The strategy orders nodes by these keys to sample them, so a seed samples the same data in
    every run although Flower's node ids change (:mod:`fedmae_flwr.strategies.node_keys`). Cheap:
    it loads no data and no model.
    """
    content = RecordDict({"config": ConfigRecord({NODE_KEY: node_key(context)})})
    return Message(content, reply_to=msg)


def _stage_model(msg: Message, context: Context, shapes: ModelConfig) -> CascadeMAE | None:
    """The stage's model from the message's active tensors and the node's cached prefix.

    None when the node does not hold the announced prefix version (and none came along).
    """
    config = msg.content["config"]
    _check_same_model(config, shapes, context)
    frozen, version = int(config["frozen-blocks"]), str(config["prefix-version"])
    state = msg.content["arrays"].to_torch_state_dict()
    if frozen > 0:
        if PREFIX_KEY in msg.content:
            context.state[STATE_PREFIX] = msg.content[PREFIX_KEY]
            context.state[STATE_PREFIX_META] = ConfigRecord({"version": version})
        meta = context.state.get(STATE_PREFIX_META)
        if meta is None or meta["version"] != version:
            return None
        state.update(context.state[STATE_PREFIX].to_torch_state_dict())
    return model_from_state(shapes, state, frozen_blocks=frozen)


def _check_same_model(config: ConfigRecord, shapes: ModelConfig, context: Context) -> None:
    """ConfigError (node-unusable) naming the fields where this node's ``ModelConfig`` differs
    from the server's (sent as ``model-config`` when the strategy has one): heads, image size or
    mask ratio change no tensor shape, so the nodes would train another model than the one the
    server exports."""
    if MODEL_CONFIG not in config:
        return
    server, ours = json.loads(str(config[MODEL_CONFIG])), dataclasses.asdict(shapes)
    if differ := [f"{k} {server[k]!r} (this node: {ours.get(k)!r})"
                  for k in server if server[k] != ours.get(k)]:  # fmt: skip
        raise ConfigError(
            f"{NODE_UNUSABLE} Node {context.node_id}: its ModelConfig differs from the server's "
            f"in {', '.join(differ)}. Pass the server's ModelConfig as model= to train_reply / "
            "evaluate_reply"
        )


def _missing_prefix_reply(msg: Message) -> Message:
    metrics = MetricRecord({"num-examples": 0, PREFIX_MISSING: 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _checked_images(images: Tensor, shapes: ModelConfig) -> Tensor:
    """``images`` in the model's float32, or ValueError naming what is wrong: a shape other
    than ``[N, in_chans, img_size, img_size]``, or no float tensor (uint8 pixels would reach
    the model unnormalised; float64 ones failed deep in the first layer)."""
    expected = (shapes.in_chans, shapes.img_size, shapes.img_size)
    if len(images) and (images.ndim != 4 or tuple(images.shape[1:]) != expected):
        raise ValueError(
            f"images must be [N, {', '.join(map(str, expected))}] for this model "
            f"(in_chans, img_size, img_size), got {list(images.shape)}"
        )
    if len(images) and not images.is_floating_point():
        raise ValueError(
            f"images must be a float tensor of normalised pixels, got {images.dtype} (for "
            "uint8 pixels: images.float() / 255, then normalise)"
        )
    return images.float()


def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(str(device))


def _server_round(msg: Message) -> int:
    return int(msg.content["config"]["server-round"])


def _node(context: Context) -> int:
    # The partition id is stable across runs (node ids are random per simulation run).
    return int(context.node_config.get("partition-id", context.node_id))


__all__ = ["evaluate_reply", "identify_reply", "node_key", "train_reply"]
