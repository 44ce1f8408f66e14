"""FedProx's proximal term against plain averaging, where it is meant to help: the quality grid's
non-IID partition (Dirichlet 0.5), FedMAE at the grid's budget and protocol, paired by seed.

The FedAvg side is the grid's own ``fedmae-dirichlet-0.5-s<seed>`` runs (loaded when they
finished: restored from the archive, ``benchmarks.run_archive``); ``--remake-reference`` makes
seed 0's again beside the new runs first, to show that today's code reproduces it. The FedProx
side is the same configuration with ``aggregation=fedprox proximal-mu=<mu>`` (averaged as FedAvg;
the nodes add the proximal term to their local loss), for each mu asked for.

    .venv/bin/python -m benchmarks.fedprox          # mu 0.01 (the default), seeds 0 1 2
    .venv/bin/python -m benchmarks.fedprox --mu 0.001 0.01 0.1
    .venv/bin/python -m benchmarks.fedprox --mu 0.001 0.01 0.1 --report-only

Writes ``docs/fedprox.md`` and ``docs/fedprox.png``; keeps the runs' files in the grid's archive.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks import run_archive
from benchmarks.harness import (
    DOCS,
    GRID_EVALUATION,
    accuracy,
    command_line,
    machines_text,
    pyplot,
    run_machines,
    run_variant,
    save_figure,
)
from benchmarks.quality import noise_bounds, paired_cells
from benchmarks.quality_grid import GRID_OUT_ROOT
from fedmae_flwr.config import default_run_config

PARTITION = "dirichlet-0.5"
TAG = "bench-fedprox"
# summary.json key, report label, scale to points (accuracies) or dB
METRICS = (
    ("linear-probe-accuracy", "linear probe (points)", 100.0),
    ("knn-accuracy", "k-NN (points)", 100.0),
    ("final-psnr", "masked PSNR (dB)", 1.0),
)


def value(run: dict[str, Any], key: str) -> float | None:
    """A run's value of ``key``: FedMAE's accuracy under that protocol, or its final PSNR."""
    return run["summary"].get(key) if key == "final-psnr" else accuracy(run, key, "fedmae")


def runs(seeds: list[int], mus: list[float], out_root: Path, report_only: bool, remake: bool):
    """(FedAvg runs by seed, FedProx runs by mu and seed, what the remade reference showed),
    where finished."""
    remade = check_reproduces(out_root, make=not report_only) if remake else ""
    fedavg: dict[int, dict] = {}
    fedprox: dict[float, dict[int, dict]] = {mu: {} for mu in mus}
    sides = [(fedavg, None)] + [
        (fedprox[mu], {"aggregation": "fedprox", "proximal-mu": mu}) for mu in mus
    ]
    for seed in seeds:
        for side, change in sides:
            run = run_variant("fedmae", PARTITION, seed, out_root, TAG, change, timeout=1800,
                              report_only=report_only, evaluation=GRID_EVALUATION)  # fmt: skip
            if run is not None:
                side[seed] = run
    return fedavg, fedprox, remade


def check_reproduces(out_root: Path, make: bool = True) -> str:
    """Make FedAvg seed 0 again in a scratch folder (``make``; else read the one made last);
    stop unless it matches the grid's run. Returns the report's sentence on it."""
    scratch = out_root.parent / f"{out_root.name}-remake"
    if make:
        shutil.rmtree(scratch, ignore_errors=True)
    again = run_variant("fedmae", PARTITION, 0, scratch, TAG, timeout=1800,
                        report_only=not make, evaluation=GRID_EVALUATION)  # fmt: skip
    kept = run_variant("fedmae", PARTITION, 0, out_root, TAG, report_only=True,
                       evaluation=GRID_EVALUATION)  # fmt: skip
    if kept is None or again is None:
        return ""
    differ = [k for k, _, _ in METRICS if value(again, k) != value(kept, k)]
    values = ", ".join(f"{k} {value(again, k)}" for k, _, _ in METRICS)
    said = f"differs in {differ}" if differ else "identical"
    print(f"[{TAG}] FedAvg seed 0 remade: {said} ({values})", flush=True)
    if differ:
        raise SystemExit(f"today's code does not reproduce {out_root}'s FedAvg seed 0: {differ}")
    return (
        f"FedAvg seed 0 was made again beside the new runs (`--remake-reference`): {values}, "
        "identical to the grid's run, so the grid's FedAvg runs stand for today's code."
    )


def report(
    fedavg: dict, fedprox: dict[float, dict], command: str, docs: Path, remade: str = ""
) -> str:
    """docs/fedprox.md and its plot: each mu's runs against FedAvg's, paired by seed (the
    seeds where both finished)."""
    pairs = {mu: sorted(fedavg.keys() & runs.keys()) for mu, runs in fedprox.items()}
    pairs = {mu: seeds for mu, seeds in pairs.items() if seeds}
    every = [*fedavg.values(), *(r for runs in fedprox.values() for r in runs.values())]
    default = default_run_config()["proximal-mu"]
    mus = ", ".join(f"{mu:g}" + (" (the default)" if mu == default else "") for mu in pairs)
    seeds = sorted({s for ss in pairs.values() for s in ss})
    bounds = noise_bounds()
    lines = [
        "# FedProx against plain averaging (non-IID)",
        "",
        f"FedMAE at the quality grid's budget and protocol on the Dirichlet-0.5 partition, "
        f"`aggregation=fedprox proximal-mu=<mu>` for mu {mus} against the grid's "
        f"`aggregation=fedavg` runs, seed by seed ({', '.join(map(str, seeds))}). The nodes add "
        f"mu/2 ||w - w_global||^2 over the trained tensors to their local MAE loss; the server "
        "averages as FedAvg.",
        "",
        f"Command: `{command}`. Machines: {machines_text(run_machines(every))}.",
        *(["", remade] if remade else []),
        "",
        "| mu | metric | FedAvg (per seed) | FedProx (per seed) | FedProx − FedAvg per seed "
        "| mean | p (paired t) | noise bound | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mu, paired in pairs.items():
        for key, label, scale in METRICS:
            diffs = {s: value(fedprox[mu][s], key) - value(fedavg[s], key) for s in paired}
            per = {
                name: ", ".join(f"{scale * value(side[s], key):.2f}" for s in paired)
                for name, side in (("fedavg", fedavg), ("fedprox", fedprox[mu]))
            }
            # paired_cells writes points (x100); PSNR's dB go in as hundredths: they print as dB
            cells = paired_cells({s: d * scale / 100 for s, d in diffs.items()}, bounds.get(key))
            lines.append(f"| {mu:g} | {label} | {per['fedavg']} | {per['fedprox']} | {cells} |")
    lines += [
        "",
        "Verdict rule: as the quality grid's (docs/results.md): 'ahead' or 'behind at every "
        "seed' only when every paired difference has one sign and the mean exceeds the metric's "
        "noise bound where one is measured (the probe's, from docs/eval-protocol.md); k-NN and "
        "PSNR have no measured bound, so one sign at every seed is required. Otherwise "
        "'not shown'. With 3 seeds the paired t-test rests on 2 degrees of freedom.",
    ]
    (docs / "fedprox.md").write_text("\n".join(lines) + "\n")
    plot(fedavg, fedprox, pairs, docs / "fedprox.png")
    return "\n".join(lines)


def plot(fedavg: dict, fedprox: dict, pairs: dict[float, list[int]], path: Path) -> None:
    """Per metric, FedProx − FedAvg for each mu and seed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 + 2.5 * len(METRICS), 3.4))
    for ax, (key, label, scale) in zip(axes, METRICS, strict=True):
        bars = [(f"{mu:g}\ns{s}", scale * (value(fedprox[mu][s], key) - value(fedavg[s], key)))
                for mu, seeds in pairs.items() for s in seeds]  # fmt: skip
        ax.bar([b for b, _ in bars], [d for _, d in bars],
               color=["tab:green" if d > 0 else "tab:red" for _, d in bars])  # fmt: skip
        ax.axhline(0, color="0.3", lw=0.8)
        ax.tick_params(axis="x", labelsize=7)
        ax.set(title=label, ylabel="FedProx − FedAvg", xlabel="mu / seed")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--mu", type=float, nargs="+", default=[default_run_config()["proximal-mu"]],
        help="FedProx's proximal mu, one set of runs each",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=GRID_OUT_ROOT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--remake-reference", action="store_true",
        help="make FedAvg seed 0 again first and stop unless it matches the grid's run",
    )  # fmt: skip
    args = parser.parse_args(argv)
    archive = run_archive.archive_dir(args.docs, args.out)
    run_archive.restore_runs(args.out, archive)
    fedavg, fedprox, remade = runs(
        args.seeds, args.mu, args.out, args.report_only, args.remake_reference
    )
    if not any(fedavg.keys() & runs.keys() for runs in fedprox.values()):
        print(f"[{TAG}] no seed with both runs finished: nothing to report", flush=True)
        return 1
    names = [r["name"] for runs in fedprox.values() for r in runs.values()]
    run_archive.archive_runs(names, args.out, archive)
    command = command_line("benchmarks.fedprox", argv)
    print(report(fedavg, fedprox, command, args.docs, remade))
    print(json.dumps({f"{mu:g}": sorted(runs) for mu, runs in fedprox.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
