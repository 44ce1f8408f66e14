"""ServerApp: config -> FedMAE strategy -> rounds -> per-stage evaluation -> export -> downstream.

Reads top to bottom as a run goes: resolve the config, build the stage-0 model and the strategy,
run ``depth * rounds-per-stage`` rounds (after each: a metrics line and a checkpoint; after each
stage: held-out reconstruction PSNR and a picture), export the backbone to timm, then compare it
with a random-init backbone (and raw pixels) downstream and write ``summary.json``.

The ``algorithm`` switch keeps every baseline on this path: ``fedavg-mae`` is the same strategy
trained end to end; ``centralized`` and ``local`` train in this process on the same schedule
(:mod:`fedmae_flwr.baselines`); ``random-init`` skips pretraining.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedmae_flwr.baselines import centralized_pretraining, local_pretraining
from fedmae_flwr.config import FedMAEConfig, resolve_config
from fedmae_flwr.data import DatasetSplits, load_dataset, partitions
from fedmae_flwr.data.partition_report import partition_stats, write_partition_report
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.evaluation.downstream import evaluate_backbones, labelled_subsets
from fedmae_flwr.evaluation.features import extract_features
from fedmae_flwr.evaluation.linear_probe import knn_accuracy
from fedmae_flwr.evaluation.masked_reconstruction import evaluate_reconstruction
from fedmae_flwr.evaluation.reconstruction import save_reconstruction_grid
from fedmae_flwr.models import (
    CascadeMAE,
    create_timm_backbone,
    export_backbone,
    fresh_block_state,
    fresh_decoder_state,
    initial_state,
    model_from_state,
    timm_kwargs,
)
from fedmae_flwr.models.export import TIMM_BASE_MODEL
from fedmae_flwr.run_outputs import (
    RunOutputs,
    has_checkpoint,
    load_checkpoint,
    plot_curves,
    run_dir,
)
from fedmae_flwr.strategies import FedMAE


def build_strategy(cfg: FedMAEConfig, first_round: int = 1) -> FedMAE:
    """The FedMAE strategy the config describes (block and decoder inits seeded per stage),
    starting with ``first_round`` (> 1: resuming after round ``first_round - 1``)."""
    return FedMAE(
        depth=cfg.model.depth,
        rounds_per_stage=cfg.schedule.rounds_per_stage,
        new_block=lambda i: {
            k: v.numpy() for k, v in fresh_block_state(cfg.model, i, cfg.seed + i).items()
        },
        new_decoder=lambda s: {
            k: v.numpy() for k, v in fresh_decoder_state(cfg.model, cfg.seed + 100 + s).items()
        },
        next_block_init=cfg.schedule.next_block_init,
        decoder_per_stage=cfg.schedule.decoder_per_stage,
        num_train_nodes=cfg.schedule.clients_per_round,
        num_evaluate_nodes=cfg.schedule.evaluate_clients,
        seed=cfg.seed,
        min_available_nodes=cfg.schedule.min_available_clients or cfg.schedule.clients_per_round,
        fraction_evaluate=1.0 if cfg.schedule.evaluate_clients else 0.0,
        progressive=cfg.algorithm != "fedavg-mae",
        first_round=first_round,
    )


def torch_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


# The per-stage fields a stage-end metrics line carries (what summary.json lists per stage).
STAGE_KEYS = ("stage", "blocks", "psnr", "trivial-psnr", "heldout-loss", "knn-accuracy")


class RoundRecorder:
    """After each round: one metrics line and a checkpoint; at each stage end, held-out
    reconstruction PSNR beside the trivial predictor, and a picture.

    Called as the strategy's ``evaluate_fn`` (federated algorithms) or directly with a row
    (baselines trained in the ServerApp).
    """

    def __init__(
        self, cfg: FedMAEConfig, strategy: FedMAE, outputs: RunOutputs, splits: DatasetSplits
    ) -> None:
        self.cfg, self.strategy, self.outputs, self.splits = cfg, strategy, outputs, splits
        self.eval_images = splits.test.images[: cfg.eval.eval_images]
        self.device = resolve_device(cfg.device)
        self.last_time = time.perf_counter()
        # Stages a resumed run finished before its crash come back from their metrics lines.
        self.stages: list[dict[str, Any]] = [
            {k: row[k] for k in STAGE_KEYS if k in row}
            for row in outputs.read_metrics()
            if row.get("stage-end")
        ]

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            self.last_time = time.perf_counter()
            return None
        # Flower's start() keeps its Result (where the train MetricRecord of each round lands)
        # to itself until the run ends, and calls evaluate_fn(round, arrays) right after the
        # round's aggregate_train/aggregate_evaluate. So the round's record comes from the
        # strategy's documented `last_round_metrics` (the MetricRecord aggregate_train just
        # returned, the one Result.train_metrics_clientapp keeps): no re-implemented start(),
        # no wrapped hooks, nothing else of the strategy read.
        round_row = self.strategy.last_round_metrics
        if round_row is None or round_row.get("round") != server_round:
            raise RuntimeError(f"no train record of round {server_round} from the strategy")
        return self.record(server_round, arrays, dict(round_row.items()))

    def record(self, server_round: int, arrays: ArrayRecord, round_row: dict) -> MetricRecord:
        row: dict[str, Any] = dict(round_row)
        row["seconds"] = time.perf_counter() - self.last_time
        metrics = MetricRecord()
        if self.strategy.plan.is_stage_end(server_round):
            stage = self.strategy.plan.stage_of(server_round)
            model = model_from_state(self.cfg.model, torch_state(arrays)).to(self.device)
            report = evaluate_reconstruction(
                model, self.eval_images, self.splits, seed=self.cfg.seed
            )
            stage_row = {
                "stage": stage,
                "blocks": len(model.blocks),
                "psnr": report.psnr,
                "trivial-psnr": report.trivial_psnr,
                "heldout-loss": report.loss,
            }
            if self.cfg.eval.stage_knn_images and self.splits.num_classes:
                stage_row["knn-accuracy"] = self.stage_knn(model)
            self.stages.append(stage_row)
            row.update(stage_row, **{"stage-end": True})
            n = self.cfg.eval.grid_images
            save_reconstruction_grid(
                self.outputs.dir / "reconstructions" / f"stage-{stage}.png",
                report.originals[:n],
                report.masked[:n],
                report.reconstructions[:n],
                title=f"{self.cfg.algorithm}, stage {stage}: {len(model.blocks)} blocks, "
                f"PSNR {report.psnr:.2f} dB (mean fill {report.trivial_psnr:.2f} dB)",
            )
            metrics["psnr"] = report.psnr
            metrics["trivial-psnr"] = report.trivial_psnr
            log(INFO, "stage %d: held-out PSNR %.2f dB (trivial %.2f dB)",
                        stage, report.psnr, report.trivial_psnr)  # fmt: skip
        self.outputs.append_metrics(row)
        self.outputs.save_checkpoint(server_round, arrays)
        self.last_time = time.perf_counter()
        return metrics

    def stage_knn(self, model: CascadeMAE) -> float:
        """k-NN top-1 of the blocks trained so far (accuracy against rounds)."""
        sets = labelled_subsets(self.cfg.eval, self.splits, self.cfg.seed)
        n = self.cfg.eval.stage_knn_images
        train, test = sets["probe"].subset(range(min(n, len(sets["probe"])))), sets["test"]
        test = test.subset(range(min(n, len(test))))
        backbone = create_timm_backbone(
            self.cfg.model, {k: v.cpu() for k, v in model.state_dict().items()}
        )
        train_f = extract_features(
            backbone, self.splits.normalize(train.images), device=self.device
        )
        test_f = extract_features(backbone, self.splits.normalize(test.images), device=self.device)
        return knn_accuracy(train_f, train.labels, test_f, test.labels, self.splits.num_classes)


def random_init_state(cfg: FedMAEConfig) -> dict[str, torch.Tensor]:
    """A K-block cascade with the same init as FedMAE's blocks, never trained: the floor."""
    torch.manual_seed(cfg.seed + 12345)
    return CascadeMAE(cfg.model, num_blocks=cfg.model.depth).state_dict()


def totals(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Communication and client costs over the run's rounds."""
    participations = sum(r["clients"] for r in rows) or 1
    up = sum(r["bytes-up-per-client"] * r["clients"] for r in rows)
    down = sum(r["bytes-down-per-client"] * r["sampled"] for r in rows)
    return {
        "rounds": len(rows),
        "bytes-up-total": up,
        "bytes-down-total": down,
        "bytes-up-per-client-round": up / participations,
        "bytes-down-per-client-round": down / participations,
        "prefix-sends": sum(r["prefix-sends"] for r in rows),
        "rejected-replies": sum(r["rejected"] for r in rows),
        "round-seconds": sum(r["seconds"] for r in rows),
        "client-train-seconds-mean": (
            sum(r.get("train-seconds", 0.0) for r in rows) / len(rows) if rows else 0.0
        ),
        "client-train-mbytes-peak": max((r.get("train-mbytes", 0.0) for r in rows), default=0.0),
    }


def report_partitions(
    cfg: FedMAEConfig, grid: Grid, splits: DatasetSplits, outputs: RunOutputs
) -> dict[str, Any]:
    """Write ``partitions.json`` + ``partitions.png`` for the simulation's partitioning.

    The partition count is ``num-partitions`` or the number of connected nodes, as each node
    computes it; nodes that read their own folders (node-config ``data-path``) are not covered.
    """
    num_partitions = cfg.data.num_partitions or len(list(grid.get_node_ids()))
    if num_partitions < 1 or num_partitions > len(splits.train):
        return {}
    parts = partitions(cfg, num_partitions)
    stats = partition_stats(
        splits.train.labels.numpy(), [p.numpy() for p in parts], splits.num_classes
    )
    write_partition_report(outputs.dir, stats)
    keys = ("num-partitions", "min-images", "median-images", "max-images", "empty-partitions",
            "mean-label-entropy", "global-label-entropy")  # fmt: skip
    return {k: stats[k] for k in keys}


def pretrain(
    grid: Grid,
    cfg: FedMAEConfig,
    strategy: FedMAE,
    recorder: RoundRecorder,
    splits: DatasetSplits,
    checkpoint: tuple[int, ArrayRecord] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Run the configured algorithm; returns its final model state(s) (none for random-init).

    With a ``checkpoint`` (round, global arrays) a federated run continues after that round.
    """
    if cfg.algorithm in ("fedmae", "fedavg-mae"):
        if checkpoint is None:
            initial = ArrayRecord(
                {k: v.contiguous() for k, v in initial_state(cfg.model, cfg.seed).items()}
            )
        else:  # the strategy was built to start after it: build_strategy(cfg, first_round)
            initial = checkpoint[1]
        if strategy.first_round > cfg.num_rounds:  # the crash came after the last checkpoint
            return [torch_state(initial)]
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_rounds,
            train_config=ConfigRecord(),
            evaluate_fn=recorder,
        )
        return [torch_state(result.arrays)]
    num_nodes = cfg.data.num_partitions or len(list(grid.get_node_ids()))
    if cfg.algorithm == "centralized":
        return [
            torch_state(
                centralized_pretraining(cfg, strategy.plan, splits, num_nodes, recorder.record)
            )
        ]
    if cfg.algorithm == "local":
        return [
            torch_state(
                local_pretraining(
                    cfg, strategy.plan, i, num_nodes, recorder.record if i == 0 else None
                )
            )
            for i in range(min(cfg.local_clients, num_nodes))
        ]
    return []


def mean_over_local_clients(accuracies: dict[str, float]) -> dict[str, float]:
    """``local-0``, ``local-1``, ... -> their mean under ``local`` (each node's own backbone)."""
    local = [v for k, v in accuracies.items() if k.startswith("local-")]
    out = {k: v for k, v in accuracies.items() if not k.startswith("local-")}
    if local:
        out["local"] = sum(local) / len(local)
    return out


def run(grid: Grid, cfg: FedMAEConfig) -> dict[str, Any]:
    """The whole run; returns (and writes) the summary."""
    start = time.perf_counter()
    checkpoint, folder = None, run_dir(cfg)
    if cfg.resume and has_checkpoint(folder):
        checkpoint = load_checkpoint(folder)
        log(INFO, "resume: continuing %s after its round-%d checkpoint", folder, checkpoint[0])
    elif cfg.resume:
        log(INFO, "resume: no checkpoint under %s, starting fresh", folder)
    outputs = RunOutputs(cfg, resume_round=checkpoint[0] if checkpoint else None)
    splits = load_dataset(cfg)
    strategy = build_strategy(cfg, first_round=checkpoint[0] + 1 if checkpoint else 1)
    recorder = RoundRecorder(cfg, strategy, outputs, splits)
    partition_summary = report_partitions(cfg, grid, splits, outputs)
    states = pretrain(grid, cfg, strategy, recorder, splits, checkpoint)
    baseline = random_init_state(cfg)
    export_backbone(cfg.model, states[0] if states else baseline, outputs.dir)
    names = [f"local-{i}" for i in range(len(states))] if cfg.algorithm == "local" else None
    backbones = {
        name: create_timm_backbone(cfg.model, state)
        for name, state in zip(names or [cfg.algorithm] * len(states), states, strict=True)
    }
    if cfg.eval.evaluate_random_init or not states:
        backbones["random-init"] = create_timm_backbone(cfg.model, baseline)
    downstream: dict[str, Any] = {"linear-probe": {}, "finetune": {}}
    if splits.num_classes:
        downstream = evaluate_backbones(
            cfg.eval, splits, backbones, seed=cfg.seed, device=resolve_device(cfg.device)
        )
    else:
        downstream["skipped"] = "unlabelled source: no downstream accuracy"
        log(INFO, "Unlabelled source: downstream evaluation skipped")
    rows = outputs.read_metrics()
    plot_curves(rows, outputs.dir / "curves.png")
    final = recorder.stages[-1] if recorder.stages else {}
    summary = {
        "run-name": cfg.run_name,
        "depth": cfg.model.depth,
        "rounds": cfg.num_rounds,
        "final-psnr": final.get("psnr"),
        "final-trivial-psnr": final.get("trivial-psnr"),
        "stages": recorder.stages,
        "algorithm": cfg.algorithm,
        "linear-probe-accuracy": mean_over_local_clients(
            {k: v["accuracy"] for k, v in downstream["linear-probe"].items()}
        ),
        "finetune-accuracy": mean_over_local_clients(
            {k: v["accuracy"] for k, v in downstream["finetune"].items()}
        ),
        "knn-accuracy": mean_over_local_clients(downstream.get("knn", {})),
        "downstream": downstream,
        "communication": totals(rows),
        "data": {
            "dataset": cfg.data.dataset,
            "train-images": len(splits.train),
            "test-images": len(splits.test),
            "loaded": splits.loaded,
            "skipped-unreadable": splits.skipped,
            "partitions": partition_summary,
        },
        "backbone": {
            "file": "backbone.safetensors",
            "model_name": TIMM_BASE_MODEL,
            "kwargs": timm_kwargs(cfg.model),
        },
        "wall-seconds": time.perf_counter() - start,
    }
    outputs.write_json("summary.json", summary)
    log(INFO, "run written to %s", outputs.dir)
    return summary


def build_server_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` (kebab-case run-config) win over the run-config."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run(grid, resolve_config({**context.run_config, **(overrides or {})}))

    return server_app


app = build_server_app()
