"""Report of the fmnist-gpu preset's runs on a GPU: does pretraining pay at R=10 x E=4?

Each run (``scripts/gpu_check.sh``: ``scripts/run.py --num-supernodes 100 --client-gpus 0.1
--run-config "preset='fmnist-gpu' seed=S"``; the runs in docs/gpu.md were made before that, with
the in-process runner of the time, ``GPU_COMMAND``) evaluates its FedMAE backbone and a random-init
backbone of the same seed with one protocol, so every seed is a paired comparison. A run's
settings are its ``<run>-config.yaml`` beside the summary when kept there, else its preset's
(the run-name without ``-s<seed>``) read through the schema, checked against the summary. Run
times are the summaries' ``wall-seconds``; the CPU comparison is the budget study's runs of the
same budget under ``--cpu-runs``, when they are there.

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

from benchmarks.budget import DEFAULT_BUDGETS, _signed, parse_budget
from benchmarks.harness import (
    BUDGET,
    DOCS,
    OUT_ROOT,
    PARTITIONS,
    finished_seeds,
    machines_text,
    protocols,
    pyplot,
    run_machines,
    run_variant,
    save_figure,
)
from benchmarks.quality import paired_differences
from benchmarks.significance import p_text, paired_t_p
from fedmae_flwr.config import load_config_yaml, resolve_config, to_flat

GPU_DEVICE = "one NVIDIA H200"
GPU_COMMAND = (
    "scripts/gpu_check.sh OUT .devdata/fashion-mnist 470 1 0, then 250 2 3 "
    "(python -m fedmae_flwr.inprocess --num-nodes 100 --run-config \"preset='fmnist-gpu' "
    f'seed=S data-path=..."), {GPU_DEVICE}, PyTorch 2.11 + CUDA 13, 2026-11-26'
)
# Keys a run's own config may differ in from its siblings' (where it ran, and which seed).
PER_RUN_KEYS = ("seed", "run-name", "output-dir", "data-path")
# Per run, in seed order: its seed and (fedmae, random-init) top-1 in % per protocol.
SeedPairs = list[tuple[int, list[tuple[float, float]]]]


def load_runs(folder: Path) -> list[dict[str, Any]]:
    """The ``*-summary.json`` files in ``folder``, each with its flat run-config as ``"config"``."""
    runs = []
    for path in sorted(folder.glob("*-summary.json")):
        run = json.loads(path.read_text())
        saved = path.with_name(path.name.replace("-summary.json", "-config.yaml"))
        if saved.is_file():
            cfg = load_config_yaml(saved)
        else:  # gpu_check.sh kept only the summary: the preset the run-name names
            cfg = resolve_config({"preset": preset_of(run), "seed": seed_of(run)})
        if (cfg.model.depth, cfg.num_rounds) != (run["depth"], run["rounds"]):
            raise ValueError(
                f"{path}: depth {run['depth']}, {run['rounds']} rounds, but its config has "
                f"depth {cfg.model.depth}, {cfg.num_rounds} rounds (preset changed since? keep "
                f"the run's config.yaml as {saved.name})"
            )
        runs.append({**run, "config": to_flat(cfg)})
    if not runs:
        raise FileNotFoundError(f"no *-summary.json under {folder}")
    return runs


def seed_of(run: dict[str, Any]) -> int:
    return int(run["run-name"].rsplit("-s", 1)[1])


def preset_of(run: dict[str, Any]) -> str:
    return run["run-name"].rsplit("-s", 1)[0]


def shared(runs: list[dict[str, Any]], what: str, value: Any) -> Any:
    """``value(run)``, which every run must agree on (else a ValueError naming ``what``)."""
    values = [value(r) for r in runs]
    if any(v != values[0] for v in values):
        raise ValueError(f"the runs differ in {what}: {values}; report them apart")
    return values[0]


def run_protocols(runs: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The report's protocols, labelled with the runs' own fine-tune label count."""
    return protocols(shared(runs, "protocol", lambda r: r["downstream"]["protocol"])
                     ["finetune-labels"])  # fmt: skip


def paired_rows(runs: list[dict[str, Any]]) -> SeedPairs:
    """Per run, in order: its seed and (fedmae, random-init) top-1 in % per protocol."""
    keys = [key for key, _ in run_protocols(runs)]
    return [
        (seed_of(r), [(100 * r[key]["fedmae"], 100 * r[key]["random-init"]) for key in keys])
        for r in runs
    ]


def cpu_counterparts(config: dict[str, Any], cpu_runs: Path) -> tuple[list[dict], list[dict]]:
    """The budget study's fedmae runs of the GPU runs' budget under ``cpu_runs``, and the
    random-init runs of their seeds; none where the GPU runs' federation is not the study's."""
    partition = next(
        (key for key, spec in PARTITIONS.items()
         if all(config[k] == v for k, v in spec.items())),
        None,
    )  # fmt: skip
    federation = {k: config[k] for k in ("depth", "clients-per-round")}
    if partition is None or any(BUDGET[k] != v for k, v in federation.items()):
        return [], []
    changes = {k: config[k] for k in ("rounds-per-stage", "local-epochs")}
    ours, floor = [], []
    for seed in finished_seeds(cpu_runs, "fedmae", partition, changes):
        ours.append(run_variant("fedmae", partition, seed, cpu_runs, "gpu-report", changes,
                                report_only=True))  # fmt: skip
        random_init = run_variant("random-init", partition, seed, cpu_runs, "gpu-report",
                                  report_only=True)  # fmt: skip
        if random_init is not None:
            floor.append(random_init)
    return ours, floor


def budget_text(
    config: dict[str, Any], cpu: list[dict], floor: list[dict], labels: list[tuple[str, str]]
) -> str:
    """Where the GPU runs' budget sits in the CPU budget study, from that study's runs."""
    budget = (config["rounds-per-stage"], config["local-epochs"])
    if budget not in [parse_budget(b) for b in DEFAULT_BUDGETS]:
        return ""
    if not cpu:
        # The study lists the budget, but no run of it under today's protocol is here to compare.
        return (
            ", a budget the CPU budget study (docs/budget.md) has not measured under today's "
            "protocol"
        )
    text = ", a budget of the CPU budget study (docs/budget.md)"
    diffs = ", ".join(
        f"{label} {_signed(list(paired_differences(cpu, floor, key, 'random-init').values()))}"
        for key, label in labels
    )
    seeds = sorted(r["seed"] for r in cpu)
    return (
        f"{text}, where FedMAE against random init of the same seed scored {diffs} points "
        f"(seeds {seeds})"
    )


def time_text(runs: list[dict[str, Any]], cpu: list[dict]) -> str:
    """The runs' ServerApp wall time, against the CPU runs' of the same budget when there."""
    seconds = [r["wall-seconds"] for r in runs]
    spread = f" ({min(seconds):.0f} to {max(seconds):.0f} s)" if len(seconds) > 1 else ""
    text = (
        f"A whole run takes {statistics.fmean(seconds) / 60:.1f} min of ServerApp wall time on "
        f"{GPU_DEVICE}{spread}"
    )
    grid = (
        f"the CPU grid (docs/results.md) stays at R={BUDGET['rounds-per-stage']} x "
        f"E={BUDGET['local-epochs']}"
    )
    if not cpu:
        return f"{text}; {grid} (no CPU run of this budget is here to compare its time)."
    cpu_minutes = statistics.fmean(r["summary"]["wall-seconds"] for r in cpu) / 60
    where = machines_text(run_machines(cpu))
    return (
        f"{text}, against {cpu_minutes:.0f} min for the same budget on {where} through "
        f"`flwr run` (docs/budget.md), which is why {grid}."
    )


# What the report says of the runs GPU_COMMAND made (2026-11-26), the ones in docs/gpu.md.
RUNNER_NOTE = (
    "These runs went through `fedmae_flwr.inprocess` (the real ServerApp run and ClientApp "
    "handlers, nodes one after the other in one process; a module since removed), not `flwr "
    "run`: Ray's wheel was then larger than what could be carried to the lent GPU machine "
    "(docs/gpu-checks.md now packs a pruned one, so the next runs go through `flwr run` and "
    "Ray). Clients and the server's evaluation ran on the GPU. Two further seeds (3, 4), made "
    "later on another lent machine and not kept here, reversed the probe: FedMAE 73.7 / 73.9 "
    "against random init 76.2 / 76.3 (docs/earlier-results.md)."
)
# Where the runs fine-tuned one label subset (before the protocol of docs/eval-protocol.md).
ONE_SUBSET_NOTE = (
    "Each run fine-tuned one label subset, before the protocol of docs/eval-protocol.md: that "
    "fine-tune's random-init values alone spanned 51-66 across seeds at this budget "
    "(docs/earlier-results.md), more than the differences below, so its column gives no "
    "verdict. Their probe used the fixed lr 0.1, for which no noise bound was measured (the "
    "1.7 points of docs/eval-protocol.md bound the probe whose lr is chosen on validation)."
)


def write_report(
    runs: list[dict[str, Any]], command: str, docs: Path, cpu_runs: Path | None = None
) -> Path:
    """``docs/gpu.md`` and its plot; ``cpu_runs``: the budget study's runs, for comparison."""
    runs = sorted(runs, key=seed_of)
    rows = paired_rows(runs)
    labels = [label for _, label in run_protocols(runs)]
    preset = shared(runs, "preset", preset_of)
    config = shared_config(runs)
    rounds, epochs = config["rounds-per-stage"], config["local-epochs"]
    cpu, floor = cpu_counterparts(config, cpu_runs) if cpu_runs else ([], [])
    lines = [
        f"# {preset} on a GPU: does pretraining pay at R={rounds} x E={epochs}?",
        "",
        f"Command: `{command}`.",
        "",
        setup_text(runs, config, cpu, floor),
        "",
        *([RUNNER_NOTE, ""] if command == GPU_COMMAND else []),
        *(
            [ONE_SUBSET_NOTE, ""]
            if runs[0]["downstream"]["protocol"].get("finetune-subsets", 1) <= 1
            else []
        ),
        *seed_table(rows, runs, labels),
        "",
        mean_difference_text(rows, labels),
        "",
        time_text(runs, cpu),
        "",
        "![paired differences](gpu-pretraining-pays.png)",
        "",
    ]
    docs.mkdir(parents=True, exist_ok=True)
    title = f"{preset} (R={rounds} x E={epochs}), {GPU_DEVICE}"
    plot(rows, labels, title, docs / "gpu-pretraining-pays.png")
    path = docs / "gpu.md"
    path.write_text("\n".join(lines))
    return path


def shared_config(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The flat run-config every run shares, less the keys a run has of its own."""
    return shared(runs, "settings", lambda r: {k: v for k, v in r["config"].items()
                                                if k not in PER_RUN_KEYS})  # fmt: skip


def finetune_text(protocol: dict[str, Any]) -> str:
    """How the runs fine-tuned: one subset, or the protocol's subsets with an lr chosen on
    validation (runs that predate the protocol's keys fine-tuned one subset at one lr)."""
    labels, epochs = protocol["finetune-labels"], protocol["finetune-epochs"]
    subsets = protocol.get("finetune-subsets", 1)
    if subsets <= 1:
        return f"fine-tune {labels} labels for {epochs} epochs"
    grid = " / ".join(f"{lr:g}" for lr in protocol["finetune-lr-grid"])
    share = round(100 * protocol["finetune-val-fraction"])
    return (f"fine-tune {subsets} disjoint subsets of {labels} labels for {epochs} epochs, the lr "
            f"chosen from {grid} on a {share} % validation share of each, mean over the "
            "subsets")  # fmt: skip


def setup_text(
    runs: list[dict[str, Any]], config: dict[str, Any], cpu: list[dict], floor: list[dict]
) -> str:
    """The federation, the budget (against the CPU study's runs ``cpu`` and their random-init
    ``floor``, when there) and the protocol."""
    keyed = run_protocols(runs)
    nodes = shared(runs, "nodes", lambda r: r["data"]["partitions"]["num-partitions"])
    split = "IID" if config["partitioner"] == "iid" else config["partitioner"]
    protocol = runs[0]["downstream"]["protocol"]
    return (
        f"The benchmark federation (Fashion-MNIST, {nodes} {split} nodes, "
        f"{config['clients-per-round']} per round, K={config['depth']} blocks) at "
        f"R={config['rounds-per-stage']} rounds x E={config['local-epochs']} local epochs per "
        f"block{budget_text(config, cpu, floor, keyed)}. Each run evaluates its FedMAE "
        "backbone and a random-init backbone of the same seed with the full protocol "
        f"({finetune_text(protocol)}, probe on {protocol['probe-train-images']} images, "
        f"{protocol['test-images']} test images), so "
        "each seed is paired."
    )


def seed_table(rows: SeedPairs, runs: list[dict[str, Any]], labels: list[str]) -> list[str]:
    """One row per seed: fedmae / random-init per protocol, PSNR and times."""
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
    return table


def mean_difference_text(rows: SeedPairs, labels: list[str]) -> str:
    """Per protocol: the mean paired difference, at how many seeds FedMAE was ahead, and the
    paired t-test's two-sided p (``benchmarks.significance``)."""
    columns = list(zip(*(pairs for _, pairs in rows), strict=True))  # one per protocol
    means = [statistics.fmean(a - b for a, b in col) for col in columns]
    wins = [sum(a > b for a, b in col) for col in columns]
    ps = [p_text(paired_t_p([a - b for a, b in col])) for col in columns]
    return (
        "Mean difference over seeds (points, positive = FedMAE ahead; p: two-sided paired "
        "t-test over the seeds): "
        + ", ".join(
            f"{lab} {m:+.1f} (ahead at {w} of {len(rows)} seeds, p {p})"
            for lab, m, w, p in zip(labels, means, wins, ps, strict=True)
        )
        + "."
    )


def plot(rows: SeedPairs, labels: list[str], title: str, path: Path) -> None:
    """Bars of the paired differences: one group per protocol, one bar per seed."""
    fig, ax = pyplot().subplots(figsize=(6, 3.6))
    width = 0.8 / len(rows)
    for i, (seed, pairs) in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [a - b for a, b in pairs], width, label=f"seed {seed}")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set(ylabel="fedmae - random-init (points)", title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=DOCS / "gpu")
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--command", default=GPU_COMMAND, help="what produced the runs")
    parser.add_argument(
        "--cpu-runs", type=Path, default=OUT_ROOT, help="the budget study's runs, to compare"
    )
    args = parser.parse_args(argv)
    path = write_report(load_runs(args.runs), args.command, args.docs, args.cpu_runs)
    print(f"[gpu-report] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
