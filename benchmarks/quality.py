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
``outputs/bench-grid/`` (the grid's lighter evaluation protocol, ``GRID_EVALUATION``: no
fine-tune); the fine-tune column is ``benchmarks.grid_finetune``'s, run afterwards on the
exported backbones (``make bench-quality-finetune``). FedMAE is compared with each baseline by
paired per-seed differences against the measured noise bounds (:func:`noise_bounds`). This
module writes the report; the runs are ``benchmarks.quality_grid``'s, the plots
``benchmarks.quality_plots``'.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks import eval_protocol, run_archive
from benchmarks.harness import (
    ALGORITHMS,
    BUDGET,
    EVALUATION,
    EVALUATION_PROTOCOL,
    FINETUNE_PROTOCOL,
    GRID_EVALUATION,
    NUM_SUPERNODES,
    PARTITION_FREE,
    PARTITIONS,
    accuracies,
    accuracy,
    add_run_arguments,
    command_line,
    machines_text,
    mean_std,
    run_machines,
)
from benchmarks.quality_grid import (
    DEFAULT_SEEDS,
    FINETUNE_KEY,
    FINETUNE_RECORD,
    GRID_MACHINE,
    GRID_OUT_ROOT,
    Grid,
    finetune_result,
    finetune_subsets,
    grid_size,
    is_full_grid,
    run_grid,
)
from benchmarks.quality_plots import plot
from benchmarks.significance import p_text, paired_t_p
from fedmae_flwr.config import default_run_config, from_flat
from fedmae_flwr.evaluation.downstream import PROTOCOL_RECIPE

# The backbone every run shares (schema defaults), named in the report.
MODEL: dict[str, Any] = {
    key: default_run_config()[key] for key in ("img-size", "patch-size", "embed-dim")
}

# The downstream metrics: summary key, table header, short name in the comparisons.
ACCURACY_LABELS = (
    (
        FINETUNE_KEY,
        f"fine-tune {FINETUNE_PROTOCOL['finetune-labels']:,} labels (protocol)",
        "fine-tune",
    ),
    ("linear-probe-accuracy", "linear probe", "linear probe"),
    ("knn-accuracy", "k-NN", "k-NN"),
)
COST_LABELS = (
    ("client-train-mbytes-peak", "client memory"),
    ("bytes-up-per-client-round", "bytes up per client-round"),
)
# A verdict needs at least this many paired seeds (the issue tracker's standard on CPU; fewer
# leave a bound-beating mean of two lucky draws standing as a verdict).
MIN_PAIRED_SEEDS = 3


def too_few_seeds_text() -> str:
    """What :func:`verdict` says below ``MIN_PAIRED_SEEDS``, for the rule texts."""
    labels = ["'one seed: not shown'"]
    labels += [f"'{n} seeds: not shown'" for n in range(2, MIN_PAIRED_SEEDS)]
    return f"A verdict needs >= {MIN_PAIRED_SEEDS} paired seeds ({', '.join(labels)} below that)"


def accuracy_cell(runs: list[dict[str, Any]], key: str, algorithm: str) -> str:
    """Mean ± std over the runs that measured ``key``, naming their seeds where some runs of the
    row did not (a fine-tune not yet run), so a cell never reads as covering the row's seeds."""
    measured = [r for r in runs if accuracy(r, key, algorithm) is not None]
    cell = mean_std(accuracies(measured, key, algorithm))
    if measured and len(measured) < len(runs):
        cell += " (" + " ".join(f"s{r['seed']}" for r in sorted(measured, key=lambda r: r["seed"]))
        cell += " only)"
    return cell


def results_table(grid: Grid) -> list[str]:
    """One row per (algorithm, partition): its seeds (rows may hold different ones), accuracies
    over them, PSNR, client costs, time."""
    header = " | ".join(label for _, label, _ in ACCURACY_LABELS)
    lines = [
        f"| algorithm | partition | seeds | {header} | masked PSNR (dB) "
        "| client peak train MiB | MiB up / client-round | MiB down / client-round "
        "| client s / round (lowest seed) | run wall s (mean) |",
        "|---|---|---|" + "---|" * (len(ACCURACY_LABELS) + 6),
    ]
    for (algorithm, partition), runs in grid.items():
        # Bytes and memory are the same at every seed; the seconds are the lowest seed's run.
        comm = min(runs, key=lambda r: r["seed"])["summary"]["communication"]
        psnr = [r["summary"]["final-psnr"] for r in runs if r["summary"]["final-psnr"] is not None]
        cells = [
            algorithm,
            partition,
            " ".join(str(s) for s in sorted(r["seed"] for r in runs)),
            *(accuracy_cell(runs, key, algorithm) for key, _, _ in ACCURACY_LABELS),
            f"{statistics.fmean(psnr):.2f}" if psnr else "-",
            f"{comm['client-train-mbytes-peak']:.0f}",
            f"{comm['bytes-up-per-client-round'] / 2**20:.2f}",
            f"{comm['bytes-down-per-client-round'] / 2**20:.2f}",
            f"{comm['client-train-seconds-mean']:.2f}",
            f"{statistics.fmean(r['summary']['wall-seconds'] for r in runs):.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def runs_probe_lrs(grid: Grid) -> list[float] | None:
    """The probe lr grid every run in ``grid`` probed with (from its summary's protocol; runs
    from before the grid probed at lr 0.1 alone); None where the runs differ."""
    grids = {
        tuple(r["summary"].get("downstream", {}).get("protocol", {}).get("probe-lr-grid", [0.1]))
        for runs in grid.values()
        for r in runs
    }
    return list(grids.pop()) if len(grids) == 1 else None


def probe_lr_text(grid: Grid) -> str:
    """How the runs in ``grid`` chose their probe's lr, from their summaries."""
    lrs = runs_probe_lrs(grid)
    if lrs is None:
        return (
            "Probe lr: **not the same in every run** (some probed at lr 0.1 alone, some chose "
            "it on validation); their probe differences carry no noise bound."
        )
    if len(lrs) == 1:
        return f"Probe lr: {lrs[0]:g} in every run (before the probe's lr grid)."
    return (
        f"Probe lr: chosen per backbone from {', '.join(f'{lr:g}' for lr in lrs)} on a "
        "validation share of its probe images (`probe-lr-grid`), in every run."
    )


def noise_bounds(
    path: Path = eval_protocol.RESULTS, probe_lrs: list[float] | None = None
) -> dict[str, float | None]:
    """Per metric (summary key): the smallest difference of means the protocol shows, or None.

    From the random-init noise floor ``benchmarks.eval_protocol`` measured (``path``), as its
    page derives it: 2 x std x sqrt(2/k), std the spread of one value over all its runs, k the
    values averaged per backbone (the fine-tune column: ``finetune-subsets``; the probe: 1).
    A metric's bound is None when the file is missing or empty, or was measured under another
    protocol than this grid's (model, labels, epochs, lr grid, validation share, head, recipe,
    test images; the probe's images, epochs and lr grid); k-NN's noise is not measured there
    (always None). ``probe_lrs``: the probe lr grid of the runs the bound is for (default:
    today's ``probe-lr-grid``); a floor of another grid gives no probe bound.
    """
    bounds: dict[str, float | None] = {key: None for key, _, _ in ACCURACY_LABELS}
    if not path.is_file():
        return bounds
    results = json.loads(path.read_text())
    if not results.get("seeds"):
        return bounds
    measured = eval_protocol.upgrade_protocol(results["protocol"])
    summary = eval_protocol.summarize(results)
    cfg = from_flat({**BUDGET, **GRID_EVALUATION, **FINETUNE_PROTOCOL})
    if measured.get("model") != asdict(cfg.model):
        return bounds
    finetune = {
        "finetune-labels": cfg.eval.finetune_labels,
        "val-fraction": cfg.eval.finetune_val_fraction,
        "lr-grid": list(cfg.eval.lr_grid),
        "finetune-epochs": cfg.eval.finetune_epochs,
        "finetune-recipe": PROTOCOL_RECIPE,
        "test-images": cfg.eval.test_images,
    }
    same_recipe = measured["finetune-head-norm"] == str(cfg.eval.finetune_head_norm) and (
        measured["finetune-augment"] == cfg.eval.finetune_augment
    )
    # eval_protocol fine-tunes without layer decay.
    if (
        all(measured.get(k) == v for k, v in finetune.items())
        and same_recipe
        and cfg.eval.finetune_layer_decay == 1.0
    ):
        bounds[FINETUNE_KEY] = _bound(summary["finetune-test"]["std"], cfg.eval.finetune_subsets)
    probe = {
        "probe-train-images": GRID_EVALUATION["probe-train-images"],
        "probe-epochs": GRID_EVALUATION["probe-epochs"],
        "test-images": GRID_EVALUATION["test-images"],
        "probe-lr-grid": list(cfg.eval.probe_lrs) if probe_lrs is None else list(probe_lrs),
    }
    if all(measured.get(k) == v for k, v in probe.items()):
        bounds["linear-probe-accuracy"] = _bound(summary["probe-test"]["std"], 1)
    return bounds


def grid_noise_bounds(grid: Grid) -> dict[str, float | None]:
    """The noise bound per metric for the runs in ``grid``, as the grid and budget pages use it.

    :func:`noise_bounds` of the measured floor, its probe bound only where every run probed as
    the floor did (lr grid included, :func:`runs_probe_lrs`); where the floor has no fine-tune
    bound for this protocol, the grid's own random-init row gives it (:func:`grid_noise_bound`).
    """
    lrs = runs_probe_lrs(grid)
    bounds = noise_bounds(probe_lrs=lrs)
    if lrs is None:  # the runs chose their probe's lr in different ways: no one floor is theirs
        bounds["linear-probe-accuracy"] = None
    if bounds[FINETUNE_KEY] is None:
        bounds[FINETUNE_KEY] = grid_noise_bound(grid)
    return bounds


def grid_noise_bound(grid: Grid) -> float | None:
    """The fine-tune bound from the grid's own random-init row, or None (< 2 seeds fine-tuned).

    Those runs are the noise floor under exactly this table's protocol: an untrained backbone
    per init seed, fine-tuned on that seed's label subsets, so the spread of their per-subset
    values holds both init-seed and label-subset noise (as docs/eval-protocol.md's std does).
    """
    per_run = [v for run in grid.get(("random-init", "pooled"), []) if (v := finetune_subsets(run))]
    values = [v for run_values in per_run for v in run_values]
    if len(per_run) < 2 or len(values) < 3:
        return None
    return _bound(statistics.stdev(values), FINETUNE_PROTOCOL["finetune-subsets"])


def _bound(std: float, k: int) -> float | None:
    return None if math.isnan(std) else 2 * std * math.sqrt(2 / k)


def paired_differences(
    runs: list[dict], other_runs: list[dict], key: str, other: str, ours: str = "fedmae"
) -> dict[int, float]:
    """``ours`` in ``runs`` minus ``other`` in ``other_runs`` under ``key``, by seed (only the
    seeds both measured)."""
    theirs = {r["seed"]: v for r in other_runs if (v := accuracy(r, key, other)) is not None}
    return {
        r["seed"]: a - theirs[r["seed"]]
        for r in sorted(runs, key=lambda r: r["seed"])
        if (a := accuracy(r, key, ours)) is not None and r["seed"] in theirs
    }


def verdict(diffs: list[float], bound: float | None) -> str:
    """What the paired differences show (see :func:`comparison_rule`)."""
    if len(diffs) < 2:
        return "one seed: not shown"
    if len(diffs) < MIN_PAIRED_SEEDS:
        return f"{len(diffs)} seeds: not shown"
    mean = statistics.fmean(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    shown = same_sign and (bound is None or abs(mean) > bound)
    if not shown:
        return "not shown"
    return "ahead at every seed" if mean > 0 else "behind at every seed"


def comparison_rule() -> str:
    """The rule of :func:`verdict`, for the report."""
    k = FINETUNE_PROTOCOL["finetune-subsets"]
    return (
        "FedMAE against each other row of its partition and the `pooled` rows, paired by seed: "
        "each FedMAE run is matched with the baseline run of the same seed (a seed one of "
        "them lacks is left out), and the differences are FedMAE − baseline in points "
        f"(positive = FedMAE ahead). {too_few_seeds_text()}; it is 'ahead at every seed' or "
        "'behind at every seed' only when every "
        "per-seed difference has the same sign and the mean's size exceeds the metric's noise "
        "bound: 2 x std x sqrt(2/k) of the random-init noise floor "
        f"(docs/eval-protocol.md; k = {k} subsets per fine-tune value, 1 per probe), where it "
        "was measured under this table's protocol (a floor measured with other epochs, lr "
        "grid, head or test images gives no bound; the fine-tune's then comes from this "
        "table's own random-init row, its per-subset values over all seeds). Where no bound "
        "is measured the same sign at every paired seed is required instead ('no noise bound "
        "measured'); k-NN's noise has no measured bound. Anything else: 'not shown'. Beside "
        "it, p (paired t) is the "
        "two-sided p-value of a paired t-test on the per-seed differences (H0: mean 0; "
        "`benchmarks.significance`): the textbook statement, less conservative than the "
        "verdict (it uses the differences' own spread and the number of seeds, and no noise "
        "floor); with 3 seeds it rests on 2 degrees of freedom, so read it as a guide. Cost "
        "ratios are FedMAE / baseline, measured in the same runs."
    )


# The columns paired_cells fills after the per-seed differences (and the table rule under them).
PAIRED_COLUMNS = "| mean | p (paired t) | noise bound (points) | verdict |"
PAIRED_RULE = "---|---|---|---|"


def paired_cells(diffs: dict[int, float], bound: float | None) -> str:
    """``"s0 -3.3, s1 -3.7 | -3.5 | 0.13 | 1.4 | behind at every seed"``: the per-seed
    differences, their mean, the paired t-test's p, the noise bound (points) and the verdict,
    as comparison table cells (``PAIRED_COLUMNS``)."""
    per_seed = ", ".join(f"s{s} {100 * d:+.1f}" for s, d in diffs.items())
    mean = 100 * statistics.fmean(diffs.values())
    p = p_text(paired_t_p(list(diffs.values())))
    bound_text = "no noise bound measured" if bound is None else f"{100 * bound:.1f}"
    return f"{per_seed} | {mean:+.1f} | {p} | {bound_text} | {verdict(list(diffs.values()), bound)}"


def paired_rows(
    prefix: str,
    runs: list[dict],
    other_runs: list[dict],
    other: str,
    bounds: dict[str, float | None],
    ours: str = "fedmae",
) -> list[str]:
    """``| {prefix} | metric | paired cells |`` per metric both sides measured at a shared seed:
    the rows of every paired-difference table (this page's and docs/budget.md's)."""
    rows = []
    for key, _, name in ACCURACY_LABELS:
        diffs = paired_differences(runs, other_runs, key, other, ours=ours)
        if diffs:
            rows.append(f"| {prefix} | {name} | {paired_cells(diffs, bounds.get(key))} |")
    return rows


def comparisons(grid: Grid, bounds: dict[str, float | None]) -> list[str]:
    """The paired-difference table of FedMAE against each baseline, then the cost ratios."""
    lines = [
        "| partition | fedmae vs | metric | FedMAE − baseline per seed (points) " + PAIRED_COLUMNS,
        "|---|---|---|---|" + PAIRED_RULE,
    ]
    costs = []
    for (algorithm, partition), runs in grid.items():
        if algorithm != "fedmae":
            continue
        ours = runs[0]["summary"]["communication"]
        for (other, other_part), other_runs in grid.items():
            if other == "fedmae" or other_part not in (partition, "pooled"):
                continue
            lines += paired_rows(f"{partition} | {other}", runs, other_runs, other, bounds)
            theirs = other_runs[0]["summary"]["communication"]
            ratios = [
                f"{label} {ours[key] / theirs[key]:.2f}x"
                for key, label in COST_LABELS
                if theirs[key]
            ]
            if ratios:
                costs.append(f"- {partition}: fedmae vs {other}: {', '.join(ratios)}")
    table = lines if len(lines) > 2 else []  # no header without a paired row
    return [*table, *([""] if table and costs else []), *costs]


def heterogeneity_comparisons(grid: Grid, bounds: dict[str, float | None]) -> list[str]:
    """Each algorithm on a non-IID partition against itself on IID, paired by seed: what the
    partition costs it. Empty where no algorithm ran on both."""
    lines = []
    for (algorithm, partition), runs in grid.items():
        iid_runs = grid.get((algorithm, "iid"))
        if partition in ("iid", "pooled") or not iid_runs:
            continue
        lines += paired_rows(
            f"{algorithm} | {partition}", runs, iid_runs, algorithm, bounds, ours=algorithm
        )
    if not lines:
        return []
    return [
        "What a non-IID partition costs: each algorithm on it against the same algorithm on "
        "`iid`, paired by seed (the same seed draws the init, the nodes sampled each round and "
        "the label subsets; only how the images are split over the nodes differs). The "
        "differences are partition − iid in points (negative = the non-IID run scores lower); "
        "the noise bound, verdict rule and p are the ones above.",
        "",
        "| algorithm | partition | metric | partition − iid per seed (points) " + PAIRED_COLUMNS,
        "|---|---|---|---|" + PAIRED_RULE,
        *lines,
        "",
    ]


def finetune_text(grid: Grid) -> list[str]:
    """The fine-tune column's protocol, which runs have it, and what it cost."""
    runs = [r for runs in grid.values() for r in runs]
    done = [r["name"] for r in runs if FINETUNE_RECORD in r]
    if not done:
        which = "it has not run for any run yet ('-')"
    elif len(done) == len(runs):
        which = f"it ran for every run{finetune_cost(grid)}"
    else:
        which = (
            f"it ran for {len(done)} of {len(runs)} runs{finetune_cost(grid)}: "
            + ", ".join(done)
            + " ('-' where it has not run)"
        )
    keys = ", ".join(f"{k}={v}" for k, v in FINETUNE_PROTOCOL.items())
    return [
        "Fine-tune column: not part of the runs; each run's exported backbone is fine-tuned "
        "afterwards (`make bench-quality-finetune`, `benchmarks.grid_finetune`) under the "
        "protocol of docs/eval-protocol.md, exactly what a run with these eval keys does: "
        f"{keys} (disjoint label subsets drawn with the run's seed, a validation share of "
        "each, the lr kept by validation top-1, the kept model alone scored on the test "
        "images). A cell is the mean ± std over seeds of each run's mean over its "
        f"{FINETUNE_PROTOCOL['finetune-subsets']} subsets; {which}.{kept_lr_tally(grid)}",
        "",
    ]


def kept_lr_tally(grid: Grid) -> str:
    """`` Validation kept lr 0.001 on 40, 0.002 on 5 of the 45 subsets (fedmae: ...).``, or ''
    where no record chose between lrs."""
    by_algorithm: dict[str, list[float]] = {}
    for (algorithm, _), runs in grid.items():
        for run in runs:
            if FINETUNE_RECORD in run:
                subsets = finetune_result(run[FINETUNE_RECORD]).get("subsets", [])
                by_algorithm.setdefault(algorithm, []).extend(
                    s["lr"] for s in subsets if len(s.get("val_accuracy", {})) > 1
                )
    kept = [lr for lrs in by_algorithm.values() for lr in lrs]
    if not kept:
        return ""

    def counts(lrs: list[float]) -> str:
        return ", ".join(f"{lr:g} on {lrs.count(lr)}" for lr in sorted(set(lrs)))

    per = "; ".join(f"{a}: {counts(lrs)}" for a, lrs in by_algorithm.items() if lrs)
    return f" Validation kept lr {counts(kept)} of the {len(kept)} subsets ({per})."


def finetune_cost(grid: Grid) -> str:
    """``", 28 min on <machine>"``: the protocol fine-tunes' cached seconds, summed, and the
    machine(s) their records name (:func:`~benchmarks.harness.machines_text`)."""
    records = [r[FINETUNE_RECORD] for runs in grid.values() for r in runs if FINETUNE_RECORD in r]
    seconds = [rec["seconds"] for rec in records if "seconds" in rec]
    if not seconds:
        return ""
    where = machines_text([rec.get("machine") for rec in records], "fine-tune")
    return f", {sum(seconds) / 60:.0f} min on {where}"


def _kept_lrs_text(lrs: list[float]) -> str:
    """``"; kept lr 0.001"`` where every subset kept one lr, else the lr of each subset."""
    if not lrs:
        return ""
    if len(set(lrs)) == 1:
        return f"; kept lr {lrs[0]:g}"
    return f"; kept lr {' / '.join(f'{lr:g}' for lr in lrs)} by subset"


def finetune_details(grid: Grid) -> list[str]:
    """Each fine-tuned run: its subsets' test top-1, their mean ± std, the kept lr(s)."""
    lines = []
    for runs in grid.values():
        for run in sorted(runs, key=lambda r: r["seed"]):
            if FINETUNE_RECORD not in run:
                continue
            result = finetune_result(run[FINETUNE_RECORD])
            values = ", ".join(f"{100 * v:.1f}" for v in finetune_subsets(run))
            lrs = [s["lr"] for s in result.get("subsets", [])]
            lr_text = _kept_lrs_text(lrs)
            train = result.get("train_accuracy")
            train_text = f"; train top-1 {100 * train:.1f}" if train is not None else ""
            spread = f"{100 * result['accuracy']:.1f} ± {100 * result.get('accuracy_std', 0):.1f}"
            lines.append(f"- {run['name']}: {values} ({spread}{lr_text}{train_text})")
    if not lines:
        return []
    return ["Fine-tune per run (test top-1 of each label subset; mean ± std over them):", "",
            *lines, ""]  # fmt: skip


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
    grid: Grid,
    command: str,
    docs: Path,
    out_root: Path,
    slice_of: tuple[list[str], list[str], list[int]] | None = None,
    bounds: dict[str, float | None] | None = None,
) -> Path:
    """``docs/results.md`` with the table and the plots of the runs in ``grid``.

    ``slice_of``: the (algorithms, partitions, seeds) asked for, where ``grid`` is less than the
    full grid (the page says so and names the runs it lacks).

    ``bounds``: the noise bound per metric (default: :func:`noise_bounds` of the measured file;
    the fine-tune's from :func:`grid_noise_bound` where that file has none for this protocol).
    """
    docs.mkdir(parents=True, exist_ok=True)
    if bounds is None:
        bounds = grid_noise_bounds(grid)
    pictures = plot(grid, docs, out_root)
    lines = [
        "# FedMAE against its baselines",
        "",
        command_text(grid, command),
        "",
        *([] if slice_of is None else slice_warning(grid, *slice_of)),
        budget_text(),
        "",
        evaluation_text() + " " + probe_lr_text(grid),
        "",
        *finetune_text(grid),
        "Accuracies are top-1 in %, mean ± standard deviation over the row's seeds.",
        "",
        *results_table(grid),
        "",
        comparison_rule(),
        "",
        *comparisons(grid, bounds),
        "",
        *heterogeneity_comparisons(grid, bounds),
        *finetune_details(grid),
        *[f"![{p}]({p})" for p in pictures],
        "",
    ]
    path = docs / "results.md"
    path.write_text("\n".join(lines))
    return path


def command_text(grid: Grid, command: str) -> str:
    """The commands that make the page's runs, the one that wrote the page, the rows and seeds,
    and the time the runs took on which machine."""
    seeds = sorted({r["seed"] for runs in grid.values() for r in runs})
    # Runs are resumable, so the harness' own clock can miss finished ones: sum the runs.
    every_run = [r for runs in grid.values() for r in runs]
    seconds = sum(r["summary"]["wall-seconds"] for r in every_run)
    runs = ", ".join(f"`{c}`" for c in runs_commands(grid))
    return (
        f"Command: `{command}`; its runs are those of {runs} (under the same `--out`) "
        f"({len(grid)} rows, seeds {seeds}; the runs' ServerApp wall time adds up to "
        f"{seconds / 60:.0f} min{startup_text(every_run)}, on "
        f"{machines_text(run_machines(every_run))})."
    )


def runs_commands(grid: Grid) -> list[str]:
    """``benchmarks.quality`` commands that make exactly the runs of ``grid``: one per set of
    partitions whose rows have the same algorithms and seeds (so a page that reports what an
    earlier, wider command left, or several commands made, names how to make each run)."""
    seeds_of = {key: tuple(sorted(r["seed"] for r in runs)) for key, runs in grid.items()}
    groups: dict[tuple[tuple[str, ...], tuple[int, ...]], list[str]] = {}
    for partition in PARTITIONS:
        rows = {a: seeds_of[(a, p)] for a, p in seeds_of if p == partition}
        if len(set(rows.values())) == 1:  # one command for the whole partition
            groups.setdefault((tuple(rows), next(iter(rows.values()))), []).append(partition)
        else:
            for algorithm, seeds in rows.items():
                groups.setdefault(((algorithm,), seeds), []).append(partition)
    pooled = {a: seeds_of[(a, p)] for a, p in seeds_of if p == "pooled"}
    for algorithm, seeds in pooled.items():  # made by any partition's command of its seeds
        key = next((k for k in groups if k[1] == seeds), None)
        if key is None:
            groups[((algorithm,), seeds)] = ["iid"]
        else:
            groups[((*key[0], algorithm), seeds)] = groups.pop(key)
    commands = []
    in_order = sorted(groups.items(), key=lambda g: list(PARTITIONS).index(g[1][0]))
    for (algorithms, seeds), partitions in in_order:
        ordered = [a for a in ALGORITHMS if a in algorithms]
        flags = "" if set(ordered) == set(ALGORITHMS) else " --algorithms " + " ".join(ordered)
        commands.append(
            f"python -m benchmarks.quality{flags} --partitions {' '.join(partitions)} "
            f"--seeds {' '.join(map(str, seeds))}"
        )
    return commands


def slice_warning(grid: Grid, algorithms: list[str], partitions: list[str],
                  seeds: list[int]) -> list[str]:  # fmt: skip
    """The paragraph that marks a report of less than the full grid: the runs of the grid asked
    for that it lacks, or that a smaller grid was asked for."""
    present = {(a, p, r["seed"]) for (a, p), runs in grid.items() for r in runs}
    missing: dict[tuple[str, str], list[int]] = {}
    for algorithm in algorithms:
        for partition in ["pooled"] if algorithm in PARTITION_FREE else partitions:
            for seed in seeds:
                if (algorithm, partition, seed) not in present:
                    missing.setdefault((algorithm, partition), []).append(seed)
    lacks = "; ".join(
        f"{a} {p} at seed{'s' if len(ss) > 1 else ''} {' '.join(map(str, ss))}"
        for (a, p), ss in missing.items()
    )
    if lacks:
        return [f"**Not every run asked for is here** (each row names its seeds): {lacks}.", ""]
    return [
        f"**A slice of the full grid** (`make bench-quality`: {len(PARTITIONS)} partitions "
        f"x {len(DEFAULT_SEEDS)} seeds): read single-seed numbers as indicative only.",
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
    """The runs' own evaluation protocol, and why it is not the other studies'."""
    full_size = grid_size(list(ALGORITHMS), list(PARTITIONS), list(DEFAULT_SEEDS))
    shown = {
        k: v
        for k, v in GRID_EVALUATION.items()
        if k not in ("evaluate-random-init", "local-clients") and not k.startswith("finetune-")
    }
    return (
        "Evaluation in each run, the same for every backbone: "
        + ", ".join(f"{k}={v}" for k, v in shown.items())
        + f" ({EVALUATION_PROTOCOL}). The runs score probe, k-NN and masked PSNR only "
        f"(finetune-labels={GRID_EVALUATION['finetune-labels']}) to keep the {full_size} runs "
        f"of the full grid within a few hours on {GRID_MACHINE}; the ablations "
        f"fine-tune inside their runs ({EVALUATION['finetune-labels']:,} labels, one subset, "
        f"{EVALUATION['finetune-epochs']} epochs), so their fine-tune numbers are not "
        "comparable with this table's (the budget study's, docs/budget.md, are: it uses this "
        "table's evaluation and fine-tune protocol; its page states its probe's lr)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=PARTITIONS)
    add_run_arguments(parser, list(DEFAULT_SEEDS), partition=False, out=GRID_OUT_ROOT)
    run_archive.add_archive_argument(parser)
    args = parser.parse_args(argv)
    run_archive.sync(args.out, run_archive.archive_of(args), "bench-quality")
    grid = run_grid(args.algorithms, args.partitions, args.seeds, args.out, args.report_only)
    if not grid:
        raise run_archive.nothing_to_report(args, "bench-quality", "this grid")
    names = [r["name"] for runs in grid.values() for r in runs]
    run_archive.keep_and_check(names, args, "results.md", "bench-quality")
    command = command_line("benchmarks.quality", argv)
    asked = (args.algorithms, args.partitions, args.seeds)
    slice_of = None if is_full_grid(grid, *asked) else asked
    path = write_report(grid, command.strip(), args.docs, args.out, slice_of)
    run_archive.mark_page(path, names)
    print(f"[bench-quality] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
