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
``outputs/bench-grid/`` (the grid's lighter evaluation protocol, ``GRID_EVALUATION``). This
module writes the report; the runs are ``benchmarks.quality_grid``'s, the plots
``benchmarks.quality_plots``'.
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
    EVALUATION,
    EVALUATION_PROTOCOL,
    GRID_EVALUATION,
    NUM_SUPERNODES,
    PARTITIONS,
    accuracies,
    add_run_arguments,
    command_line,
    count_text,
    machine_line,
    mean_std,
)
from benchmarks.quality_grid import (
    DEFAULT_SEEDS,
    GRID_MACHINE,
    GRID_MINUTES,
    GRID_OUT_ROOT,
    POSTHOC_FINETUNE_EPOCHS,
    POSTHOC_KEY,
    POSTHOC_RECORD,
    Grid,
    grid_size,
    is_full_grid,
    run_grid,
)
from benchmarks.quality_plots import plot
from fedmae_flwr.config import default_run_config

# The backbone every run shares (schema defaults), named in the report.
MODEL: dict[str, Any] = {
    key: default_run_config()[key] for key in ("img-size", "patch-size", "embed-dim")
}

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


def results_table(grid: Grid) -> list[str]:
    """One row per (algorithm, partition): accuracies over seeds, PSNR, client costs, time."""
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


def comparisons(grid: Grid) -> list[str]:
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


def finetune_caveat(grid: Grid) -> list[str]:
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


def posthoc_cost(grid: Grid) -> str:
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
    grid: Grid, command: str, docs: Path, out_root: Path, full_grid: bool = True
) -> Path:
    """``docs/results.md`` with the table and the plots of the runs in ``grid``."""
    docs.mkdir(parents=True, exist_ok=True)
    pictures = plot(grid, docs, out_root)
    lines = [
        "# FedMAE against its baselines",
        "",
        command_text(grid, command),
        "",
        *([] if full_grid else slice_warning()),
        budget_text(),
        "",
        evaluation_text(),
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


def command_text(grid: Grid, command: str) -> str:
    """The command, the rows and seeds, and the time the runs took on which machine."""
    seeds = sorted({r["seed"] for runs in grid.values() for r in runs})
    # Runs are resumable, so the harness' own clock can miss finished ones: sum the runs.
    every_run = [r for runs in grid.values() for r in runs]
    seconds = sum(r["summary"]["wall-seconds"] for r in every_run)
    return (
        f"Command: `{command}` ({len(grid)} rows, seeds {seeds}; the runs' ServerApp wall "
        f"time adds up to {seconds / 60:.0f} min{startup_text(every_run)}, on "
        f"{machine_line()})."
    )


def slice_warning() -> list[str]:
    """The paragraph that marks a report of less than the full grid."""
    return [
        f"**A slice of the full grid** (`make bench-quality`: {len(PARTITIONS)} partitions "
        f"x {len(DEFAULT_SEEDS)} seeds): "
        "read single-seed numbers as indicative only.",
        "",
    ]


def budget_text() -> str:
    """The budget every algorithm gets, and what the non-federated rows are."""
    return (
        "Budget, the same for every algorithm: Fashion-MNIST "
        f"({MODEL['img-size']}x{MODEL['img-size']}, patch {MODEL['patch-size']}, ViT width "
        f"{MODEL['embed-dim']}), "
        + ", ".join(f"{k}={v}" for k, v in BUDGET.items())
        + f", {NUM_SUPERNODES} nodes. `centralized` trains one model on the pooled set with the "
        "same images per round; `local` trains a node alone for the same rounds "
        f"({GRID_EVALUATION['local-clients']} node per run, so its spread is over seeds and "
        "nodes); `random-init` is the untrained backbone."
    )


def evaluation_text() -> str:
    """The grid's evaluation protocol, and why it is lighter than the other studies'."""
    full_size = grid_size(list(ALGORITHMS), list(PARTITIONS), list(DEFAULT_SEEDS))
    return (
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
        "test images), so their numbers are not comparable with this table's."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=PARTITIONS)
    add_run_arguments(parser, list(DEFAULT_SEEDS), partition=False, out=GRID_OUT_ROOT)
    args = parser.parse_args(argv)
    grid = run_grid(args.algorithms, args.partitions, args.seeds, args.out, args.report_only)
    # A report-only pass (after bench-quality-finetune, say) reports the grid's own command.
    command = command_line("benchmarks.quality", argv).replace(" --report-only", "")
    full_grid = is_full_grid(grid, args.algorithms, args.partitions, args.seeds)
    path = write_report(grid, command.strip(), args.docs, args.out, full_grid)
    print(f"[bench-quality] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
