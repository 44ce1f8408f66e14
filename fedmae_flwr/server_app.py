"""ServerApp: config -> FedMAE strategy -> rounds -> per-stage evaluation -> export -> downstream.

Reads top to bottom as a run goes (:func:`run`): resolve the config, build the stage-0 model and
the strategy, run ``depth * rounds-per-stage`` rounds (after each: a metrics line and a checkpoint;
after each stage: held-out reconstruction PSNR and a picture, :mod:`fedmae_flwr.round_recorder`),
export the backbone to timm, then compare it with a random-init backbone (and raw pixels)
downstream and write ``summary.json``.

The ``algorithm`` switch keeps every baseline on this path: ``fedavg-mae`` is the same strategy
trained end to end; ``centralized`` and ``local`` train in this process on the same schedule
(:mod:`fedmae_flwr.baselines`); ``random-init`` skips pretraining.
"""

from __future__ import annotations

import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedmae_flwr.baselines import centralized_pretraining, local_pretraining
from fedmae_flwr.config import (
    FEDERATED,
    Aggregation,
    Algorithm,
    ConfigError,
    FedMAEConfig,
    resolve_config,
)
from fedmae_flwr.data import DatasetSplits, load_dataset
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.evaluation.downstream import evaluate_backbones
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
from fedmae_flwr.node_data_report import (
    is_simulation,
    known_largest_partition,
    report_node_data,
    report_partitions,
)
from fedmae_flwr.round_recorder import RoundRecorder, torch_state, totals
from fedmae_flwr.run_lock import hold_run_folder
from fedmae_flwr.run_outputs import (
    Checkpoint,
    RunOutputs,
    check_resume_config,
    latest_checkpoint,
    plot_curves,
    read_metrics,
    run_dir,
)
from fedmae_flwr.seeding import derive_seed, seeded_global_rng
from fedmae_flwr.simulation_nodes import check_simulation_nodes
from fedmae_flwr.strategies import FedMAE
from fedmae_flwr.strategies.aggregation import build_aggregator, keeps_server_state


def build_strategy(
    cfg: FedMAEConfig, first_round: int = 1, largest_partition: int | None = None
) -> FedMAE:
    """The FedMAE strategy the config describes (block and decoder inits seeded per stage),
    starting with ``first_round`` (> 1: resuming after round ``first_round - 1``).

    ``largest_partition`` (images of the largest node partition, when the server knows them:
    :func:`known_largest_partition`) caps ``num-examples`` unless ``max-examples`` is set."""
    model, schedule = cfg.model, cfg.schedule

    def new_block(index: int) -> dict:
        seed = derive_seed(cfg.seed, "block-init", index)
        return {k: v.numpy() for k, v in fresh_block_state(model, index, seed).items()}

    def new_decoder(stage: int) -> dict:
        seed = derive_seed(cfg.seed, "decoder-init", stage)
        return {k: v.numpy() for k, v in fresh_decoder_state(model, seed).items()}

    return FedMAE(
        depth=model.depth,
        rounds_per_stage=schedule.rounds_per_stage,
        new_block=new_block,
        new_decoder=new_decoder,
        next_block_init=schedule.next_block_init,
        decoder_per_stage=schedule.decoder_per_stage,
        num_train_nodes=schedule.clients_per_round,
        partial_rounds=0 < schedule.min_available_clients < schedule.clients_per_round,
        num_evaluate_nodes=schedule.evaluate_clients,
        seed=cfg.seed,
        sample_by=schedule.sample_by,
        min_available_nodes=schedule.min_available_clients or schedule.clients_per_round,
        progressive=cfg.algorithm != Algorithm.FEDAVG_MAE,
        first_round=first_round,
        node_wait_timeout=schedule.node_wait_timeout,
        max_update_norm=cfg.robust.max_update_norm,
        max_examples=cfg.robust.max_examples or largest_partition or None,
        model=model,
        aggregator=build_aggregator(cfg.robust, schedule.clients_per_round),
        dp_noise_multiplier=cfg.robust.dp_noise_multiplier,
        dp_clipping_norm=cfg.robust.dp_clipping_norm,
    )


def random_init_state(cfg: FedMAEConfig) -> dict[str, torch.Tensor]:
    """A K-block cascade initialised as FedMAE's blocks are, never trained: the floor."""
    with seeded_global_rng(derive_seed(cfg.seed, "random-init")):
        return CascadeMAE(cfg.model, num_blocks=cfg.model.depth).state_dict()


def pretrain(
    grid: Grid,
    cfg: FedMAEConfig,
    strategy: FedMAE,
    recorder: RoundRecorder,
    splits: DatasetSplits,
    checkpoint: Checkpoint | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Run the configured algorithm; returns its final model state(s) (none for random-init).

    With a ``checkpoint`` a federated run continues after its round, from its model and the
    aggregation's state.
    """
    if cfg.algorithm in FEDERATED:
        if checkpoint is None:
            initial = ArrayRecord(
                {
                    k: v.contiguous()
                    for k, v in initial_state(
                        cfg.model, derive_seed(cfg.seed, "initial-model")
                    ).items()
                }
            )
        else:  # the strategy was built to start after it: build_strategy(cfg, first_round)
            initial = checkpoint.arrays
            if checkpoint.server_state and strategy.first_round <= cfg.num_rounds:
                strategy.restore_server_state(checkpoint.server_state)
        if strategy.first_round > cfg.num_rounds:  # the crash came after the last checkpoint
            return [torch_state(initial)]
        result = strategy.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_rounds,
            train_config=ConfigRecord(),
            timeout=cfg.schedule.round_timeout,
            evaluate_fn=recorder.evaluate_fn(strategy),
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


def check_resume(
    cfg: FedMAEConfig, folder: Path, sim_nodes: int | None = None
) -> Checkpoint | None:
    """What a ``resume=true`` run checks of the run in ``folder`` before it trains (also
    without starting it: scripts/run.py): its config (:func:`check_resume_config`), that its
    checkpoint fits the model, and, for a simulation of ``sim_nodes``, the node count.
    Returns the newest checkpoint that reads back whole (None: none); ConfigError naming what
    differs."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:  # nothing to continue: the run starts fresh, the folder moved aside
        return None
    check_resume_config(folder, cfg, finished=checkpoint.round >= cfg.num_rounds)
    check_checkpoint_fits(cfg, checkpoint, folder)
    metrics = folder / "metrics.jsonl"
    if metrics.is_file():  # the resume keeps its lines up to the checkpoint
        try:
            read_metrics(metrics)
        except (ValueError, OSError) as err:
            raise ConfigError(
                f"resume: {metrics} cannot be read ({err}): only a last line can be torn by a "
                "crash. Mend or delete the damaged line (the rounds it recorded go unrecorded; "
                "the model resumes from its checkpoint whole), or start a fresh run "
                "(resume=false moves this one aside)."
            ) from err
    if sim_nodes is not None:
        check_resumed_partitions(cfg, sim_nodes, folder)
    return checkpoint


def read_checkpoint(cfg: FedMAEConfig, sim_nodes: int | None = None) -> Checkpoint | None:
    """The checkpoint a ``resume=true`` run continues from (None: start fresh): the newest that
    reads back whole, of a run made with this config (else ConfigError naming the keys) and,
    for a simulation, on ``sim_nodes`` nodes (:func:`check_resume`)."""
    if not cfg.resume:
        return None
    folder = run_dir(cfg)
    checkpoint = check_resume(cfg, folder, sim_nodes)
    if checkpoint is None:
        log(INFO, "resume: no readable checkpoint under %s, starting fresh", folder)
        return None
    log(INFO, "resume: continuing %s after its round-%d checkpoint", folder, checkpoint.round)
    warn_of_lost_server_state(cfg, checkpoint)
    return checkpoint


def warn_of_lost_server_state(cfg: FedMAEConfig, checkpoint: Checkpoint) -> bool:
    """Warn (and True) where a resume from ``checkpoint`` (one written before checkpoints held
    the server state and the tensor order) cannot equal the uninterrupted run: server-side DP
    on a model read back in another tensor order, or mid-stage a server optimizer's moments or
    the update bound's reference (``stage-norm``) missing (both restart at every stage end
    anyway, so a resume there is exact)."""
    if cfg.robust.dp_noise_multiplier > 0 and not checkpoint.ordered:
        log(WARNING, "resume: this checkpoint (written before checkpoints kept the model's "
            "tensor order) reads back in another order, and server-side DP draws its noise "
            "tensor after tensor: this run will not equal the uninterrupted one")  # fmt: skip
        return True
    rule = Aggregation(cfg.robust.aggregation)
    aggregator = build_aggregator(cfg.robust, cfg.schedule.clients_per_round)
    stage_end = checkpoint.round % cfg.schedule.rounds_per_stage == 0
    if stage_end:
        return False
    lost = False
    if keeps_server_state(aggregator) and not checkpoint.server_state:
        log(
            WARNING,
            "resume: aggregation=%s keeps its optimizer's moments through a stage, and this "
            "checkpoint (written before checkpoints held them) has the model only: they restart "
            "at round %d, mid-stage, so this run will not equal the uninterrupted one (a resume "
            "after a stage's last round, a multiple of rounds-per-stage=%d, would)",
            rule.value, checkpoint.round + 1, cfg.schedule.rounds_per_stage,
        )  # fmt: skip
        lost = True
    if cfg.robust.max_update_norm > 0 and "stage-norm" not in checkpoint.server_state:
        log(
            WARNING,
            "resume: this checkpoint (written before checkpoints held the stage's starting "
            "norm, stage-norm) lacks the update bound's reference: until the stage ends, "
            "max-update-norm=%g is measured against each round's tensors, so a reply the "
            "uninterrupted run rejected may be taken and this run may not equal it",
            cfg.robust.max_update_norm,
        )  # fmt: skip
        lost = True
    return lost


def check_checkpoint_fits(cfg: FedMAEConfig, checkpoint: Checkpoint, folder: Path) -> None:
    """ConfigError unless the checkpoint's model loads into this config's model (names and
    shapes) and its server state fits the aggregator and that model.

    config.yaml matching is not enough: a checkpoint copied in from another run would be sent
    to every node, and each would fail on it (``size mismatch``) deep inside the round; server
    state of another shape would broadcast silently, or fail in the aggregator mid-round."""
    server_round = checkpoint.round
    try:
        model_from_state(cfg.model, torch_state(checkpoint.arrays))
    except (RuntimeError, ValueError, KeyError) as err:
        # torch's load_state_dict error starts with a header line; the first line after it
        # names the first tensor that differs.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        lines = lines[1:] if lines and lines[0].startswith("Error(s) in loading") else lines
        first = lines[0] if lines else type(err).__name__
        raise ConfigError(
            f"resume: the round-{server_round} checkpoint under {folder} does not fit this run's "
            f"model ({first}): it was made with another model config. Resume it with the config "
            "it was made with, or start a fresh run (resume=false moves this one aside)."
        ) from err
    if not checkpoint.server_state or server_round >= cfg.num_rounds:  # finished: not restored
        return
    try:
        strategy = build_strategy(cfg, first_round=server_round + 1)
        strategy.restore_server_state(checkpoint.server_state, checkpoint.arrays)
    except ValueError as err:
        raise ConfigError(
            f"resume: the round-{server_round} checkpoint under {folder} holds a server state "
            f"this run cannot continue from ({err}). Resume it with the config it was made "
            "with, or start a fresh run (resume=false moves this one aside)."
        ) from err


def check_resumed_partitions(cfg: FedMAEConfig, sim_nodes: int, folder: Path | None = None) -> None:
    """ConfigError where a resumed simulation runs on another number of SuperNodes than the run
    it continues (its partitions.json; the run in ``folder``, default the config's): it
    re-split the images (or, with num-partitions set, left shares untrained or nodes without
    one) and sampled other nodes, silently."""
    try:
        report = json.loads(((folder or run_dir(cfg)) / "partitions.json").read_text())
        parts = report["num-partitions"]
        # reports before num-supernodes was recorded: one share per node unless num-partitions
        nodes = report.get("num-supernodes") or (sim_nodes if cfg.data.num_partitions else parts)
    except (OSError, ValueError, KeyError, TypeError):
        return  # a run without its report (crashed before it): nothing to compare
    if (parts, nodes) != (cfg.data.num_partitions or sim_nodes, sim_nodes):
        raise ConfigError(
            f"resume: the run split its images over {parts} partitions on {nodes} SuperNodes, "
            f"this simulation has {sim_nodes} (num-partitions={cfg.data.num_partitions}): its "
            f"nodes would train on other data, sampled from other nodes. Resume with {nodes} "
            f"SuperNodes (--num-supernodes {nodes}; make run NUM_SUPERNODES={nodes})."
        )


def require_output_dir(cfg: FedMAEConfig) -> None:
    """ConfigError, before the data is loaded, where ``output-dir`` cannot hold the run (a
    file on its path, no permission): it failed with a bare OSError after the data loaded.
    Creates nothing: a run refused later leaves no folder."""
    path = run_dir(cfg).parent
    existing = next(p for p in (path, *path.parents) if p.exists())
    why = (
        f"'{existing}' is not a folder"
        if not existing.is_dir()
        else f"'{existing}' is not writable"
        if not os.access(existing, os.W_OK | os.X_OK)
        else None
    )
    if why:
        raise ConfigError(
            f"Bad value for config key 'output-dir': {cfg.output_dir!r}. Allowed: a folder this "
            f"server can create and write to ({why})."
        )
    # The run's own folder, where it exists (a resume, or one to move aside), must be writable
    # too: a read-only one failed with a bare OSError after the data loaded.
    for folder in (run_dir(cfg), run_dir(cfg) / "checkpoints"):
        if folder.exists() and not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
            raise ConfigError(
                f"The run folder '{folder}' (output-dir / run-name) is not a folder this server "
                "can write to: fix its permissions, or choose another run-name or output-dir."
            )


def require_test_images(cfg: FedMAEConfig, splits: DatasetSplits) -> None:
    """ConfigError, at the start, for a source with no test image: the PSNR after each stage
    and the downstream scores are measured on them (it failed after the first stage); or with
    too few labelled images for the downstream evaluation (it failed after the pretraining)."""
    if not len(splits.test):
        raise ConfigError(_no_test_images_message(cfg, splits))
    labelled = splits.labelled() if splits.num_classes else None
    if labelled is not None and len(labelled.test):  # else the downstream step is skipped
        cfg.eval.check_labelled_images(len(labelled.train))


def _no_test_images_message(cfg: FedMAEConfig, splits: DatasetSplits) -> str:
    fraction = cfg.data.test_fraction
    why = (
        f"test-fraction={fraction} of each class rounds to 0 test images where a class holds "
        f"at most {int(0.5 / fraction)} images"
        if fraction
        else "test-fraction=0 splits none off"
    ) + "; a test split of the source's own (a test/ folder) had none either"
    return (
        f"The source has {len(splits.train)} training images and no test image ({why}): the "
        "reconstruction PSNR after each stage and the downstream scores are measured on test "
        "images. Raise test-fraction (allowed: [0, 1)), add images, or give the source a test "
        "split (imagefolder: data-path/test/<class>/; Hugging Face: a 'test' split)."
    )


def evaluate_downstream(
    cfg: FedMAEConfig, splits: DatasetSplits, states: list[dict[str, torch.Tensor]], baseline: dict
) -> dict[str, Any]:
    """Probe, k-NN and fine-tune of the pretrained backbone(s) beside random init and pixels."""
    names = [f"local-{i}" for i in range(len(states))] if cfg.algorithm == "local" else None
    backbones = {
        name: create_timm_backbone(cfg.model, state)
        for name, state in zip(names or [cfg.algorithm.value] * len(states), states, strict=True)
    }
    if cfg.eval.evaluate_random_init or not states:
        backbones["random-init"] = create_timm_backbone(cfg.model, baseline)
    splits = splits.labelled() if splits.num_classes else splits
    if not splits.num_classes or not len(splits.train) or not len(splits.test):
        why = "unlabelled source" if not splits.num_classes else "no labelled train or test image"
        log(INFO, "Downstream evaluation skipped: %s", why)
        return {"linear-probe": {}, "finetune": {}, "skipped": f"{why}: no downstream accuracy"}
    device = resolve_device(cfg.device)
    return evaluate_backbones(cfg.eval, splits, backbones, seed=cfg.seed, device=device)


def summarize(
    cfg: FedMAEConfig,
    splits: DatasetSplits,
    stages: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    downstream: dict[str, Any],
    partition_summary: dict[str, Any],
) -> dict[str, Any]:
    """``summary.json``: per-stage scores, downstream accuracies, costs, data, backbone."""

    def accuracies(protocol: dict[str, Any]) -> dict[str, float]:
        values = {k: v["accuracy"] if isinstance(v, dict) else v for k, v in protocol.items()}
        return mean_over_local_clients(values)

    final = stages[-1] if stages else {}
    return {
        "run-name": cfg.run_name,
        "depth": cfg.model.depth,
        "rounds": cfg.num_rounds,
        "final-psnr": final.get("psnr"),
        "final-trivial-psnr": final.get("trivial-psnr"),
        "stages": stages,
        "algorithm": cfg.algorithm.value,
        "linear-probe-accuracy": accuracies(downstream["linear-probe"]),
        "finetune-accuracy": accuracies(downstream["finetune"]),
        "knn-accuracy": accuracies(downstream.get("knn", {})),
        "downstream": downstream,
        "communication": totals(rows),
        "data": {
            "dataset": cfg.data.dataset.value,
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
    }


def run(grid: Grid, cfg: FedMAEConfig, flower_run_id: int | None = None) -> dict[str, Any]:
    """The whole run; returns (and writes) the summary. Holds the run folder while it writes
    (:mod:`fedmae_flwr.run_lock`): a second live run of this run-name is refused."""
    start = time.perf_counter()
    require_output_dir(cfg)
    splits = load_dataset(cfg)
    require_test_images(cfg, splits)
    # A simulation's node count is fixed: checked now, a mismatch could only fail later.
    sim_nodes = (
        check_simulation_nodes(cfg, grid, len(splits.train)) if is_simulation(grid) else None
    )
    with hold_run_folder(run_dir(cfg), flower_run_id):
        return _run_in_folder(grid, cfg, splits, sim_nodes, start)


def _run_in_folder(
    grid: Grid, cfg: FedMAEConfig, splits: DatasetSplits, sim_nodes: int | None, start: float
) -> dict[str, Any]:
    checkpoint = read_checkpoint(cfg, sim_nodes)
    outputs = RunOutputs(cfg, resume_round=checkpoint.round if checkpoint else None)
    partition_summary = report_partitions(cfg, sim_nodes, splits, outputs)
    strategy = build_strategy(
        cfg,
        first_round=checkpoint.round + 1 if checkpoint else 1,
        largest_partition=known_largest_partition(grid, partition_summary),
    )
    recorder = RoundRecorder(cfg, strategy.plan, outputs, splits)
    states = pretrain(grid, cfg, strategy, recorder, splits, checkpoint)
    node_data = report_node_data(grid, strategy, outputs)
    baseline = random_init_state(cfg)
    export_backbone(cfg.model, states[0] if states else baseline, outputs.dir)
    downstream = evaluate_downstream(cfg, splits, states, baseline)
    rows = outputs.read_metrics()
    plot_curves(rows, outputs.dir / "curves.png")
    summary = summarize(cfg, splits, recorder.stages, rows, downstream, partition_summary)
    summary["data"]["nodes"] = node_data  # per node id: images, skipped-images, rounds
    summary["wall-seconds"] = time.perf_counter() - start
    outputs.write_json("summary.json", summary)
    log(INFO, "run written to %s", outputs.dir)
    return summary


def build_server_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; ``overrides`` (kebab-case run-config) win over the run-config."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        run(grid, resolve_config({**context.run_config, **(overrides or {})}), context.run_id)

    return server_app


app = build_server_app()
