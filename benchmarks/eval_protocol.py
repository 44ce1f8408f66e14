"""The evaluation protocol's noise floor: random-init backbones, several init seeds x label subsets.

A difference between two backbones means something only if it exceeds what the protocol itself
moves when nothing but chance changes. This measures that: random-init backbones (exactly a
``random-init`` run's, for each init seed) are fine-tuned with the library's protocol
(:func:`fedmae_flwr.evaluation.protocol.finetune_protocol`: disjoint label subsets, a
validation share of each, the lr kept by validation accuracy, the test set scored once) and
linear-probed, on the same disjoint subsets for every init seed. The subsets are drawn with one
seed (``--subset-seed``) so that the spread over init seeds and the spread over subsets can be
told apart; each fine-tune trains with the init seed (subset ``k > 0``: a seed derived from it).

``--labels 0`` measures the probe alone (seconds per backbone instead of minutes): the
fine-tune's floor under the grid's recipe is then the grid's own random-init row
(docs/results.md), which fine-tunes exactly these backbones on 3 label subsets each.

Every (init seed) result is appended to ``docs/data/eval-protocol.json`` as soon as it is
measured; a rerun skips what is there, and ``--report-only`` writes the report from the file:

    .venv/bin/python -m benchmarks.eval_protocol --init-seeds 0 1 2 --subsets 3

Writes ``docs/eval-protocol.md`` and ``docs/eval-protocol.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import command_line, pyplot, save_figure
from fedmae_flwr.config import HeadNorm, resolve_config
from fedmae_flwr.data import load_dataset
from fedmae_flwr.data.images import DatasetSplits
from fedmae_flwr.evaluation.downstream import PROTOCOL_RECIPE
from fedmae_flwr.evaluation.features import extract_features
from fedmae_flwr.evaluation.linear_probe import tuned_linear_probe
from fedmae_flwr.evaluation.protocol import disjoint_subsets, finetune_protocol
from fedmae_flwr.models.export import create_timm_backbone
from fedmae_flwr.server_app import random_init_state

ROOT = Path(__file__).resolve().parent.parent
# Tracked beside the docs: the noise bounds of every results page are drawn from this file.
RESULTS = ROOT / "docs" / "data" / "eval-protocol.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = resolve_config().eval
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--subset-seed", type=int, default=0)
    # The schema default is 0 (off); here 0 skips the fine-tune and measures the probe alone.
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--lr-grid", default=str(defaults.finetune_lr))
    parser.add_argument("--epochs", type=int, default=defaults.finetune_epochs)
    parser.add_argument("--head-norm", default=str(defaults.finetune_head_norm),
                        choices=[str(kind) for kind in HeadNorm])  # fmt: skip
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction,
                        default=defaults.finetune_augment, help="crop + flip")  # fmt: skip
    parser.add_argument("--probe-images", type=int, default=defaults.probe_train_images)
    parser.add_argument("--probe-epochs", type=int, default=defaults.probe_epochs)
    parser.add_argument("--probe-lr-grid", default=defaults.probe_lr_grid)
    parser.add_argument("--probe-val-fraction", type=float, default=defaults.probe_val_fraction)
    parser.add_argument("--test-images", type=int, default=defaults.test_images)
    parser.add_argument("--data-path", default=None, help="Fashion-MNIST folder (default: the "
                        "config's data-path)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def protocol_of(args: argparse.Namespace) -> dict[str, Any]:
    """Everything a measured value depends on besides the init seed (kept in the results file,
    which only ever holds measurements of one protocol)."""
    model = resolve_config().model
    return {
        "model": asdict(model),
        "finetune-labels": args.labels,
        "subsets": args.subsets,
        "subset-seed": args.subset_seed,
        "val-fraction": args.val_fraction,
        "lr-grid": [float(v) for v in args.lr_grid.split(",")],
        "finetune-epochs": args.epochs,
        "finetune-recipe": PROTOCOL_RECIPE,
        "finetune-head-norm": args.head_norm,
        "finetune-augment": args.augment,
        "probe-train-images": args.probe_images,
        "probe-epochs": args.probe_epochs,
        "probe-lr-grid": [float(v) for v in args.probe_lr_grid.split(",")],
        "probe-val-fraction": args.probe_val_fraction,
        "test-images": args.test_images,
        "threads": args.threads,
    }


# Keys a results file may predate, with what its measurement did: the bare linear head, the probe
# at lr 0.1 alone (no validation share), crop + flip (then a key of the recipe).
FORMER_PROTOCOL: dict[str, Any] = {
    "finetune-head-norm": "none",
    "probe-lr-grid": [0.1],
    "probe-val-fraction": 0.0,
    "finetune-augment": True,
}
# What only the fine-tune depends on: a probe-only file (``--labels 0``) is not bound by them.
FINETUNE_ONLY = ("val-fraction", "lr-grid", "finetune-epochs", "finetune-recipe",
                 "finetune-head-norm", "finetune-augment")  # fmt: skip


def upgrade_protocol(protocol: dict[str, Any]) -> dict[str, Any]:
    """A results file's protocol in today's keys (the keys it predates at FORMER_PROTOCOL)."""
    upgraded = {**FORMER_PROTOCOL, **protocol}
    recipe = dict(upgraded.get("finetune-recipe", {}))
    if "augment" in recipe:  # before its own key, the fixed recipe held it
        upgraded["finetune-augment"] = recipe.pop("augment")
        upgraded["finetune-recipe"] = recipe
    return upgraded


def same_protocol(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two protocols measure the same values (probe-only ones: the fine-tune keys aside)."""
    if a.get("finetune-labels") == b.get("finetune-labels") == 0:
        a, b = ({k: v for k, v in p.items() if k not in FINETUNE_ONLY} for p in (a, b))
    return a == b


def load_results(path: Path, protocol: dict[str, Any]) -> dict[str, Any]:
    """The results file for ``protocol`` (a fresh one if absent); refuses another protocol's."""
    if not path.is_file():
        return {"protocol": protocol, "seeds": {}}
    results = json.loads(path.read_text())
    results["protocol"] = upgrade_protocol(results["protocol"])
    if not same_protocol(results["protocol"], protocol):
        raise SystemExit(f"{path} holds another protocol's results; move it or pass --results")
    return results


def _probes(
    backbone: torch.nn.Module, splits: DatasetSplits, probe_sets: list[Any], test: Any, args: Any
) -> list[dict[str, Any]]:
    """The linear probe of ``backbone`` on each disjoint probe subset (same test images)."""
    test_f = extract_features(backbone, splits.normalize(test.images))
    out = []
    for subset in probe_sets:
        train_f = extract_features(backbone, splits.normalize(subset.images))
        lrs = [float(v) for v in args.probe_lr_grid.split(",")]
        result = tuned_linear_probe(train_f, subset.labels, test_f, test.labels,
                                    splits.num_classes, args.probe_epochs, lrs,
                                    args.probe_val_fraction, seed=0)  # fmt: skip
        out.append(asdict(result))
    return out


def measure_seed(seed: int, splits: DatasetSplits, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (protocol) and linear probe of the random-init backbone of init seed ``seed``."""
    cfg = resolve_config({"seed": seed})
    backbone = create_timm_backbone(cfg.model, random_init_state(cfg))
    n = len(splits.train)
    test = splits.test.subset(range(min(args.test_images or n, len(splits.test))))
    probe_idx = disjoint_subsets(n, args.probe_images, args.subsets, args.subset_seed)
    start = time.perf_counter()
    probes = _probes(backbone, splits, [splits.train.subset(i) for i in probe_idx], test, args)
    probe_s = time.perf_counter() - start
    if not args.labels:
        return {"finetune": None, "linear-probe": probes, "seconds": {"probe": probe_s}}
    tune_idx = disjoint_subsets(n, args.labels, args.subsets, args.subset_seed)
    tune_sets = [splits.train.subset(i) for i in tune_idx]
    finetune = finetune_protocol(
        backbone, [(splits.normalize(s.images), s.labels) for s in tune_sets],
        (splits.normalize(test.images), test.labels), val_fraction=args.val_fraction,
        lrs=tuple(float(v) for v in args.lr_grid.split(",")), seed=seed,
        feature_dim=backbone.num_features, num_classes=splits.num_classes, epochs=args.epochs,
        device="cpu", layer_decay=1.0, head_norm=args.head_norm, augment=args.augment,
        **PROTOCOL_RECIPE,
    )  # fmt: skip
    return {
        "finetune": finetune,
        "linear-probe": probes,
        "seconds": {"probe": probe_s, "finetune": time.perf_counter() - start - probe_s},
    }


def spreads(seeds: dict[str, Any], pick: str) -> dict[str, Any]:
    """Grid ``[seed][subset]`` of a metric and its spreads (sample std, in fractions)."""
    grid = [[row[pick] for row in per_seed] for per_seed in seeds.values()]
    flat = [v for row in grid for v in row]

    def std(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else float("nan")

    by_seed = [statistics.fmean(row) for row in grid]
    by_subset = [statistics.fmean(col) for col in zip(*grid, strict=True)]
    within_seed = [std(row) for row in grid]
    within_subset = [std(list(col)) for col in zip(*grid, strict=True)]
    return {
        "grid": grid,
        "mean": statistics.fmean(flat),
        "std": std(flat),
        "min": min(flat),
        "max": max(flat),
        "std-of-seed-means": std(by_seed),
        "std-of-subset-means": std(by_subset),
        "mean-std-over-subsets": statistics.fmean(within_seed),
        "mean-std-over-seeds": statistics.fmean(within_subset),
    }


def has_finetune(results: dict[str, Any]) -> bool:
    """Whether the file measured fine-tunes (``--labels 0``: the probe alone)."""
    return all(r.get("finetune") for r in results["seeds"].values())


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per metric: :func:`spreads` over (init seed, subset); no fine-tune keys for a probe-only
    file."""
    probe = {s: r["linear-probe"] for s, r in results["seeds"].items()}
    out = {
        "probe-test": spreads(probe, "accuracy"),
        "probe-train": spreads(probe, "train_accuracy"),
    }
    if not has_finetune(results):
        return out
    fine = {s: r["finetune"]["subsets"] for s, r in results["seeds"].items()}
    val = {
        s: [{"val": row["val_accuracy"].get(repr(row["lr"]), math.nan)} for row in rows]
        for s, rows in fine.items()
    }
    return {
        "finetune-test": spreads(fine, "accuracy"),
        "finetune-train": spreads(fine, "train_accuracy"),
        "finetune-val": spreads(val, "val"),
        **out,
    }


def _pct(value: float) -> str:
    """A fraction in percent, one decimal; "-" where undefined (a spread of one value)."""
    return "-" if math.isnan(value) else f"{100 * value:.1f}"


def _recipe_note(protocol: dict[str, Any]) -> list[str]:
    """Where the page measures another recipe than today's default fine-tune, it says so."""
    today = resolve_config().eval

    def recipe(epochs: int, head_norm: str, augment: bool) -> str:
        flips = "crop + flip" if augment else "no crop + flip"
        return f"{epochs} epochs, head norm {head_norm}, {flips}"

    # ``protocol`` is upgraded (load_results): keys a file predates hold FORMER_PROTOCOL's values.
    measured = recipe(protocol["finetune-epochs"], protocol["finetune-head-norm"],
                      protocol["finetune-augment"])  # fmt: skip
    default = recipe(today.finetune_epochs, str(today.finetune_head_norm), today.finetune_augment)
    notes = []
    if not protocol["finetune-labels"]:
        notes += [
            "**Probe only** (`--labels 0`): no fine-tune is measured here. The fine-tune's noise "
            "floor under today's recipe is the random-init row of docs/results.md (one backbone "
            "per init seed x 3 label subsets, the grid's own protocol); a 15-epoch, bare-head "
            "floor measured earlier is in git history (`git show fcc2556:docs/eval-protocol.md`).",
            "",
        ]
    elif measured != default:
        notes += [
            f"**Not today's fine-tune recipe**: measured with {measured}; the default is now "
            f"{default}. That recipe's noise floor under the grid's protocol is the random-init "
            "row of docs/results.md (one backbone per init seed x 3 label subsets).",
            "",
        ]
    probe_lrs = protocol["probe-lr-grid"]
    if list(probe_lrs) != list(today.probe_lrs):
        notes += [
            f"**Not today's probe**: measured at lr {', '.join(map(str, probe_lrs))}; runs now "
            f"choose the probe's lr from {today.probe_lr_grid} on a validation share "
            "(docs/probe-lr.md), whose noise floor is not measured here.",
            "",
        ]
    return notes


def _table(summary: dict[str, Any]) -> list[str]:
    rows = [
        "| metric | mean ± std (all runs) | min - max | std of the init-seed means | "
        "std of the subset means | mean std over subsets (one seed) | mean std over seeds "
        "(one subset) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {
        "finetune-test": "fine-tune, test top-1",
        "finetune-train": "fine-tune, train top-1",
        "finetune-val": "fine-tune, validation top-1 (kept lr)",
        "probe-test": "linear probe, test top-1",
        "probe-train": "linear probe, train top-1",
    }
    for key, name in names.items():
        if key not in summary:
            continue
        s = summary[key]
        rows.append(
            f"| {name} | {_pct(s['mean'])} ± {_pct(s['std'])} | {_pct(s['min'])} - "
            f"{_pct(s['max'])} | {_pct(s['std-of-seed-means'])} | "
            f"{_pct(s['std-of-subset-means'])} | {_pct(s['mean-std-over-subsets'])} | "
            f"{_pct(s['mean-std-over-seeds'])} |"
        )
    return rows


def _grid_rows(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    probe_grid = summary["probe-test"]["grid"]
    subsets = len(probe_grid[0])
    rows = ["| init seed | " + " | ".join(f"subset {k}" for k in range(subsets)) + " |",
            "|---|" + "---|" * subsets]  # fmt: skip
    tune_grid = summary["finetune-test"]["grid"] if "finetune-test" in summary else None
    for i, (seed, probe) in enumerate(zip(results["seeds"], probe_grid, strict=True)):
        if tune_grid is None:
            cells = [_pct(p) for p in probe]
        else:
            cells = [f"{_pct(t)} / {_pct(p)}" for t, p in zip(tune_grid[i], probe, strict=True)]
        rows.append(f"| {seed} | " + " | ".join(cells) + " |")
    return rows


def plot(results: dict[str, Any], summary: dict[str, Any], path: Path) -> None:
    panels = [(k, t) for k, t in (("finetune-test", "fine-tune (protocol)"),
                                  ("probe-test", "linear probe")) if k in summary]  # fmt: skip
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for seed, row in zip(results["seeds"], summary[key]["grid"], strict=True):
            ax.plot(range(len(row)), [100 * v for v in row], marker="o", label=f"init seed {seed}")
        mean = 100 * summary[key]["mean"]
        std = 100 * summary[key]["std"]
        ax.axhspan(mean - std, mean + std, color="grey", alpha=0.2, label="mean ± std")
        ax.set(xlabel="label subset", ylabel="test top-1 (%)", title=title)
        ax.set_xticks(range(len(summary[key]["grid"][0])))
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def _selection(results: dict[str, Any]) -> list[str]:
    """How the validation share chose: the lr kept per run, the mean validation top-1 per lr,
    and how far the kept run's validation top-1 sits from its test top-1."""
    if not has_finetune(results):
        return []
    rows = [row for r in results["seeds"].values() for row in r["finetune"]["subsets"]]
    if not any(row["val_accuracy"] for row in rows):
        return []
    kept = {lr: sum(row["lr"] == lr for row in rows) for lr in results["protocol"]["lr-grid"]}
    per_lr = {lr: statistics.fmean(row["val_accuracy"][repr(lr)] for row in rows) for lr in kept}
    gaps = [row["val_accuracy"][repr(row["lr"])] - row["accuracy"] for row in rows]
    return [
        "- Selection on validation: kept lr "
        + ", ".join(f"{lr:g} in {n} of {len(rows)} runs" for lr, n in kept.items())
        + "; mean validation top-1 per lr "
        + ", ".join(f"{lr:g}: {_pct(v)} %" for lr, v in per_lr.items())
        + f". Validation ({rows[0]['val_labels']} images) minus test top-1 of the kept model: "
        f"mean {_pct(statistics.fmean(gaps))}, from {_pct(min(gaps))} to {_pct(max(gaps))} "
        "points.",
    ]


def _probe_selection(results: dict[str, Any]) -> list[str]:
    """Which probe lr the validation share kept, per run (files from before the grid: none)."""
    rows = [row for r in results["seeds"].values() for row in r["linear-probe"]]
    if not all(row.get("val_accuracy") for row in rows):
        return []
    lrs = sorted({float(lr) for row in rows for lr in row["val_accuracy"]})
    kept = ", ".join(f"{lr:g} in {sum(row['lr'] == lr for row in rows)}" for lr in lrs)
    return [f"- Probe lr kept by validation top-1: {kept} of {len(rows)} runs."]


def _probe_findings(results: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    probe = summary["probe-test"]
    k = results["protocol"]["subsets"]
    return [
        *_probe_selection(results),
        f"- One probe's test top-1 varies with std {_pct(probe['std'])} points over all runs. "
        f"A difference between two backbones' single probes (one per run, as the grid scores "
        f"them) smaller than about 2 x std x sqrt(2) = {_pct(2 * probe['std'] * 2**0.5)} points "
        f"is not shown by this protocol (means over {k} subsets each: "
        f"{_pct(2 * probe['std'] * (2 / k) ** 0.5)}).",
        f"- Every run is scored on the same {results['protocol']['test-images']} test images, "
        "so these spreads leave out the test set's own sampling noise (binomial std at the "
        f"probe's mean accuracy: {_pct(_binomial_std(probe['mean'], results))} points).",
    ]


def _findings(results: dict[str, Any], summary: dict[str, Any], asked: int) -> list[str]:
    """Statements the numbers support, computed from them (none typed in by hand)."""
    probe = summary["probe-test"]
    k = results["protocol"]["subsets"]
    seeds = len(results["seeds"])
    measured = [
        f"- Measured: {seeds} of {asked} init seeds x {k} subsets"
        + ("." if seeds >= asked else " (**partial**: the rest was not measured in time)."),
    ]
    if "finetune-test" not in summary:
        return measured + _probe_findings(results, summary)
    tune, train = summary["finetune-test"], summary["finetune-train"]
    floor = 2 * tune["std"] * (2 / k) ** 0.5
    return [
        *measured,
        f"- Fine-tune train top-1 (un-augmented training part, eval mode) is "
        f"{_pct(train['min'])} - {_pct(train['max'])} %: it "
        + (
            "reaches ~100 %."
            if train["min"] >= 0.99
            else "does **not** reach ~100 %: the fine-tune under-fits a random-init backbone "
            "in this schedule, so these spreads are those of an under-trained fine-tune."
        ),
        *_selection(results),
        f"- One fine-tune's test top-1 varies with std {_pct(tune['std'])} points over all runs "
        f"(linear probe: {_pct(probe['std'])}). A difference between two backbones' means over "
        f"{k} subsets each smaller than about 2 x std x sqrt(2/{k}) = {_pct(floor)} points "
        f"(probe: {_pct(2 * probe['std'] * (2 / k) ** 0.5)}) is not shown by this protocol; "
        f"for single fine-tunes (one subset each) the bound is 2 x std x sqrt(2) = "
        f"{_pct(2 * tune['std'] * 2**0.5)} points.",
        f"- Every run is scored on the same {results['protocol']['test-images']} test images, "
        "so these spreads leave out the test set's own sampling noise (binomial std at the "
        f"fine-tune's mean accuracy: {_pct(_binomial_std(tune['mean'], results))} points).",
    ]


def _binomial_std(accuracy: float, results: dict[str, Any]) -> float:
    """Std of a top-1 on ``test-images`` independent images at ``accuracy`` (0 = all: nan)."""
    return math.sqrt(accuracy * (1 - accuracy) / (results["protocol"]["test-images"] or math.nan))


def _finetune_setup(p: dict[str, Any]) -> str:
    if not p["finetune-labels"]:
        return ""
    return (
        f"Fine-tune: {p['subsets']} disjoint subsets of {p['finetune-labels']} training images "
        f"(subset seed {p['subset-seed']}, the same for every init seed), "
        f"{_pct(p['val-fraction'])} % of each held out for validation, lr kept by validation "
        f"top-1 from {p['lr-grid']}, {p['finetune-epochs']} epochs, recipe "
        # Files from before the key existed were measured with a bare linear head.
        f"{p['finetune-recipe']}, head norm {p.get('finetune-head-norm', 'none')}; the kept "
        "model alone is scored on the test images. "
    )


def _probe_lr_setup(p: dict[str, Any]) -> str:
    lrs = p.get("probe-lr-grid", [0.1])  # files from before the grid probed at lr 0.1 alone
    if len(lrs) == 1:
        return f"lr {lrs[0]:g}"
    return (
        f"lr kept by validation top-1 from {', '.join(f'{lr:g}' for lr in lrs)} "
        f"({_pct(p.get('probe-val-fraction', 0.0))} % of each subset held out)"
    )


def _run_keys_note(p: dict[str, Any]) -> str:
    """How a run's own evaluation matches what this page measured."""
    if not p["finetune-labels"]:
        return (
            "A run probes its backbones the same way (eval keys `probe-train-images`, "
            "`probe-epochs`, `probe-lr-grid`, `probe-val-fraction`), once per backbone, on a "
            "subset drawn with its seed."
        )
    return (
        "A run evaluates its backbones the same way with the eval keys `finetune-subsets`, "
        "`finetune-val-fraction` and `finetune-lr-grid` (`preset='full-eval'` sets all three); "
        "its summary's fine-tune entries then carry `accuracy` (the mean over subsets), "
        "`accuracy_std` and `subsets`."
    )


def write_report(
    results: dict[str, Any], command: str, asked: int, docs: Path, source: Path
) -> Path:
    """``docs/eval-protocol.md`` and ``.png`` from the results file (``source``) alone."""
    docs.mkdir(parents=True, exist_ok=True)
    shown = source.resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    summary = summarize(results)
    plot(results, summary, docs / "eval-protocol.png")
    p = results["protocol"]
    seconds = sum(sum(r["seconds"].values()) for r in results["seeds"].values())
    lines = [
        "# The evaluation protocol's noise floor",
        "",
        f"Command: `{command}` (2-core CPU, {p['threads']} torch thread; {seconds / 60:.0f} min "
        f"measured). Numbers: `{shown}`; this page is written from it.",
        "",
        f"Backbones: random init (a `random-init` run's backbone, default model: depth "
        f"{p['model']['depth']}, width {p['model']['embed_dim']}, patch {p['model']['patch_size']}"
        f") at init seeds {', '.join(results['seeds'])}, Fashion-MNIST. "
        + _finetune_setup(p)
        + f"Linear probe: {p['subsets']} disjoint subsets of {p['probe-train-images']} images "
        f"(subset seed {p['subset-seed']}, the same for every init seed), {p['probe-epochs']} "
        "epochs, MAE's BatchNorm-without-affine head, "
        + _probe_lr_setup(p)
        + f"; scored on the first {p['test-images']} test images. Top-1 in %; std = sample std.",
        "",
        _run_keys_note(p),
        "",
        *_recipe_note(p),
        *_table(summary),
        "",
        "Each run, "
        + ("fine-tune / probe" if "finetune-test" in summary else "probe")
        + " test top-1:",
        "",
        *_grid_rows(results, summary),
        "",
        *_findings(results, summary, asked),
        "",
        "![eval-protocol.png](eval-protocol.png)",
        "",
    ]
    path = docs / "eval-protocol.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = load_results(args.results, protocol_of(args))
    if not args.report_only:
        data = {"data-path": args.data_path} if args.data_path else {}
        splits = load_dataset(resolve_config(data))
        for seed in args.init_seeds:
            if str(seed) in results["seeds"]:
                continue
            results["seeds"][str(seed)] = measure_seed(seed, splits, args)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=2))
            print(f"[eval-protocol] seed {seed}: {results['seeds'][str(seed)]['seconds']}")
    if not results["seeds"]:
        raise SystemExit(f"no results in {args.results}")
    # The page names the measuring command; --report-only only rewrites it from the file.
    command = command_line("benchmarks.eval_protocol", argv).replace(" --report-only", "")
    path = write_report(results, command.strip(), len(args.init_seeds), args.docs, args.results)
    print(f"[eval-protocol] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
