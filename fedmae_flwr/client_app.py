"""ClientApp: a node trains the active block on its own images and scores reconstructions.

The frozen prefix (stem + finished blocks) arrives once per stage and is kept in the node's
``Context.state``; every round only the active tensors travel (see ``fedmae_flwr.strategies``).
"""

from __future__ import annotations

import functools
from logging import WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from fedmae_flwr.config import FedMAEConfig, resolve_config
from fedmae_flwr.data import NodeData, load_node_data
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.local_training import reconstruction_loss, train_local
from fedmae_flwr.models.cascade import CascadeMAE, model_from_state
from fedmae_flwr.seeding import derive_seed
from fedmae_flwr.strategies import PREFIX_KEY, PREFIX_MISSING

STATE_PREFIX = "fedmae-prefix"
STATE_PREFIX_META = "fedmae-prefix-meta"


@functools.cache
def _config(run_config_items: tuple) -> FedMAEConfig:
    return resolve_config(dict(run_config_items))


def node_config(context: Context, overrides: dict | None = None) -> FedMAEConfig:
    """The run's config (Flower run-config, then ``overrides``), resolved once per process."""
    return _config(tuple(sorted({**context.run_config, **(overrides or {})}.items())))


def node_data(context: Context, cfg: FedMAEConfig) -> NodeData:
    """The node's images: its own folder on a deployed SuperNode (node-config ``data-path``),
    else its partition of the run's source (simulation: ``partition-id`` of ``num-partitions``)."""
    own_folder = str(context.node_config.get("data-path", ""))
    if own_folder:
        return load_node_data(cfg, 0, 1, node_data_path=own_folder)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    return load_node_data(cfg, partition_id, num_partitions)


def model_for(msg: Message, context: Context, cfg: FedMAEConfig) -> CascadeMAE | None:
    """The stage's model from the message's active tensors and the node's cached prefix.

    Returns None when the node does not hold the announced prefix version (and none came along).
    """
    config = msg.content["config"]
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
    return model_from_state(cfg.model, state, frozen_blocks=frozen)


def _missing_prefix_reply(msg: Message) -> Message:
    metrics = MetricRecord({"num-examples": 0, PREFIX_MISSING: 1})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _seed(cfg: FedMAEConfig, msg: Message, context: Context) -> int:
    server_round = int(msg.content["config"]["server-round"])
    # The partition id is stable across runs (node ids are random per simulation run).
    node = int(context.node_config.get("partition-id", context.node_id))
    return derive_seed(cfg.seed, "client-train", server_round, node)


def train(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """Local MAE epochs on the active block; replies with only the trained tensors."""
    cfg = node_config(context, overrides)
    torch.set_num_threads(cfg.train.client_threads)
    model = model_for(msg, context, cfg)
    if model is None:
        return _missing_prefix_reply(msg)
    model.to(resolve_device(cfg.device))
    data = node_data(context, cfg)
    images = data.splits.normalize(data.train.images)
    if len(images) == 0:
        log(WARNING, "Node %s has no training images: replying with 0 examples",
            context.node_config.get("partition-id"))  # fmt: skip
        result = None
    else:
        result = train_local(model, images, cfg.train, _seed(cfg, msg, context))
    arrays = ArrayRecord({k: v.detach().contiguous() for k, v in model.active_state().items()})
    metrics = MetricRecord(
        {
            "num-examples": len(images),
            "train-loss": result.loss if result else 0.0,
            "train-seconds": result.seconds if result else 0.0,
            "skipped-images": data.splits.skipped,
            "train-mbytes": result.peak_bytes / 2**20 if result else 0.0,
        }
    )
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """Masked-reconstruction loss of the stage's model on the node's held-out images."""
    cfg = node_config(context, overrides)
    torch.set_num_threads(cfg.train.client_threads)
    model = model_for(msg, context, cfg)
    if model is None:
        return _missing_prefix_reply(msg)
    model.to(resolve_device(cfg.device))
    data = node_data(context, cfg)
    images = data.splits.normalize(data.heldout.images)
    # The same masks every time a node scores, so losses compare across stages.
    loss = reconstruction_loss(model, images, seed=cfg.seed) if len(images) else 0.0
    metrics = MetricRecord({"num-examples": len(images), "eval-loss": loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def build_client_app(overrides: dict | None = None) -> ClientApp:
    """The ClientApp; ``overrides`` (kebab-case run-config) win over the run-config, which is how
    Python callers such as ``flwr.simulation.run_simulation`` (empty run-config) set a config."""
    client_app = ClientApp()

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, overrides)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate(msg, context, overrides)

    return client_app


app = build_client_app()
