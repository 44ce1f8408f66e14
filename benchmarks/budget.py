"""Does pretraining pay? FedMAE's downstream accuracy against its pretraining budget.

The budget is the local epochs each block is trained for: rounds per stage (R) x local epochs
per round (E), at the quality benchmark's federation (``NUM_SUPERNODES`` nodes; ``FEDERATION``:
the schema defaults of nodes per round and blocks K; IID unless ``--partition``). Every budget
is a real ``flwr run``; the random-init backbone of the same shape, evaluated with the same
protocol and seed, is the floor a pretrained backbone must beat. The runs use the quality grid's
evaluation (``GRID_EVALUATION``: probe, k-NN, PSNR) and folder (``outputs/bench-grid/``: its
reference run is the budget 5 x 1, its random-init runs the floor); each run's exported backbone
is then fine-tuned under ``FINETUNE_PROTOCOL`` (``benchmarks.grid_finetune``, cached beside the
run). FedMAE is compared with random init seed by seed under docs/results.md's verdict rule
(``benchmarks.quality.verdict``).

    .venv/bin/python -m benchmarks.budget                         # R x E in DEFAULT_BUDGETS
    .venv/bin/python -m benchmarks.budget --budgets 5x1 20x4 --seeds 0 1

Writes ``docs/budget.md`` and ``docs/budget-accuracy.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import quality, run_archive
from benchmarks.grid_finetune import finetune_run
from benchmarks.harness import (
    BUDGET,
    EVALUATION_PROTOCOL,
    FINETUNE_PROTOCOL,
    GRID_EVALUATION,
    NUM_SUPERNODES,
    accuracies,
    add_run_arguments,
    command_line,
    machines_text,
    mean_std,
    pyplot,
    run_machines,
    run_variant,
    save_figure,
)
from benchmarks.quality import ACCURACY_LABELS
from benchmarks.quality_grid import (
    FINETUNE_KEY,
    GRID_OUT_ROOT,
    Grid,
    with_finetune,
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
    finetune: bool = True,
) -> tuple[dict[tuple[int, int], list[dict]], list[dict]]:
    """Run (or load) fedmae at every budget and random-init once per seed; each run's backbone
    fine-tuned after it unless ``finetune`` is False (then only what is cached is read)."""
    floor = []
    by_budget: dict[tuple[int, int], list[dict]] = {}
    for seed in seeds:
        run = _run("random-init", partition, seed, out_root, {}, report_only, finetune)
        if run is not None:
            floor.append(run)
        for rounds, epochs in budgets:
            changes = {"rounds-per-stage": rounds, "local-epochs": epochs}
            run = _run("fedmae", partition, seed, out_root, changes, report_only, finetune)
            if run is not None:
                by_budget.setdefault((rounds, epochs), []).append(run)
    return by_budget, floor


def _run(
    algorithm: str,
    partition: str,
    seed: int,
    out_root: Path,
    changes: dict[str, Any],
    report_only: bool,
    finetune: bool = True,
) -> dict | None:
    """One run under the grid's protocol (``GRID_EVALUATION``), then its backbone fine-tuned
    under ``FINETUNE_PROTOCOL`` (``benchmarks.grid_finetune``, cached beside the run; not with
    ``report_only``, which reads the cache only)."""
    run = run_variant(algorithm, partition, seed, out_root, "bench-budget", changes,
                      timeout=3 * 3600, report_only=report_only,
                      evaluation=GRID_EVALUATION)  # fmt: skip
    if run is None:
        return None
    if finetune and not report_only:
        record, fresh = finetune_run(out_root / run["name"])
        if fresh:
            print(f"[bench-budget] {run['name']}: protocol fine-tune in "
                  f"{record['seconds']:.0f} s", flush=True)  # fmt: skip
    return with_finetune(run, out_root)


def _budget_order(by_budget: dict) -> list[tuple[int, int]]:
    """Budgets by total local epochs R x E, ties by (R, E)."""
    return sorted(by_budget, key=lambda b: (b[0] * b[1], b))


def smallest_paying_budget(
    by_budget: dict[tuple[int, int], list[dict]],
    floor: list[dict],
    key: str,
    bound: float | None,
) -> tuple[int, int] | None:
    """The smallest R x E whose verdict under ``key`` is 'ahead at every seed'.

    The verdict is docs/results.md's (:func:`benchmarks.quality.verdict`): each seed against
    random init of the same seed (same init draw, label subsets and fine-tuning seed), one sign
    at every seed and a mean beyond the noise ``bound`` (no bound: one sign at >= 3 seeds).
    """
    return _first_ahead(budget_verdicts(by_budget, floor, key, bound))


def _first_ahead(verdicts: dict[tuple[int, int], str]) -> tuple[int, int] | None:
    """The first (smallest) budget of ``verdicts`` that is 'ahead at every seed'."""
    return next((b for b, said in verdicts.items() if said == "ahead at every seed"), None)


def budget_verdicts(
    by_budget: dict[tuple[int, int], list[dict]],
    floor: list[dict],
    key: str,
    bound: float | None,
) -> dict[tuple[int, int], str]:
    """Each budget's verdict under ``key`` against random init, smallest budget first; a budget
    with no seed paired with random init is left out."""
    verdicts = {}
    for budget in _budget_order(by_budget):
        diffs = quality.paired_differences(by_budget[budget], floor, key, "random-init")
        if diffs:
            verdicts[budget] = quality.verdict(list(diffs.values()), bound)
    return verdicts


def _signed(diffs: list[float]) -> str:
    """Mean paired difference in points, with its spread over seeds."""
    if not diffs:
        return "-"
    mean = 100 * statistics.fmean(diffs)
    spread = f" ± {100 * statistics.stdev(diffs):.1f}" if len(diffs) > 1 else ""
    return f"{mean:+.1f}{spread}"


def plot(by_budget: dict, floor: list[dict], path: Path) -> None:
    """Each metric's mean over seeds against the budget; random init's mean as a dashed line."""
    plt = pyplot()
    budgets = _budget_order(by_budget)
    fig, ax = plt.subplots(figsize=(6, 4))
    for (key, label, _), color in zip(ACCURACY_LABELS, ("C0", "C1", "C2"), strict=True):
        points = [(r * e, values) for (r, e) in budgets
                  if (values := accuracies(by_budget[(r, e)], key, "fedmae"))]  # fmt: skip
        if points:
            ax.plot([x for x, _ in points], [100 * statistics.fmean(v) for _, v in points],
                    marker="o", color=color, label=f"fedmae {label}")  # fmt: skip
        floor_values = accuracies(floor, key, "random-init")
        if floor_values:
            ax.axhline(100 * statistics.fmean(floor_values), color=color, ls="--", lw=1,
                       label=f"random-init {label}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xticks([r * e for r, e in budgets], [f"{r}x{e}" for r, e in budgets])
    seeds = sorted({r["seed"] for runs in by_budget.values() for r in runs})
    ax.set(
        xlabel="local epochs per block (rounds per stage x local epochs)",
        ylabel="top-1 (%)",
        title=f"Does pretraining pay? (Fashion-MNIST, {NUM_SUPERNODES} nodes, seeds {seeds})",
    )
    ax.legend(fontsize=7)
    save_figure(fig, path)


def _grid(by_budget: dict, floor: list[dict]) -> Grid:
    """The runs keyed as the quality report's helpers take them (one row per budget)."""
    rows: Grid = {("fedmae", f"{r} x {e}"): by_budget[(r, e)] for r, e in _budget_order(by_budget)}
    return {**rows, ("random-init", "pooled"): floor}


def _header(by_budget: dict, floor: list[dict], command: str, partition: str) -> list[str]:
    """Title, command with machine and date, setup, evaluation and the comparison rule."""
    grid = _grid(by_budget, floor)
    every_run = [r for runs in grid.values() for r in runs]
    seeds = sorted({r["seed"] for r in every_run})
    seconds = sum(r["summary"]["wall-seconds"] for r in every_run)
    evaluation = {
        k: v
        for k, v in GRID_EVALUATION.items()
        if k not in ("evaluate-random-init", "local-clients") and not k.startswith("finetune-")
    }
    protocol = ", ".join(f"{k}={v}" for k, v in FINETUNE_PROTOCOL.items())
    cost = quality.finetune_cost(grid)
    return [
        "# Does pretraining pay? Accuracy against the pretraining budget",
        "",
        f"Command: `{command}` (seeds {seeds}; the runs' ServerApp wall time adds up to "
        f"{seconds / 60:.0f} min{quality.startup_text(every_run)} on "
        f"{machines_text(run_machines(every_run))}; the protocol fine-tunes "
        f"add up to{cost.removeprefix(',') or ' nothing yet'}; report written "
        f"{time.strftime('%Y-%m-%d', time.gmtime())} UTC).",
        "",
        f"FedMAE on Fashion-MNIST, {partition} over {NUM_SUPERNODES} nodes, "
        + ", ".join(f"{k}={v}" for k, v in FEDERATION.items())
        + "; budget R x E = rounds per stage x local epochs per round, i.e. the local epochs "
        "each block is trained for. Each seed's FedMAE run is paired with the random-init "
        "run of the same seed (same init draw, label subsets and fine-tuning seed).",
        "",
        "Evaluation, the same for every backbone (the fine-tune protocol is docs/results.md's; "
        "the probe's lr is stated below): in each run "
        + ", ".join(f"{k}={v}" for k, v in evaluation.items())
        + f" ({EVALUATION_PROTOCOL}); the fine-tune column is not part of the runs: each run's "
        "exported backbone is fine-tuned afterwards under the protocol of "
        f"docs/eval-protocol.md (`benchmarks.grid_finetune`, cached per run): {protocol} "
        "(disjoint label subsets drawn with the run's seed, a validation share of each, the lr "
        "kept by validation top-1, the kept model alone scored on the test images); a cell is "
        "the mean over seeds of each run's mean over its "
        f"{FINETUNE_PROTOCOL['finetune-subsets']} subsets. Top-1 in %, mean ± std over seeds. "
        + quality.probe_lr_text(grid),
        "",
        OLD_RECIPE,
        "",
    ]


# Where the budgets measured before the protocol are (they were not re-measured).
OLD_RECIPE = (
    "Not in this page: the budgets measured before this protocol (5 x 1, 5 x 4 at seeds 0 and "
    "1, 10 x 4 at seed 0), whose fine-tune ran inside the runs on one 1,000-label subset for "
    "15 epochs with a bare linear head; their page is `git show 17655eb:docs/budget.md`. The "
    "reference budget 5 x 1 under this protocol is docs/results.md's fedmae iid row."
)


def _table(by_budget: dict, floor: list[dict]) -> list[str]:
    """The accuracies of every budget and of the random-init floor, PSNR, client and wall time."""
    headers = " | ".join(label for _, label, _ in ACCURACY_LABELS)
    floor_cells = [mean_std(accuracies(floor, key, "random-init")) for key, _, _ in ACCURACY_LABELS]
    lines = [
        f"| budget R x E | server rounds | seeds | {headers} | masked PSNR (dB) "
        "| client s (run total) | run wall s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| random-init (floor) | 0 | {sorted(r['seed'] for r in floor)} "
        f"| {' | '.join(floor_cells)} | - | 0 | - |",
    ]
    for rounds, epochs in _budget_order(by_budget):
        runs = by_budget[(rounds, epochs)]
        comm = runs[0]["summary"]["communication"]
        client_seconds = comm["client-train-seconds-mean"] * rounds * FEDERATION["depth"]
        cells = [
            f"{rounds} x {epochs}",
            str(rounds * FEDERATION["depth"]),
            str(sorted(r["seed"] for r in runs)),
            *(mean_std(accuracies(runs, key, "fedmae")) for key, _, _ in ACCURACY_LABELS),
            f"{statistics.fmean(r['summary']['final-psnr'] for r in runs):.2f}",
            f"{client_seconds:.0f}",
            f"{statistics.fmean(r['summary']['wall-seconds'] for r in runs):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _comparisons(by_budget: dict, floor: list[dict], bounds: dict) -> list[str]:
    """FedMAE − random init per seed, mean, noise bound and verdict, per budget and metric."""
    lines = [
        "| budget R x E | metric | FedMAE − random init per seed (points) "
        + quality.PAIRED_COLUMNS,
        "|---|---|---|" + quality.PAIRED_RULE,
    ]
    for rounds, epochs in _budget_order(by_budget):
        runs = by_budget[(rounds, epochs)]
        lines += quality.paired_rows(f"{rounds} x {epochs}", runs, floor, "random-init", bounds)
    return lines if len(lines) > 2 else []


def missing_text(
    by_budget: dict, floor: list[dict], budgets: list[tuple[int, int]], seeds: list[int]
) -> list[str]:
    """The asked runs (``budgets`` x ``seeds``, random init at ``seeds``) that are not there, or
    whose protocol fine-tune is not; [] when none is missing."""
    asked = sorted(budgets, key=lambda b: (b[0] * b[1], b))
    rows = [("random-init", floor)]
    rows += [(f"fedmae {r} x {e}", by_budget.get((r, e), [])) for r, e in asked]
    missing = []
    for label, runs in rows:
        have = {r["seed"]: r for r in runs}
        for seed in seeds:
            if seed not in have:
                missing.append(f"{label} seed {seed} (no run)")
            elif FINETUNE_KEY not in have[seed]["summary"]:
                missing.append(f"{label} seed {seed} (no protocol fine-tune)")
    if not missing:
        return []
    return [f"**Missing** from the seeds asked ({seeds}): " + ", ".join(missing) + "; the "
            "table and the verdicts use the seeds that are there.", ""]  # fmt: skip


def _verdicts(by_budget: dict, floor: list[dict], bounds: dict) -> list[str]:
    """Per metric, each budget's verdict and the smallest at which FedMAE is ahead (or none)."""
    lines = []
    for key, _, name in ACCURACY_LABELS:
        verdicts = budget_verdicts(by_budget, floor, key, bounds.get(key))
        each = "; ".join(f"{r} x {e}: {said}" for (r, e), said in verdicts.items())
        budget = _first_ahead(verdicts)
        pays = "none" if budget is None else f"{budget[0]} x {budget[1]}"
        lines.append(f"- {name}: {each or 'no paired seeds'}; smallest budget ahead at every "
                     f"seed: {pays}")  # fmt: skip
    return ["Verdicts, and the smallest measured budget at which FedMAE is ahead of random init "
            "at every seed (beyond the noise bound):", "", *lines]  # fmt: skip


def comparison_rule() -> str:
    """docs/results.md's rule (:func:`benchmarks.quality.verdict`), as it applies here."""
    return (
        "FedMAE − random init in points, seed by seed (positive = FedMAE ahead; a seed one of "
        "them lacks is left out). Verdict, the rule of docs/results.md "
        "(`benchmarks.quality.verdict`): 'ahead at every seed' or 'behind at every seed' only "
        "when every per-seed difference has the same sign and the mean's size exceeds the "
        "metric's noise bound, 2 x std x sqrt(2/k); the fine-tune's std is that of the "
        "random-init runs' per-subset values over all their seeds (k = "
        f"{FINETUNE_PROTOCOL['finetune-subsets']}), the probe's comes from the random-init "
        "floor of `benchmarks.eval_protocol` where it was measured under this protocol (k = 1). "
        "Without a bound ('no noise bound measured'; k-NN always) the same sign at every "
        f"paired seed is required. {quality.too_few_seeds_text()}; anything else: 'not "
        "shown'. p (paired t): the two-sided p-value of a paired t-test on the per-seed "
        "differences, as in docs/results.md."
    )


def write_report(
    by_budget: dict,
    floor: list[dict],
    command: str,
    partition: str,
    docs: Path,
    bounds: dict[str, float | None] | None = None,
    budgets: list[tuple[int, int]] | None = None,
    seeds: list[int] | None = None,
) -> Path:
    """Write ``docs/budget.md`` (table, paired differences, verdicts) and its figure.

    ``budgets``, ``seeds``: those asked for, to name the runs missing. ``bounds``: the noise
    bound per metric (default: :func:`benchmarks.quality.noise_bounds`, the fine-tune's from the
    random-init runs' own subsets where that file has none, as docs/results.md's). Returns the
    page's path.
    """
    docs.mkdir(parents=True, exist_ok=True)
    if bounds is None:
        bounds = quality.grid_noise_bounds(_grid(by_budget, floor))
    plot(by_budget, floor, docs / "budget-accuracy.png")
    lines = [
        *_header(by_budget, floor, command, partition),
        *([] if seeds is None else missing_text(by_budget, floor, budgets or [], seeds)),
        *_table(by_budget, floor),
        "",
        comparison_rule(),
        "",
        *_comparisons(by_budget, floor, bounds),
        "",
        *_verdicts(by_budget, floor, bounds),
        "",
        *quality.finetune_details(_grid(by_budget, floor)),
        "![budget-accuracy.png](budget-accuracy.png)",
        "",
    ]
    path = docs / "budget.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", type=parse_budget,
                        default=[parse_budget(b) for b in DEFAULT_BUDGETS])  # fmt: skip
    add_run_arguments(parser, seeds=[0], out=GRID_OUT_ROOT)
    parser.add_argument(
        "--no-finetune",
        action="store_true",
        help="the runs only; their fine-tunes later (benchmarks.grid_finetune --out, cached)",
    )
    run_archive.add_archive_argument(parser)
    args = parser.parse_args(argv)
    run_archive.sync(args.out, run_archive.archive_of(args), "bench-budget")
    by_budget, floor = budget_runs(
        args.budgets, args.seeds, args.partition, args.out, args.report_only, not args.no_finetune
    )
    if not floor and not by_budget:
        raise run_archive.nothing_to_report(args, "bench-budget", "these budgets")
    names = [r["name"] for runs in [floor, *by_budget.values()] for r in runs]
    run_archive.keep_and_check(names, args, "budget.md", "bench-budget")
    # A report-only pass reports the command that makes the runs (as benchmarks.quality does).
    command = command_line("benchmarks.budget", argv).replace(" --report-only", "")
    path = write_report(by_budget, floor, command.strip(), args.partition, args.docs,
                        budgets=args.budgets, seeds=args.seeds)  # fmt: skip
    run_archive.mark_page(path, names)
    print(f"[bench-budget] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
