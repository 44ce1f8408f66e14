"""ClientApp: a node trains the active block on its own images and scores reconstructions.

The run config is resolved here and the node's images loaded; answering the strategy's messages
(the frozen prefix kept in ``Context.state``, only the active tensors travelling back) is
:mod:`fedmae_flwr.client`, the helper any Flower ClientApp can call.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmae_flwr.client import evaluate_reply, train_reply
from fedmae_flwr.config import FedMAEConfig, resolve_config
from fedmae_flwr.data import NodeData, load_node_data


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


def train(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """Local MAE epochs on the active block; replies with only the trained tensors."""
    cfg = node_config(context, overrides)
    torch.set_num_threads(cfg.train.client_threads)
    data = node_data(context, cfg)
    return train_reply(
        msg,
        context,
        data.splits.normalize(data.train.images),
        model=cfg.model,
        train=cfg.train,
        seed=cfg.seed,
        device=cfg.device,
        metrics={"skipped-images": data.splits.skipped},
    )


def evaluate(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """Masked-reconstruction loss of the stage's model on the node's held-out images."""
    cfg = node_config(context, overrides)
    torch.set_num_threads(cfg.train.client_threads)
    data = node_data(context, cfg)
    images = data.splits.normalize(data.heldout.images)
    return evaluate_reply(msg, context, images, model=cfg.model, seed=cfg.seed, device=cfg.device)


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
