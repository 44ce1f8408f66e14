"""What the server keeps of each round: a metrics line and a checkpoint; at each stage end, the
held-out reconstruction PSNR beside the trivial predictor, a picture, and optionally a k-NN score.

Federated algorithms call it as the strategy's ``evaluate_fn`` (:meth:`RoundRecorder.evaluate_fn`);
the baselines trained in the ServerApp call :meth:`RoundRecorder.record` with their own row.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common import log

from fedmae_flwr.config import FedMAEConfig
from fedmae_flwr.data import DatasetSplits
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.evaluation.downstream import labelled_subsets
from fedmae_flwr.evaluation.features import extract_features
from fedmae_flwr.evaluation.linear_probe import knn_accuracy
from fedmae_flwr.evaluation.masked_reconstruction import evaluate_reconstruction
from fedmae_flwr.evaluation.reconstruction import save_reconstruction_grid
from fedmae_flwr.models import CascadeMAE, create_timm_backbone, model_from_state
from fedmae_flwr.run_outputs import RunOutputs
from fedmae_flwr.strategies import EVALUATION_REJECTED, FedMAE, StagePlan

# The per-stage fields a stage-end metrics line carries (what summary.json lists per stage).
# heldout-loss: the MAE loss on the server's test images; node-heldout-loss: on the evaluating
# nodes' held-out shares (heldout-fraction), the mean weighted by their image counts.
STAGE_KEYS = ("stage", "blocks", "psnr", "trivial-psnr", "heldout-loss", "node-heldout-loss",
              "evaluating-nodes", "evaluation-rejected", "knn-accuracy")  # fmt: skip
# The keys this recorder writes into a metrics line: none may come from a node's metrics (a
# node's `psnr` or `stage-end` made a round line look like a stage end, and the run fail).
RECORDER_KEYS = frozenset((*STAGE_KEYS, "stage-end", "seconds")) - {"stage"}


def torch_state(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy().copy()) for k, v in arrays.items()}


class RoundRecorder:
    """Writes each round's line and checkpoint; scores the model at each stage end."""

    def __init__(
        self, cfg: FedMAEConfig, plan: StagePlan, outputs: RunOutputs, splits: DatasetSplits
    ) -> None:
        self.cfg, self.plan, self.outputs, self.splits = cfg, plan, outputs, splits
        self.eval_images = splits.test.images[: cfg.eval.eval_images]
        self.device = resolve_device(cfg.device)
        self.last_time = time.perf_counter()
        # Stages a resumed run finished before its crash come back from their metrics lines.
        self.stages: list[dict[str, Any]] = [
            {k: row[k] for k in STAGE_KEYS if k in row}
            for row in outputs.read_metrics()
            if row.get("stage-end")
        ]

    def evaluate_fn(self, strategy: FedMAE) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """The ``evaluate_fn`` for ``strategy.start``: records each round after its aggregation.

        Flower's ``start()`` keeps its Result (where each round's train MetricRecord lands) to
        itself until the run ends, and calls ``evaluate_fn(round, arrays)`` right after the
        round's aggregation; so the round's record comes from the strategy's documented
        ``last_round_metrics`` (the MetricRecord ``aggregate_train`` just returned).
        """

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:  # Flower's call before the first round
                self.last_time = time.perf_counter()
                return None
            row = strategy.last_round_metrics
            if row is None or row.get("round") != server_round:
                raise RuntimeError(f"no train record of round {server_round} from the strategy")
            stage_extra = {}
            if (evaluation := strategy.evaluation_of(server_round)) is not None:
                nodes, record = evaluation
                stage_extra = {"evaluating-nodes": nodes,
                               "evaluation-rejected": int(record[EVALUATION_REJECTED])}  # fmt: skip
                if "eval-loss" in record:
                    stage_extra["node-heldout-loss"] = float(record["eval-loss"])
            return self.record(server_round, arrays, dict(row.items()), stage_extra,
                               server_state=strategy.server_state())  # fmt: skip

        return evaluate

    def record(
        self,
        server_round: int,
        arrays: ArrayRecord,
        round_row: dict,
        stage_extra: dict | None = None,
        server_state: dict | None = None,
    ) -> MetricRecord:
        """Append the round's metrics line (stage scores at a stage end, with ``stage_extra``:
        the nodes' own evaluation) and checkpoint it (the model and the aggregation's
        ``server_state``)."""
        if clash := sorted(RECORDER_KEYS & round_row.keys()):
            log(WARNING, "round %d: %s in the round's record (a node's metrics) are this "
                "recorder's own keys: left out", server_round, clash)  # fmt: skip
        row: dict[str, Any] = {k: v for k, v in round_row.items() if k not in RECORDER_KEYS}
        row["seconds"] = time.perf_counter() - self.last_time
        metrics = MetricRecord()
        if self.plan.is_stage_end(server_round):
            stage_row = {**self.score_stage(self.plan.stage_of(server_round), arrays),
                         **(stage_extra or {})}  # fmt: skip
            self.stages.append(stage_row)
            row.update(stage_row, **{"stage-end": True})
            metrics["psnr"], metrics["trivial-psnr"] = stage_row["psnr"], stage_row["trivial-psnr"]
        self.outputs.append_metrics(row)
        self.outputs.save_checkpoint(server_round, arrays, server_state)
        self.last_time = time.perf_counter()
        return metrics

    def score_stage(self, stage: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Held-out PSNR (and k-NN) of the finished stage's model, and its picture."""
        model = model_from_state(self.cfg.model, torch_state(arrays)).to(self.device)
        report = evaluate_reconstruction(model, self.eval_images, self.splits, seed=self.cfg.seed)
        stage_row = {
            "stage": stage,
            "blocks": len(model.blocks),
            "psnr": report.psnr,
            "trivial-psnr": report.trivial_psnr,
            "heldout-loss": report.loss,
        }
        if self.cfg.eval.stage_knn_images and self.splits.num_classes:
            stage_row["knn-accuracy"] = self.stage_knn(model)
        n = self.cfg.eval.grid_images
        save_reconstruction_grid(
            self.outputs.dir / "reconstructions" / f"stage-{stage}.png",
            report.originals[:n],
            report.masked[:n],
            report.reconstructions[:n],
            title=f"{self.cfg.algorithm}, stage {stage}: {len(model.blocks)} blocks, "
            f"PSNR {report.psnr:.2f} dB (mean fill {report.trivial_psnr:.2f} dB)",
        )
        log(INFO, "stage %d: held-out PSNR %.2f dB (trivial %.2f dB)",
            stage, report.psnr, report.trivial_psnr)  # fmt: skip
        return stage_row

    def stage_knn(self, model: CascadeMAE) -> float:
        """k-NN top-1 of the blocks trained so far (accuracy against rounds)."""
        sets = labelled_subsets(self.cfg.eval, self.splits, self.cfg.seed)
        n = self.cfg.eval.stage_knn_images
        train = sets["probe"].subset(range(min(n, len(sets["probe"]))))
        test = sets["test"].subset(range(min(n, len(sets["test"]))))
        state = {k: v.cpu() for k, v in model.state_dict().items()}
        backbone = create_timm_backbone(self.cfg.model, state)
        features = [
            extract_features(backbone, self.splits.normalize(s.images), device=self.device)
            for s in (train, test)
        ]
        return knn_accuracy(
            features[0], train.labels, features[1], test.labels, self.splits.num_classes
        )


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
