"""Quality benchmark: FedMAE against its baselines on one budget, side by side.

Every (algorithm, partition, seed) is a real ``flwr run`` of this app on a local SuperLink
(simulation engine, ``NUM_SUPERNODES`` virtual nodes), with one budget for all (``BUDGET``: the
schema defaults of depth K, rounds per stage R, nodes per round and local epochs);
``centralized`` sees the same number of images per round from the pooled set; ``local`` trains
each node alone for the same rounds. ``centralized`` and ``random-init`` do not depend on the
partition: they run once per seed. Finished runs are kept and skipped on a re-run.

    .venv/bin/python -m benchmarks.quality                      # the full grid (make bench-quality)
    .venv/bin/python -m benchmarks.quality --seeds 0 --partitions iid   # a slice

Writes ``docs/results.md`` (tables) and ``docs/results-*.png`` (plots). Runs go to
``outputs/bench-grid/`` (the grid's lighter evaluation protocol, ``GRID_EVALUATION``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    ALGORITHMS,
    BUDGET,
    DOCS,
    EVALUATION,
    EVALUATION_PROTOCOL,
    GRID_EVALUATION,
    NUM_SUPERNODES,
    PARTITION_FREE,
    PARTITIONS,
    ROOT,
    accuracies,
    command_line,
    count_text,
    machine_line,
    mean_std,
    run_variant,
)
from benchmarks.label_efficiency import posthoc_record
from fedmae_flwr.config import default_run_config

# The grid's runs use the lighter GRID_EVALUATION protocol, so they live apart from the other
# studies' runs (outputs/bench/, full protocol).
GRID_OUT_ROOT = ROOT / "outputs" / "bench-grid"

# What the grid is sized for (a target, not a measurement: the report states the time it took).
GRID_MINUTES = 90
GRID_MACHINE = "2 CPU cores"
DEFAULT_SEEDS = (0, 1)
# The backbone every run shares (schema defaults), named in the report.
MODEL: dict[str, Any] = {
    key: default_run_config()[key] for key in ("img-size", "patch-size", "embed-dim")
}

# The grid's short fine-tune ends under-trained (the report states its train and test accuracy),
# so the grid's backbones are also fine-tuned afterwards with the full recipe
# (`make bench-quality-finetune`; each fine-tune's seconds are cached beside its accuracy); the
# report shows it when present.
POSTHOC_FINETUNE_EPOCHS = EVALUATION["finetune-epochs"]
POSTHOC_KEY = "finetune-full-accuracy"
POSTHOC_RECORD = "posthoc-finetune"  # the run's cached post-hoc fine-tune record, if it ran

ACCURACY_LABELS = (
    ("finetune-accuracy", "fine-tune"),
    (POSTHOC_KEY, f"fine-tune {POSTHOC_FINETUNE_EPOCHS} ep"),
    ("linear-probe-accuracy", "probe"),
    ("knn-accuracy", "k-NN"),
)
COST_LABELS = (
    ("client-train-mbytes-peak", "client memory"),
    ("bytes-up-per-client-round", "bytes up per client-round"),
)


def run_one(
    algorithm: str, partition: str, seed: int, out_root: Path, report_only: bool = False
) -> dict[str, Any] | None:
    """One run of the grid (loaded when it finished before; None if report-only and missing)."""
    run = run_variant(algorithm, partition, seed, out_root, "bench-quality", timeout=1800,
                      report_only=report_only, evaluation=GRID_EVALUATION)  # fmt: skip
    if run is not None:
        labels = GRID_EVALUATION["finetune-labels"]
        record = posthoc_record(out_root / run["name"], labels, POSTHOC_FINETUNE_EPOCHS)
        if record is not None:
            run["summary"][POSTHOC_KEY] = {algorithm: record["accuracy"]}
            run[POSTHOC_RECORD] = record
    return run


def grid_size(algorithms: list[str], partitions: list[str], seeds: list[int]) -> int:
    """Runs in a grid: partition-free algorithms once per seed, the others once per partition."""
    per_seed = sum(1 if a in PARTITION_FREE else len(partitions) for a in algorithms)
    return per_seed * len(seeds)


def results_table(grid: dict[tuple[str, str], list[dict]]) -> list[str]:
    labels = count_text(GRID_EVALUATION["finetune-labels"])
    epochs = GRID_EVALUATION["finetune-epochs"]
    lines = [
        f"| algorithm | partition | fine-tune {labels} labels, {epochs} ep "
        f"| fine-tune {labels} labels, {POSTHOC_FINETUNE_EPOCHS} ep | linear probe | k-NN "
        "| masked PSNR (dB) "
        "| client peak train MB | MB up / client-round | MB down / client-round "
        "| client s / round | run wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (algorithm, partition), runs in grid.items():
        comm = runs[0]["summary"]["communication"]
        psnr = [r["summary"]["final-psnr"] for r in runs if r["summary"]["final-psnr"] is not None]
        cells = [
            algorithm,
            partition,
            *(mean_std(accuracies(runs, key, algorithm)) for key, _ in ACCURACY_LABELS),
            f"{statistics.fmean(psnr):.2f}" if psnr else "-",
            f"{comm['client-train-mbytes-peak']:.0f}",
            f"{comm['bytes-up-per-client-round'] / 2**20:.2f}",
            f"{comm['bytes-down-per-client-round'] / 2**20:.2f}",
            f"{comm['client-train-seconds-mean']:.2f}",
            f"{statistics.fmean(r['summary']['wall-seconds'] for r in runs):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparisons(grid: dict[tuple[str, str], list[dict]]) -> list[str]:
    """FedMAE against each other row: accuracy differences (points) and client cost ratios."""

    def mean(runs: list[dict], key: str, algorithm: str) -> float | None:
        values = accuracies(runs, key, algorithm)
        return 100 * statistics.fmean(values) if values else None

    lines = []
    for (algorithm, partition), runs in grid.items():
        if algorithm != "fedmae":
            continue
        ours = runs[0]["summary"]["communication"]
        for (other, other_part), other_runs in grid.items():
            if other == "fedmae" or other_part not in (partition, "pooled"):
                continue
            diffs = []
            for key, label in ACCURACY_LABELS:
                a, b = mean(runs, key, "fedmae"), mean(other_runs, key, other)
                if a is not None and b is not None:
                    diffs.append(f"{label} {a - b:+.1f}")
            theirs = other_runs[0]["summary"]["communication"]
            costs = []
            for key, label in COST_LABELS:
                if theirs[key]:
                    costs.append(f"{label} {ours[key] / theirs[key]:.2f}x")
            lines.append(
                f"- {partition}: fedmae vs {other}: {', '.join(diffs)} points"
                + (f"; {', '.join(costs)}" if costs else "")
            )
    return lines


def plot(grid: dict[tuple[str, str], list[dict]], docs: Path, out_root: Path) -> list[str]:
    """Accuracy against rounds, accuracy against bytes, reconstructions side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    written = []
    partitions = sorted({p for _, p in grid if p != "pooled"}) or ["pooled"]
    fig, axes = plt.subplots(
        1, len(partitions), figsize=(4.5 * len(partitions), 3.6), squeeze=False
    )
    for ax, partition in zip(axes[0], partitions, strict=True):
        for (algorithm, part), runs in grid.items():
            if part not in (partition, "pooled") or algorithm == "random-init":
                continue
            rounds = [row["round"] for row in runs[0]["rows"] if "knn-accuracy" in row]
            series = [
                [row["knn-accuracy"] for row in r["rows"] if "knn-accuracy" in row] for r in runs
            ]
            ax.plot(rounds, [statistics.fmean(v) for v in zip(*series, strict=True)],
                    marker="o", label=algorithm)  # fmt: skip
        floor = [r for (a, _), rs in grid.items() if a == "random-init" for r in rs]
        if floor:
            level = statistics.fmean(accuracies(floor, "knn-accuracy", "random-init"))
            ax.axhline(level, color="0.5", ls="--", label="random-init")
        knn_labels = count_text(GRID_EVALUATION["stage-knn-images"])
        ax.set(
            title=f"{partition}", xlabel="server round", ylabel=f"k-NN top-1 ({knn_labels} labels)"
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "results-accuracy-vs-rounds.png", dpi=110)
    plt.close(fig)
    written.append("results-accuracy-vs-rounds.png")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (algorithm, partition), runs in grid.items():
        if algorithm in PARTITION_FREE:
            continue
        mbytes = statistics.fmean(
            (r["summary"]["communication"]["bytes-up-total"]
             + r["summary"]["communication"]["bytes-down-total"]) / 2**20 for r in runs
        )  # fmt: skip
        acc = statistics.fmean(accuracies(runs, "linear-probe-accuracy", algorithm))
        ax.scatter(mbytes, 100 * acc, label=f"{algorithm} ({partition})")
    ax.set(xlabel="MB communicated over the run (up + down, all clients)",
           ylabel="linear probe top-1 (%)", title="Accuracy against communication")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / "results-accuracy-vs-bytes.png", dpi=110)
    plt.close(fig)
    written.append("results-accuracy-vs-bytes.png")

    pictures = [
        (algorithm, runs[0])
        for (algorithm, partition), runs in grid.items()
        if partition in ("iid", "pooled") and runs[0]["summary"]["stages"]
    ]
    if pictures:
        fig, axes = plt.subplots(1, len(pictures), figsize=(3.2 * len(pictures), 6), squeeze=False)
        for ax, (algorithm, r) in zip(axes[0], pictures, strict=True):
            last = len(r["summary"]["stages"]) - 1
            image = out_root / r["name"] / "reconstructions"
            ax.imshow(mpimg.imread(image / f"stage-{last}.png"))
            ax.set_title(algorithm, fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(docs / "results-reconstructions.png", dpi=110)
        plt.close(fig)
        written.append("results-reconstructions.png")
    return written


def finetune_caveat(grid: dict[tuple[str, str], list[dict]]) -> list[str]:
    """How far the grid's short fine-tune got: its mean train and test accuracy."""
    results = [
        r
        for runs in grid.values()
        for run in runs
        for r in run["summary"].get("downstream", {}).get("finetune", {}).values()
    ]
    if not results:
        return []
    train = 100 * statistics.fmean(r["train_accuracy"] for r in results)
    test = 100 * statistics.fmean(r["accuracy"] for r in results)
    return [
        f"The grid's {GRID_EVALUATION['finetune-epochs']}-epoch fine-tune is under-trained: it "
        f"ends at {train:.0f} % train accuracy on average ({test:.0f} % test), and its spread "
        "over seeds is wide, so rank backbones by the probe, k-NN and the "
        f"{POSTHOC_FINETUNE_EPOCHS}-epoch column: the same backbones fine-tuned afterwards with "
        f"the full recipe (`make bench-quality-finetune`{posthoc_cost(grid)}; '-' where that "
        "has not run).",
        "",
    ]


def posthoc_cost(grid: dict[tuple[str, str], list[dict]]) -> str:
    """``", 28 min on <machine>"``: the post-hoc fine-tunes' cached seconds, summed ('' if none).

    The machine is named when every cached record names the same one; the count of backbones
    when not all of the grid's have a timed fine-tune.
    """
    runs = [r for runs in grid.values() for r in runs]
    records = [r[POSTHOC_RECORD] for r in runs if POSTHOC_RECORD in r]
    seconds = [rec["seconds"] for rec in records if "seconds" in rec]
    if not seconds:
        return ""
    machines = {rec.get("machine") for rec in records}
    where = f" on {machines.pop()}" if len(machines) == 1 and None not in machines else ""
    some = "" if len(seconds) == len(runs) else f" for {len(seconds)} of {len(runs)} backbones"
    return f", {sum(seconds) / 60:.0f} min{some}{where}"


def startup_text(runs: list[dict]) -> str:
    """``", plus 15 s start-up per run"``: mean `flwr run` time beyond the ServerApp's.

    From the runs the harness timed (its ``bench-run.json``); '' when it timed none.
    """
    extra = [
        r["bench"]["flwr-run-seconds"] - r["summary"]["wall-seconds"]
        for r in runs
        if "flwr-run-seconds" in r.get("bench", {})
    ]
    if not extra:
        return ""
    timed = "" if len(extra) == len(runs) else f" ({len(extra)} of {len(runs)} runs timed)"
    return f", plus {statistics.fmean(extra):.0f} s start-up per run{timed}"


def write_report(
    grid: dict[tuple[str, str], list[dict]],
    command: str,
    docs: Path,
    out_root: Path,
    full_grid: bool = True,
) -> Path:
    """``docs/results.md`` with the table and the plots of the runs in ``grid``."""
    docs.mkdir(parents=True, exist_ok=True)
    pictures = plot(grid, docs, out_root)
    seeds = sorted({r["seed"] for runs in grid.values() for r in runs})
    # Runs are resumable, so the harness' own clock can miss finished ones: sum the runs.
    every_run = [r for runs in grid.values() for r in runs]
    seconds = sum(r["summary"]["wall-seconds"] for r in every_run)
    full_size = grid_size(list(ALGORITHMS), list(PARTITIONS), list(DEFAULT_SEEDS))
    lines = [
        "# FedMAE against its baselines",
        "",
        f"Command: `{command}` ({len(grid)} rows, seeds {seeds}; the runs' ServerApp wall "
        f"time adds up to {seconds / 60:.0f} min{startup_text(every_run)}, on "
        f"{machine_line()}).",
        "",
        *(
            []
            if full_grid
            else [
                f"**A slice of the full grid** (`make bench-quality`: {len(PARTITIONS)} partitions "
                f"x {len(DEFAULT_SEEDS)} seeds): "
                "read single-seed numbers as indicative only.",
                "",
            ]
        ),
        "Budget, the same for every algorithm: Fashion-MNIST "
        f"({MODEL['img-size']}x{MODEL['img-size']}, patch {MODEL['patch-size']}, ViT width "
        f"{MODEL['embed-dim']}), "
        + ", ".join(f"{k}={v}" for k, v in BUDGET.items())
        + f", {NUM_SUPERNODES} nodes. `centralized` trains one model on the pooled set with the "
        "same images per round; `local` trains a node alone for the same rounds "
        f"({GRID_EVALUATION['local-clients']} node per run, so its spread is over seeds and "
        "nodes); `random-init` is the untrained backbone.",
        "",
        "Evaluation, the same for every backbone: "
        + ", ".join(
            f"{k}={v}"
            for k, v in GRID_EVALUATION.items()
            if k not in ("evaluate-random-init", "local-clients")
        )
        + f" ({EVALUATION_PROTOCOL}). This is the grid's lighter protocol (a "
        f"{GRID_EVALUATION['finetune-epochs']}-epoch fine-tune, "
        f"{GRID_EVALUATION['test-images']:,} test images), chosen so that the {full_size} runs "
        f"fit {GRID_MINUTES} minutes on {GRID_MACHINE}; the budget study and the ablations use "
        f"the full one ({EVALUATION['finetune-epochs']} epochs, {EVALUATION['test-images']:,} "
        "test images), so their numbers are not comparable with this table's.",
        "",
        *finetune_caveat(grid),
        "Accuracies are top-1 in %, mean ± standard deviation over seeds.",
        "",
        *results_table(grid),
        "",
        "FedMAE against each baseline (accuracy differences in points, positive = FedMAE "
        "ahead; cost ratios FedMAE / baseline, measured in the same runs):",
        "",
        *comparisons(grid),
        "",
        *[f"![{p}]({p})" for p in pictures],
        "",
    ]
    path = docs / "results.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=PARTITIONS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--out", type=Path, default=GRID_OUT_ROOT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from finished runs only"
    )
    args = parser.parse_args(argv)
    grid: dict[tuple[str, str], list[dict]] = {}
    for seed in args.seeds:
        for algorithm in args.algorithms:
            partitions = ["iid"] if algorithm in PARTITION_FREE else args.partitions
            for partition in partitions:
                key = (algorithm, "pooled" if algorithm in PARTITION_FREE else partition)
                run = run_one(algorithm, partition, seed, args.out, args.report_only)
                if run is not None:
                    grid.setdefault(key, []).append(run)
    # A report-only pass (after bench-quality-finetune, say) reports the grid's own command.
    command = command_line("benchmarks.quality", argv).replace(" --report-only", "")
    expected = grid_size(args.algorithms, args.partitions, args.seeds)
    done = sum(len(runs) for runs in grid.values())
    full_grid = (
        set(args.algorithms) == set(ALGORITHMS)
        and set(args.partitions) == set(PARTITIONS)
        and len(set(args.seeds)) >= len(DEFAULT_SEEDS)
        and done == expected
    )
    path = write_report(grid, command.strip(), args.docs, args.out, full_grid)
    print(f"[bench-quality] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
