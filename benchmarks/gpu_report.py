"""Report of the fmnist-gpu preset's runs on a GPU: does pretraining pay at R=10 x E=4?

Each run (``scripts/gpu_check.sh``, i.e. ``python -m fedmae_flwr.inprocess --num-nodes 100
--run-config "preset='fmnist-gpu' seed=S"``) evaluates its FedMAE backbone and a random-init
backbone of the same seed with one protocol, so every seed is a paired comparison.

    .venv/bin/python -m benchmarks.gpu_report --runs docs/gpu   # the summaries kept in the repo

Writes ``docs/gpu.md`` and ``docs/gpu-pretraining-pays.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import DOCS, PROTOCOLS

GPU_COMMAND = (
    "scripts/gpu_check.sh OUT .devdata/fashion-mnist 470 1 0, then 250 2 3 "
    "(python -m fedmae_flwr.inprocess --num-nodes 100 --run-config \"preset='fmnist-gpu' "
    'seed=S data-path=..."), one NVIDIA H200, PyTorch 2.11 + CUDA 13, 2026-11-26'
)


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """The ``*-summary.json`` files in ``folder``, by seed."""
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*-summary.json"))]
    if not runs:
        raise FileNotFoundError(f"no *-summary.json under {folder}")
    return runs


def seed_of(run: dict[str, Any]) -> int:
    return int(run["run-name"].rsplit("-s", 1)[1])


def paired_rows(runs: list[dict[str, Any]]) -> list[tuple[int, list[tuple[float, float]]]]:
    """Per run, in order: its seed and (fedmae, random-init) top-1 in % per ``PROTOCOLS``."""
    return [
        (
            seed_of(r),
            [(100 * r[key]["fedmae"], 100 * r[key]["random-init"]) for key, _ in PROTOCOLS],
        )
        for r in runs
    ]


def write_report(runs: list[dict[str, Any]], command: str, docs: Path) -> Path:
    runs = sorted(runs, key=seed_of)
    rows = paired_rows(runs)
    labels = [label for _, label in PROTOCOLS]
    table = [
        "| seed | "
        + " | ".join(f"{lab}: fedmae / random-init (diff)" for lab in labels)
        + " | PSNR (dB) | run wall s | client s / round |",
        "|---" * (len(labels) + 4) + "|",
    ]
    for (seed, pairs), run in zip(rows, runs, strict=True):
        cells = [f"{a:.1f} / {b:.1f} ({a - b:+.1f})" for a, b in pairs]
        comm = run["communication"]
        table.append(
            f"| {seed} | " + " | ".join(cells) + f" | {run['final-psnr']:.2f} | "
            f"{run['wall-seconds']:.0f} | {comm['client-train-seconds-mean']:.2f} |"
        )
    columns = list(zip(*(pairs for _, pairs in rows), strict=True))  # one per protocol
    means = [statistics.fmean(a - b for a, b in col) for col in columns]
    wins = [sum(a > b for a, b in col) for col in columns]
    protocol = runs[0]["downstream"]["protocol"]
    lines = [
        "# fmnist-gpu on a GPU: does pretraining pay at R=10 x E=4?",
        "",
        f"Command: `{command}`.",
        "",
        "The benchmark federation (Fashion-MNIST, 100 IID nodes, 10 per round, K=4 blocks) at "
        "the budget where pretraining paid in the CPU budget study (docs/budget.md, one seed "
        "there): R=10 rounds x E=4 local epochs per block. Each run evaluates its FedMAE "
        "backbone and a random-init backbone of the same seed with the full protocol "
        f"(fine-tune {protocol['finetune-labels']} labels for {protocol['finetune-epochs']} "
        f"epochs, probe on {protocol['probe-train-images']} images, "
        f"{protocol['test-images']} test images), so "
        "each seed is paired.",
        "",
        "These runs went through `fedmae_flwr.inprocess` (the real ServerApp run and ClientApp "
        "handlers, nodes one after the other in one process), not `flwr run`: Ray's wheel is "
        "larger than what could be carried to the lent GPU machine. Clients and the server's "
        "evaluation ran on the GPU.",
        "",
        *table,
        "",
        "Mean difference over seeds (points, positive = FedMAE ahead): "
        + ", ".join(
            f"{lab} {m:+.1f} (ahead at {w} of {len(rows)} seeds)"
            for lab, m, w in zip(labels, means, wins, strict=True)
        )
        + ".",
        "",
        "A whole run takes about 2 minutes on the H200, against ~19 minutes for the same "
        "budget on 2 CPU cores through `flwr run` (docs/budget.md), which is why the 90-minute "
        "CPU grid (docs/results.md) stays at R=5 x E=1.",
        "",
        "![paired differences](gpu-pretraining-pays.png)",
        "",
    ]
    docs.mkdir(parents=True, exist_ok=True)
    plot(rows, labels, docs / "gpu-pretraining-pays.png")
    path = docs / "gpu.md"
    path.write_text("\n".join(lines))
    return path


def plot(rows: list[tuple[int, list[tuple[float, float]]]], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    width = 0.8 / len(rows)
    for i, (seed, pairs) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [a - b for a, b in pairs], width, label=f"seed {seed}")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="fedmae - random-init (points)", title="fmnist-gpu (R=10 x E=4), one H200")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=DOCS / "gpu")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--command", default=GPU_COMMAND, help="what produced the runs")
    args = parser.parse_args(argv)
    path = write_report(load_runs(args.runs), args.command, args.docs)
    print(f"[gpu-report] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
