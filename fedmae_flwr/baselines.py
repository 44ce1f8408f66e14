"""Baselines that train without Flower messages, on the same data, model and schedule as FedMAE.

- ``centralized``: all training images in one place, one model (the upper bound). Each round
  trains ``local-epochs`` epochs over as many images as the round's sampled nodes hold together,
  drawn from the pooled set: the same images seen per round as FedMAE, without averaging.
- ``local``: a node alone (no federation) trains on its own partition every round.

Both follow the FedMAE strategy's :class:`~fedmae_flwr.strategies.StagePlan` (its ``plan``):
the same schedule, and the cascade grown the same way, stage by stage.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import Tensor

from fedmae_flwr.config import FedMAEConfig
from fedmae_flwr.data import DatasetSplits, load_node_data
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.local_training import train_local
from fedmae_flwr.models import initial_state, model_from_state
from fedmae_flwr.seeding import derive_seed
from fedmae_flwr.strategies import StagePlan

RoundCallback = Callable[[int, ArrayRecord, dict[str, Any]], None]


def _train_rounds(
    cfg: FedMAEConfig,
    plan: StagePlan,
    images_for_round: Callable[[int], Tensor],
    on_round: RoundCallback | None,
) -> ArrayRecord:
    device = resolve_device(cfg.device)
    arrays = ArrayRecord(
        {
            k: v.contiguous()
            for k, v in initial_state(cfg.model, derive_seed(cfg.seed, "initial-model")).items()
        }
    )
    for server_round in range(1, plan.num_rounds + 1):
        stage = plan.stage_of(server_round)
        grown = plan.grow({k: v.numpy() for k, v in arrays.items()}, server_round)
        state = {k: torch.from_numpy(v.copy()) for k, v in grown.items()}
        model = model_from_state(cfg.model, state, frozen_blocks=plan.frozen_blocks(server_round))
        model.to(device)
        images = images_for_round(server_round)
        result = train_local(
            model, images, cfg.train, seed=derive_seed(cfg.seed, "baseline-train", server_round)
        )
        state.update(model.active_state())
        arrays = ArrayRecord({k: v.detach().contiguous() for k, v in state.items()})
        if on_round is not None:
            row = {
                "round": server_round,
                "stage": stage,
                "clients": 1,
                "sampled": 1,
                "rejected": 0,
                "prefix-missing": 0,
                "examples": result.examples,
                "train-loss": result.loss,
                "train-seconds": result.seconds,
                "train-mbytes": result.peak_bytes / 2**20,
                "bytes-up-per-client": 0.0,
                "bytes-down-per-client": 0.0,
                "prefix-sends": 0,
            }
            on_round(server_round, arrays, row)
    return arrays


def centralized_pretraining(
    cfg: FedMAEConfig,
    plan: StagePlan,
    splits: DatasetSplits,
    num_nodes: int,
    on_round: RoundCallback | None = None,
) -> ArrayRecord:
    """One model on the pooled training set, ``clients-per-round`` partitions' worth per round."""
    pooled = splits.normalize(splits.train.images)
    per_round = round(
        cfg.schedule.clients_per_round
        * len(pooled)
        * (1 - cfg.data.heldout_fraction)
        / max(num_nodes, 1)
    )
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, "pooled-sample"))

    def images_for_round(_: int) -> Tensor:
        return pooled[torch.randperm(len(pooled), generator=generator)[:per_round]]

    return _train_rounds(cfg, plan, images_for_round, on_round)


def local_pretraining(
    cfg: FedMAEConfig,
    plan: StagePlan,
    partition_id: int,
    num_nodes: int,
    on_round: RoundCallback | None = None,
) -> ArrayRecord:
    """Node ``partition_id`` alone: every round is a round on its own training images."""
    data = load_node_data(cfg, partition_id, num_nodes)
    images = data.normalize(data.train.images)
    return _train_rounds(cfg, plan, lambda _: images, on_round)
