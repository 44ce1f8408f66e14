"""Ablations of FedMAE's design choices, one factor at a time, in the quality benchmark's harness.

Each row is the reference fedmae run (the harness' ``BUDGET`` and this module's ``REFERENCE``:
schema defaults) with one setting changed to a value of ``FACTORS``: mask ratio, next block
copied from the last finished one, decoder reset at each stage, depth K (R stays the same per
stage, so K changes the rounds too). Runs are shared with the other benchmarks under
``outputs/bench/``; finished ones are loaded, not re-run.

    .venv/bin/python -m benchmarks.ablations                # every factor, seed 0
    .venv/bin/python -m benchmarks.ablations --factors mask-ratio depth --seeds 0 1

Writes ``docs/ablations.md`` and ``docs/ablations.png``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks import run_archive
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
    finished_seeds,
    machines_text,
    mean_std,
    pyplot,
    run_machines,
    run_variant,
    save_figure,
)
from fedmae_flwr.config import default_run_config

# The reference run's value of each factor: the schema default.
REFERENCE: dict[str, Any] = {
    key: default_run_config()[key]
    for key in ("mask-ratio", "next-block-init", "decoder-per-stage", "depth")
}
# Factor -> the values tried besides the reference one.
FACTORS: dict[str, tuple[Any, ...]] = {
    "mask-ratio": (0.5, 0.9),
    "next-block-init": ("copy",),
    "decoder-per-stage": ("reset",),
    "depth": (2, 6),
}


def ablation_runs(
    factors: list[str], seeds: list[int], partition: str, out_root: Path, report_only: bool
) -> tuple[list[dict], dict[tuple[str, Any], list[dict]]]:
    """The reference runs and, per (factor, value), the runs with that one change."""
    reference: list[dict] = []
    variants: dict[tuple[str, Any], list[dict]] = {}
    for seed in seeds:
        run = run_variant("fedmae", partition, seed, out_root, "bench-ablations",
                          report_only=report_only)  # fmt: skip
        if run is not None:
            reference.append(run)
        for factor in factors:
            for value in FACTORS[factor]:
                run = run_variant(
                    "fedmae", partition, seed, out_root, "bench-ablations", {factor: value},
                    timeout=7200, report_only=report_only,
                )  # fmt: skip
                if run is not None:
                    variants.setdefault((factor, value), []).append(run)
    return reference, variants


def reference_at_every_seed(partition: str, out_root: Path) -> list[dict]:
    """The reference configuration's finished runs at every seed under ``out_root``.

    Their fine-tune accuracies are the measured run-to-run spread a one-seed report cites.
    """
    runs = [
        run_variant("fedmae", partition, seed, out_root, "bench-ablations", report_only=True)
        for seed in finished_seeds(out_root, "fedmae", partition)
    ]
    return [run for run in runs if run is not None]


def _and(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1] if len(items) > 1 else "".join(items)


def depth_note(variants: dict) -> str:
    """How many rounds the depth rows train: K stages of the reference's R rounds each."""
    depths = sorted({value for factor, value in variants if factor == "depth"}, reverse=True)
    if not depths:
        return ""
    per_stage = BUDGET["rounds-per-stage"]
    rounds = [f"K={depths[0]} trains for {depths[0] * per_stage} rounds"]
    rounds += [f"K={k} for {k * per_stage}" for k in depths[1:]]
    return f" Depth keeps {per_stage} rounds per stage, so {_and(rounds)}."


def noise_note(reference: list[dict], seed_runs: list[dict]) -> str:
    """With one seed, the fine-tune spread the reference configuration showed over seeds."""
    if len({r["seed"] for r in reference}) > 1:
        return ""  # the table states the spread over seeds
    by_seed = sorted(
        (r["seed"], value)
        for r in seed_runs
        if (value := accuracy(r, "finetune-accuracy", "fedmae")) is not None
    )
    if len(by_seed) < 2:
        return (
            " With one seed, fine-tuning differences of a few points may be run-to-run noise "
            "(not measured here: the reference configuration has finished at one seed only)."
        )
    values = [100 * value for _, value in by_seed]
    return (
        " With one seed, read fine-tuning differences against run-to-run noise: the reference "
        f"configuration gave {_and([f'{v:.1f}' for v in values])} at seeds "
        f"{_and([str(seed) for seed, _ in by_seed])} (a spread of "
        f"{max(values) - min(values):.1f} points)."
    )


def _cells(runs: list[dict]) -> list[str]:
    comm = runs[0]["summary"]["communication"]
    return [
        *(mean_std(accuracies(runs, key, "fedmae")) for key, _ in PROTOCOLS),
        f"{statistics.fmean(r['summary']['final-psnr'] for r in runs):.2f}",
        f"{comm['client-train-mbytes-peak']:.0f}",
        f"{comm['bytes-up-per-client-round'] / 2**20:.2f}",
        f"{statistics.fmean(r['summary']['wall-seconds'] for r in runs):.0f}",
    ]


def plot(reference: list[dict], variants: dict, path: Path) -> None:
    plt = pyplot()
    factors = list(dict.fromkeys(factor for factor, _ in variants))
    measured = [
        100 * value
        for runs in (reference, *variants.values())
        for r in runs
        for key, _ in PROTOCOLS
        if (value := accuracy(r, key, "fedmae")) is not None
    ]
    ylim = (max(0, 10 * math.floor(min(measured) / 10) - 10),
            min(100, 10 * math.ceil(max(measured) / 10) + 5))  # fmt: skip
    fig, axes = plt.subplots(1, len(factors), figsize=(3.4 * len(factors), 3.4), squeeze=False)
    for ax, factor in zip(axes[0], factors, strict=True):
        rows = [(REFERENCE[factor], reference)] + [
            (value, runs) for (f, value), runs in variants.items() if f == factor
        ]
        rows.sort(key=lambda row: str(row[0]))
        width = 0.8 / len(PROTOCOLS)
        for i, (key, label) in enumerate(PROTOCOLS):
            heights = [
                100 * statistics.fmean(accuracy(r, key, "fedmae") for r in runs) for _, runs in rows
            ]
            ax.bar([j + i * width for j in range(len(rows))], heights, width, label=label)
        ax.set_xticks(
            [j + width for j in range(len(rows))],
            [f"{v}{' (ref)' if v == REFERENCE[factor] else ''}" for v, _ in rows],
        )
        ax.set(title=factor, ylabel="top-1 (%)", ylim=ylim)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


def write_report(
    reference: list[dict],
    variants: dict,
    command: str,
    partition: str,
    docs: Path,
    seed_runs: list[dict] | None = None,
) -> Path:
    """``docs/ablations.md`` and its plot; ``seed_runs``: see ``reference_at_every_seed``."""
    docs.mkdir(parents=True, exist_ok=True)
    pictures = []
    if reference and variants:
        plot(reference, variants, docs / "ablations.png")
        pictures.append("![ablations.png](ablations.png)")
    seeds = sorted({r["seed"] for r in reference})
    machines = machines_text(run_machines([*reference, *(r for v in variants.values() for r in v)]))
    lines = [
        "# Ablations: one FedMAE design choice at a time",
        "",
        f"Command: `{command}` (seeds {seeds}; {machines}).",
        "",
        f"Reference: fedmae on Fashion-MNIST, {partition} over {NUM_SUPERNODES} nodes, "
        + ", ".join(f"{k}={v}" for k, v in {**BUDGET, **REFERENCE}.items())
        + f". Each other row changes one setting.{depth_note(variants)} Evaluation: "
        + ", ".join(f"{k}={v}" for k, v in EVALUATION.items() if k != "evaluate-random-init")
        + f" ({EVALUATION_PROTOCOL}). Top-1 in %, mean ± std over seeds. PSNR is measured on "
        "the masked patches at each row's own mask ratio, so it compares within a ratio only."
        + noise_note(reference, seed_runs or reference),
        "",
        "| factor | value | " + " | ".join(label for _, label in PROTOCOLS) + " | masked PSNR (dB) "
        "| client peak train MiB | MiB up / client-round | run wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if reference:
        lines.append("| reference | - | " + " | ".join(_cells(reference)) + " |")
    for (factor, value), runs in variants.items():
        lines.append(f"| {factor} | {value} | " + " | ".join(_cells(runs)) + " |")
    lines += ["", *pictures, ""]
    path = docs / "ablations.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factors", nargs="+", default=list(FACTORS), choices=FACTORS)
    add_run_arguments(parser, seeds=[0])
    run_archive.add_archive_argument(parser)
    args = parser.parse_args(argv)
    run_archive.sync(args.out, run_archive.archive_of(args), "bench-ablations")
    reference, variants = ablation_runs(
        args.factors, args.seeds, args.partition, args.out, args.report_only
    )
    if not reference and not variants:
        raise run_archive.nothing_to_report(args, "bench-ablations", "these factors")
    command = command_line("benchmarks.ablations", argv)
    seed_runs = reference_at_every_seed(args.partition, args.out)
    names = sorted({r["name"] for runs in [reference, seed_runs, *variants.values()] for r in runs})
    run_archive.keep_and_check(names, args, "ablations.md", "bench-ablations")
    path = write_report(reference, variants, command.strip(), args.partition, args.docs, seed_runs)
    run_archive.mark_page(path, names)
    print(f"[bench-ablations] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
