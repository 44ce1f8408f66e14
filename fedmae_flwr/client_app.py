"""ClientApp: a node trains the active block on its own images and scores reconstructions.

The run config is resolved here and the node's images loaded; answering the strategy's messages
(the frozen prefix kept in ``Context.state``, only the active tensors travelling back) is
:mod:`fedmae_flwr.client`, the helper any Flower ClientApp can call.

A deployed SuperNode starts a fresh process for every message, so this module's import path is
kept light (torch, timm, flwr and this package; no matplotlib, pandas, pyarrow, datasets or
flwr-datasets unless the node has to partition a shared source or read a Hugging Face one), and
the node's decoded images are kept on disk (node-config ``cache-dir``,
:mod:`fedmae_flwr.data.node_cache`). Measured in docs/client-overhead.md;
``tests/test_light_client.py`` checks both.

Node-config keys (``flower-supernode --node-config "..."``; a simulation sets the partition):

- ``data-path``: the folder of this device's own images (class sub-folders or flat); or
- ``partition-id`` and ``num-partitions``: this node's share of the run's ``data-path``;
- ``cache-dir`` (optional): where its decoded images are kept (default
  ``~/.cache/fedmae-flwr/node-data``, or ``$FEDMAE_CACHE_DIR``; ``off`` disables);
- ``node-key`` (optional): the name the server samples this device by (default
  ``partition-<id>``, else its node id); give each device its own for runs that sample the same
  devices at the same seed whatever ids the SuperLink hands out.
"""

from __future__ import annotations

import gc

# A deployed SuperNode's process imports torch, timm and Flower, answers one message and exits.
# Python's cyclic garbage collector would walk the ~400,000 objects these imports create over
# and over while they are being imported (~0.7 s on the project's 2-core machines) and once more
# at exit (~0.9 s), although they live exactly as long as the process. So collection is paused
# while this module's imports run, and what exists then is frozen (gc.freeze: left out of every
# later collection, exit included); messages, models and images made afterwards are collected as
# usual. docs/client-overhead.md measures it.
_GC_WAS_ENABLED = gc.isenabled()
gc.disable()
try:
    import functools
    from logging import WARNING
    from pathlib import Path

    import torch
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp
    from flwr.common import log

    from fedmae_flwr.client import evaluate_reply, identify_reply, train_reply
    from fedmae_flwr.config import ConfigError, FedMAEConfig, resolve_config
    from fedmae_flwr.data import NodeData, load_node_data
    from fedmae_flwr.data.node_cache import resolve_cache_dir
    from fedmae_flwr.strategies.replies import NODE_UNUSABLE
finally:
    gc.freeze()
    if _GC_WAS_ENABLED:
        gc.enable()

# What a node's --node-config may set (a simulation sets partition-id and num-partitions).
NODE_CONFIG_KEYS = frozenset(
    {"data-path", "partition-id", "num-partitions", "cache-dir", "node-key"}
)
NODE_CONFIG_HELP = (
    "Start the SuperNode with --node-config \"data-path='/folder/of/its/images'\" (a device's "
    'own images: class sub-folders or a flat folder) or --node-config "partition-id=0 '
    "num-partitions=10\" (its share of the run's data-path, as a simulation sets); optional: "
    "cache-dir='/folder' for its decoded images (default ~/.cache/fedmae-flwr/node-data, "
    "'off' disables), node-key='name' (how the server samples it, the same in every run)."
)


@functools.cache
def _config(run_config_items: tuple) -> FedMAEConfig:
    return resolve_config(dict(run_config_items))


def node_config(context: Context, overrides: dict | None = None) -> FedMAEConfig:
    """The run's config (Flower run-config, then ``overrides``), resolved once per process."""
    return _config(tuple(sorted({**context.run_config, **(overrides or {})}.items())))


def node_data(context: Context, cfg: FedMAEConfig) -> NodeData:
    """The node's images: its own folder on a deployed SuperNode (node-config ``data-path``),
    else its partition of the run's source (simulation: ``partition-id`` of ``num-partitions``);
    kept on disk under node-config ``cache-dir`` for the next message's process.

    Raises:
        NodeUnusable: the node-config has neither, a value that is no whole number or out of
            range, or its folder is missing or holds no decodable image; the message names what
            is wrong and what is allowed. Flower sends it back as the node's Error reply; the
            server rejects it, logs it and samples the node no more in this run.
    """
    node = context.node_config
    cache_dir = resolve_cache_dir(str(node.get("cache-dir", "")))
    unread = sorted(set(node) - NODE_CONFIG_KEYS)  # a misspelled key did nothing, silently
    if unread and _first_time(cache_dir, f"node-config-{context.run_id}-{context.node_id}"):
        log(WARNING, "node-config %s: not read by FedMAE, which reads %s",
            ", ".join(repr(k) for k in unread), ", ".join(sorted(NODE_CONFIG_KEYS)))  # fmt: skip
    try:
        own_folder = str(node.get("data-path", ""))
        if own_folder:
            return load_node_data(cfg, 0, 1, node_data_path=own_folder, cache_dir=cache_dir)
        partition_id, num_partitions = _partition(context)
        return load_node_data(cfg, partition_id, num_partitions, cache_dir=cache_dir)
    except (ConfigError, OSError, ValueError) as err:  # the node's own setup, not the run's
        raise NodeUnusable(f"{NODE_UNUSABLE} Node {context.node_id}: {err}") from err


def _first_time(cache_dir: Path | None, event: str) -> bool:
    """Whether ``event`` happens for the first time on this node: a deployed SuperNode starts a
    process per message, so a warning said in each would repeat every round. Remembered as an
    empty file in the node cache (no cache: every time)."""
    if cache_dir is None:
        return True
    marker = cache_dir / "said" / event
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch(exist_ok=False)
    except FileExistsError:
        return False
    except OSError:  # an unwritable cache: say it again rather than never
        return True
    return True


class NodeUnusable(ConfigError):
    """This node cannot take part in the run as configured; its message carries the
    :data:`~fedmae_flwr.strategies.replies.NODE_UNUSABLE` marker the server looks for."""


def _partition(context: Context) -> tuple[int, int]:
    """``(partition-id, num-partitions)`` from the node-config, else a ConfigError naming them."""
    node = context.node_config
    has = ", ".join(f"{k}={node[k]!r}" for k in sorted(node)) or "nothing"
    missing = [k for k in ("partition-id", "num-partitions") if k not in node]
    if missing:
        raise ConfigError(
            "No data to train on: its node-config sets no "
            f"'data-path' and lacks {' and '.join(repr(k) for k in missing)} (it has: {has}). "
            f"{NODE_CONFIG_HELP}"
        )
    try:
        return int(node["partition-id"]), int(node["num-partitions"])
    except (TypeError, ValueError):
        raise ConfigError(
            "node-config 'partition-id' and 'num-partitions' must be "
            f"whole numbers, 0 <= partition-id < num-partitions (it has: {has}). "
            f"{NODE_CONFIG_HELP}"
        ) from None


def train(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """Local MAE epochs on the active block; replies with only the trained tensors."""
    cfg = node_config(context, overrides)
    torch.set_num_threads(cfg.train.client_threads)
    data = node_data(context, cfg)
    return train_reply(
        msg,
        context,
        data.normalize(data.train.images),
        model=cfg.model,
        train=cfg.train,
        seed=cfg.seed,
        device=cfg.device,
        metrics={"skipped-images": data.skipped},
    )


def evaluate(msg: Message, context: Context, overrides: dict | None = None) -> Message:
    """Masked-reconstruction loss of the stage's model on the node's held-out images."""
    cfg = node_config(context, overrides)
    torch.set_num_threads(cfg.train.client_threads)
    data = node_data(context, cfg)
    images = data.normalize(data.heldout.images)
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

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return identify_reply(msg, context)

    return client_app


app = build_client_app()
