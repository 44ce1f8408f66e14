"""Fine-tuning accuracy against the number of labels, for the backbones benchmark runs exported.

Loads each run's exported backbone the way a user would (``timm.create_model`` + strict load of
``backbone.safetensors``), then fine-tunes it with the run's own recipe (epochs, lr, crop + flip,
seed) on nested seeded subsets of the labelled training split (``DEFAULT_LABELS`` by default,
``all`` for the whole split). The test set and recipe are the same for every backbone.
Each (run, labels) result, its seconds included, is cached as
``finetune-<labels>-ld<decay>-e<epochs>-lr<lr>-<head norm>[-aug].json`` in the run's folder
(``-aug``: crop + flip), so a cache is read back only for the recipe that wrote it.

    .venv/bin/python -m benchmarks.label_efficiency --runs fedmae-iid-s0 random-init-pooled-s0
    .venv/bin/python -m benchmarks.label_efficiency --labels 1000 5000 all   # all: GPU-sized

Writes ``docs/label-efficiency.md`` and ``docs/label-efficiency.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.harness import (
    EVALUATION,
    EVALUATION_PROTOCOL,
    add_folder_arguments,
    command_line,
    machine_line,
    pyplot,
    save_figure,
)
from fedmae_flwr.config import FedMAEConfig, load_config_yaml
from fedmae_flwr.data import load_dataset
from fedmae_flwr.data.images import DatasetSplits
from fedmae_flwr.evaluation.downstream import labelled_subsets
from fedmae_flwr.evaluation.finetune import finetune
from fedmae_flwr.models.export import load_backbone

DEFAULT_RUNS = ("fedmae-iid-s0", "fedavg-mae-iid-s0", "centralized-pooled-s0",
                "random-init-pooled-s0")  # fmt: skip
DEFAULT_LABELS = (1000, 5000)


def parse_labels(text: str) -> int:
    """A label count (``all`` = 0 = the whole labelled training split)."""
    if text == "all":
        return 0
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"labels {text!r}: a positive integer or 'all'")
    return value


def run_config(run_dir: Path) -> FedMAEConfig:
    """The resolved config a run wrote (``config.yaml``), as the typed schema."""
    return load_config_yaml(run_dir / "config.yaml")


def run_probe_inputs(run_dir: Path) -> tuple[FedMAEConfig, DatasetSplits, dict, nn.Module]:
    """What a post-hoc study of a run's backbone starts from: the run's config, its dataset, the
    labelled subsets it drew (``labelled_subsets`` with its seed) and its exported backbone."""
    cfg = run_config(run_dir)
    splits = load_dataset(cfg)
    return cfg, splits, labelled_subsets(cfg.eval, splits, cfg.seed), load_backbone(run_dir)


def cache_path(
    run_dir: Path, labels: int, layer_decay: float | None = None, epochs: int | None = None
) -> Path:
    """Where ``finetune_run`` keeps its result (overrides of None = the run's own value).

    The name spells out every recipe key that differs between runs (layer decay, epochs, lr,
    head norm, crop + flip), so a result is only ever read back for the recipe that made it.
    Caches named before head norm and crop + flip were part of the name
    (``finetune-<labels>-ld<decay>[-e<epochs>].json``) are not read: which of the two they ran
    with depends on the commit that wrote them.
    """
    ev = run_config(run_dir).eval
    decay = ev.finetune_layer_decay if layer_decay is None else layer_decay
    epochs = ev.finetune_epochs if epochs is None else epochs
    augment = "-aug" if ev.finetune_augment else ""
    return run_dir / (
        f"finetune-{labels or 'all'}-ld{decay:g}-e{epochs}-lr{ev.finetune_lr:g}"
        f"-{ev.finetune_head_norm}{augment}.json"
    )


def finetune_run(
    run_dir: Path,
    labels: int,
    device: str = "cpu",
    layer_decay: float | None = None,
    epochs: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``run_dir``'s exported backbone on ``labels`` labels (0 = all); cached.

    ``layer_decay`` and ``epochs`` override the run's ``finetune-layer-decay`` and
    ``finetune-epochs`` (the rest of the recipe is the run's own).
    """
    cfg = run_config(run_dir)
    decay = cfg.eval.finetune_layer_decay if layer_decay is None else layer_decay
    epochs = cfg.eval.finetune_epochs if epochs is None else epochs
    cache = cache_path(run_dir, labels, layer_decay, epochs)
    if cache.is_file():
        return json.loads(cache.read_text())
    splits = load_dataset(cfg)
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(cfg.seed))
    train = splits.train.subset(order[: labels or len(splits.train)])
    num_test = min(cfg.eval.test_images or len(splits.test), len(splits.test))
    test = splits.test.subset(range(num_test))
    backbone = load_backbone(run_dir)
    start = time.perf_counter()
    result = finetune(
        backbone,
        backbone.num_features,
        splits.normalize(train.images),
        train.labels,
        splits.normalize(test.images),
        test.labels,
        splits.num_classes,
        epochs=epochs,
        lr=cfg.eval.finetune_lr,
        seed=cfg.seed,
        device=device,
        layer_decay=decay,
        head_norm=str(cfg.eval.finetune_head_norm),
        augment=cfg.eval.finetune_augment,
    )
    record = {
        **asdict(result),
        "labels": len(train),
        "test-images": num_test,
        "lr": cfg.eval.finetune_lr,
        "layer-decay": decay,
        "seconds": time.perf_counter() - start,
        "device": device,
        "machine": machine_line(),
    }
    cache.write_text(json.dumps(record, indent=2))
    return record


def plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    fig, ax = pyplot().subplots(figsize=(5.5, 3.8))
    for run, by_labels in results.items():
        points = sorted((r["labels"], 100 * r["accuracy"]) for r in by_labels.values())
        ax.plot(*zip(*points, strict=True), marker="o", label=run)
    ax.set_xscale("log")
    ax.set(xlabel="labelled training images", ylabel="fine-tune top-1 (%)",
           title="Label efficiency (same recipe for every backbone)")  # fmt: skip
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_report(
    results: dict[str, dict[int, dict]],
    label_counts: list[int],
    command: str,
    docs: Path,
    suffix: str = "",
) -> Path:
    """``docs/label-efficiency<suffix>.md`` and its plot."""
    docs.mkdir(parents=True, exist_ok=True)
    name = f"label-efficiency{suffix}"
    plot(results, docs / f"{name}.png")
    any_record = next(iter(next(iter(results.values())).values()))
    header = [f"{n} labels" if n else "all labels" for n in label_counts]
    lines = [
        "# Fine-tuning accuracy against the number of labels",
        "",
        f"Command: `{command}` ({machine_line()}).",
        "",
        "Each backbone is the one its benchmark run exported (see results.md for the runs), "
        "loaded with timm (strict) and fine-tuned with one recipe: "
        f"{any_record['epochs']} epochs, lr {any_record['lr']}, "
        f"layer decay {any_record['layer-decay']} (1 = off), "
        f"{any_record['test-images']} test images ({EVALUATION_PROTOCOL}). The label subsets "
        "are nested and seeded. Top-1 in %; seconds of fine-tuning in brackets.",
        "",
        "| backbone (run) | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for run, by_labels in results.items():
        cells = [
            f"{100 * r['accuracy']:.1f} ({r['seconds']:.0f} s)" if (r := by_labels.get(n)) else "-"
            for n in label_counts
        ]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    lines += ["", f"![{name}.png]({name}.png)", ""]
    path = docs / f"{name}.md"
    path.write_text("\n".join(lines))
    return path


def add_backbone_arguments(parser: argparse.ArgumentParser) -> None:
    """What every post-hoc study takes: ``--runs`` (whose exported backbones) and the folders."""
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS))
    add_folder_arguments(parser)


def check_backbones(parser: argparse.ArgumentParser, runs: list[str], out: Path) -> None:
    """Stop with a usage error naming the runs under ``out`` that exported no backbone."""
    missing = [r for r in runs if not (out / r / "backbone.safetensors").is_file()]
    if missing:
        parser.error(
            f"no exported backbone for {missing} under {out}; run the benchmark that "
            "makes them first (e.g. make bench-quality)"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, ``--labels`` and ``--epochs`` resolved (``--full-recipe``: EVALUATION's)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_arguments(parser)
    default_labels = " ".join(map(str, DEFAULT_LABELS))
    parser.add_argument(
        "--labels", nargs="+", type=parse_labels, default=None, help=f"default: {default_labels}"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--layer-decay", type=float, default=None, help="default: each run's finetune-layer-decay"
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="default: each run's finetune-epochs"
    )
    parser.add_argument(
        "--full-recipe",
        action="store_true",
        help="default --labels and --epochs: the benchmarks' evaluation protocol's "
        "(EVALUATION's finetune-labels and finetune-epochs)",
    )
    args = parser.parse_args(argv)
    check_backbones(parser, args.runs, args.out)
    if args.labels is None:
        args.labels = [EVALUATION["finetune-labels"]] if args.full_recipe else list(DEFAULT_LABELS)
    if args.epochs is None and args.full_recipe:
        args.epochs = EVALUATION["finetune-epochs"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: dict[str, dict[int, dict]] = {}
    for labels in args.labels:
        for run in args.runs:
            record = finetune_run(
                args.out / run, labels, args.device, args.layer_decay, args.epochs
            )
            results.setdefault(run, {})[labels] = record
            accuracy, seconds = 100 * record["accuracy"], record["seconds"]
            print(f"[label-efficiency] {run} {record['labels']} labels: {accuracy:.1f} "
                  f"({seconds:.0f} s)", flush=True)  # fmt: skip
    command = command_line("benchmarks.label_efficiency", argv)
    suffix = "" if args.layer_decay is None else f"-ld{args.layer_decay:g}"
    suffix += "" if args.epochs is None else f"-e{args.epochs}"
    path = write_report(results, args.labels, command.strip(), args.docs, suffix)
    print(f"[label-efficiency] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
