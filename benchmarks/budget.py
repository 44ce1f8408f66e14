"""Does pretraining pay? FedMAE's downstream accuracy against its pretraining budget.

The budget is the local epochs each block is trained for: rounds per stage (R) x local epochs
per round (E), at the quality benchmark's federation (``NUM_SUPERNODES`` nodes; ``FEDERATION``:
the schema defaults of nodes per round and blocks K; IID unless ``--partition``). Every budget
is a real ``flwr run``; the random-init backbone of the same shape, evaluated with the same
protocol and seed, is the floor a pretrained backbone must beat. Runs are shared with the other
benchmarks under ``outputs/bench/`` (see harness).

    .venv/bin/python -m benchmarks.budget                         # R x E in DEFAULT_BUDGETS
    .venv/bin/python -m benchmarks.budget --budgets 5x1 20x4 --seeds 0 1

Writes ``docs/budget.md`` and ``docs/budget-accuracy.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    BUDGET,
    EVALUATION,
    EVALUATION_PROTOCOL,
    NUM_SUPERNODES,
    PROTOCOLS,
    accuracies,
    accuracy,
    add_run_arguments,
    command_line,
    machine_line,
    mean_std,
    pyplot,
    run_variant,
    save_figure,
)

FEDERATION: dict[str, Any] = {k: BUDGET[k] for k in ("depth", "clients-per-round")}
DEFAULT_BUDGETS = ("5x1", "5x2", "5x4", "10x4")


def parse_budget(text: str) -> tuple[int, int]:
    """``"RxE"`` -> (rounds per stage, local epochs); a clear error otherwise."""
    try:
        rounds, epochs = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"budget {text!r} is not RxE (rounds per stage x local epochs, e.g. 5x2)"
        ) from None
    if rounds < 1 or epochs < 1:
        raise argparse.ArgumentTypeError(f"budget {text!r}: R and E must both be >= 1")
    return rounds, epochs


def budget_runs(
    budgets: list[tuple[int, int]],
    seeds: list[int],
    partition: str,
    out_root: Path,
    report_only: bool = False,
) -> tuple[dict[tuple[int, int], list[dict]], list[dict]]:
    """Run (or load) fedmae at every budget and random-init once per seed."""
    floor = []
    by_budget: dict[tuple[int, int], list[dict]] = {}
    for seed in seeds:
        run = run_variant("random-init", partition, seed, out_root, "bench-budget",
                          report_only=report_only)  # fmt: skip
        if run is not None:
            floor.append(run)
        for rounds, epochs in budgets:
            changes = {"rounds-per-stage": rounds, "local-epochs": epochs}
            run = run_variant("fedmae", partition, seed, out_root, "bench-budget", changes,
                              timeout=3 * 3600, report_only=report_only)  # fmt: skip
            if run is not None:
                by_budget.setdefault((rounds, epochs), []).append(run)
    return by_budget, floor


def _budget_order(by_budget: dict) -> list[tuple[int, int]]:
    """Budgets by total local epochs R x E, ties by (R, E)."""
    return sorted(by_budget, key=lambda b: (b[0] * b[1], b))


def paired_differences(runs: list[dict], floor: list[dict], key: str) -> list[float]:
    """fedmae minus random-init accuracy under ``key``, seed by seed (seeds both have)."""
    floor_by_seed = {r["seed"]: accuracy(r, key, "random-init") for r in floor}
    return [
        a - b
        for r in runs
        if (a := accuracy(r, key, "fedmae")) is not None
        and (b := floor_by_seed.get(r["seed"])) is not None
    ]


def smallest_paying_budget(
    by_budget: dict[tuple[int, int], list[dict]], floor: list[dict], key: str
) -> tuple[int, int] | None:
    """The smallest R x E at which fedmae beats random init under ``key`` at every seed.

    Each seed is compared with random init of the same seed (same init draw, label subset and
    fine-tuning seed): the seed-to-seed spread of a 1k-label fine-tune is larger than the effect.
    """
    for budget in _budget_order(by_budget):
        diffs = paired_differences(by_budget[budget], floor, key)
        if diffs and all(d > 0 for d in diffs):
            return budget
    return None


def _signed(diffs: list[float]) -> str:
    """Mean paired difference in points, with its spread over seeds."""
    if not diffs:
        return "-"
    mean = 100 * statistics.fmean(diffs)
    spread = f" ± {100 * statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    return f"{mean:+.1f}{spread}"


def plot(by_budget: dict, floor: list[dict], path: Path) -> None:
    plt = pyplot()
    budgets = _budget_order(by_budget)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (key, label), color in zip(PROTOCOLS, ("C0", "C1", "C2"), strict=True):
        means = [
            100 * statistics.fmean(accuracy(r, key, "fedmae") for r in by_budget[b])
            for b in budgets
        ]
        xs = [r * e for r, e in budgets]
        ax.plot(xs, means, marker="o", color=color, label=f"fedmae {label}")
        floor_values = accuracies(floor, key, "random-init")
        if floor_values:
            ax.axhline(100 * statistics.fmean(floor_values), color=color, ls="--", lw=1,
                       label=f"random-init {label}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks([r * e for r, e in budgets], [f"{r}x{e}" for r, e in budgets])
    ax.set(
        xlabel="local epochs per block (rounds per stage x local epochs)",
        ylabel="top-1 (%)",
        title=f"Does pretraining pay? (Fashion-MNIST, {NUM_SUPERNODES} nodes)",
    )
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _table_header(floor: list[dict], command: str, partition: str) -> list[str]:
    """Title, command, setup paragraph, and the table's head and random-init floor row."""
    floor_cells = [mean_std(accuracies(floor, key, "random-init")) for key, _ in PROTOCOLS]
    return [
        "# Does pretraining pay? Accuracy against the pretraining budget",
        "",
        f"Command: `{command}` ({machine_line()}).",
        "",
        f"FedMAE on Fashion-MNIST, {partition} over {NUM_SUPERNODES} nodes, "
        + ", ".join(f"{k}={v}" for k, v in FEDERATION.items())
        + "; budget R x E = rounds per stage x local epochs per round, i.e. the local epochs "
        "each block is trained for. Evaluation, the same for every backbone: "
        + ", ".join(f"{k}={v}" for k, v in EVALUATION.items() if k != "evaluate-random-init")
        + f" ({EVALUATION_PROTOCOL}). Top-1 in %, mean ± std over seeds.",
        "",
        "| budget R x E | server rounds | "
        + " | ".join(label for _, label in PROTOCOLS)
        + " | masked PSNR (dB) | client s (run total) | run wall s "
        "| vs random init, same seed: fine-tune / probe / k-NN (points) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| random-init (floor) | 0 | {' | '.join(floor_cells)} | - | 0 | - | - |",
    ]


def _budget_row(rounds: int, epochs: int, runs: list[dict], floor: list[dict]) -> str:
    """The table row of one budget: accuracies, PSNR, client and wall time, paired gains."""
    comm = runs[0]["summary"]["communication"]
    client_seconds = comm["client-train-seconds-mean"] * rounds * FEDERATION["depth"]
    cells = [
        f"{rounds} x {epochs}",
        str(rounds * FEDERATION["depth"]),
        *(mean_std(accuracies(runs, key, "fedmae")) for key, _ in PROTOCOLS),
        f"{statistics.fmean(r['summary']['final-psnr'] for r in runs):.2f}",
        f"{client_seconds:.0f}",
        f"{statistics.fmean(r['summary']['wall-seconds'] for r in runs):.0f}",
        " / ".join(_signed(paired_differences(runs, floor, key)) for key, _ in PROTOCOLS),
    ]
    return "| " + " | ".join(cells) + " |"


def _verdicts(by_budget: dict, floor: list[dict]) -> list[str]:
    """Per protocol, the smallest budget that beats random init at every seed."""
    lines = [
        "",
        "Smallest measured budget at which FedMAE beats random init at every seed (each seed "
        "against random init of the same seed):",
        "",
    ]
    for key, label in PROTOCOLS:
        budget = smallest_paying_budget(by_budget, floor, key)
        if budget:
            seeds = sorted(r["seed"] for r in by_budget[budget])
            verdict = f"{budget[0]} x {budget[1]} (seeds {seeds})"
        else:
            verdict = "none of the measured budgets"
        lines.append(f"- {label}: {verdict}")
    return lines


def write_report(
    by_budget: dict, floor: list[dict], command: str, partition: str, docs: Path
) -> Path:
    """Write ``docs/budget.md`` (table and verdicts) and its figure; returns the page's path."""
    docs.mkdir(parents=True, exist_ok=True)
    plot(by_budget, floor, docs / "budget-accuracy.png")
    lines = _table_header(floor, command, partition)
    for rounds, epochs in _budget_order(by_budget):
        lines.append(_budget_row(rounds, epochs, by_budget[(rounds, epochs)], floor))
    lines += _verdicts(by_budget, floor)
    lines += ["", "![budget-accuracy.png](budget-accuracy.png)", ""]
    path = docs / "budget.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", type=parse_budget,
                        default=[parse_budget(b) for b in DEFAULT_BUDGETS])  # fmt: skip
    add_run_arguments(parser, seeds=[0])
    args = parser.parse_args(argv)
    by_budget, floor = budget_runs(
        args.budgets, args.seeds, args.partition, args.out, args.report_only
    )
    command = command_line("benchmarks.budget", argv)
    path = write_report(by_budget, floor, command.strip(), args.partition, args.docs)
    print(f"[bench-budget] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
