"""Flower's Ray engine beside other work: Ray's worker niceness against busy neighbours.

Ray starts its worker processes, which host Flower's virtual clients, at niceness 15 (its
``worker_niceness``), so that its own services stay responsive. On a machine that also runs
other work at the usual niceness 0, Linux then gives the virtual clients a small fraction of
each core they share with it, and the simulation slows far more than the share of the cores
the other work takes. This benchmark measures that side by side: the same simulation as
:mod:`benchmarks.ray_engine` (fmnist-gpu model, one block, CPU clients), with Ray's default
niceness or ``RAY_worker_niceness`` set (Ray reads it when ``ray.init`` starts its services,
which Flower does at every simulation), alone and beside ``--neighbours`` busy processes
(a pure-Python loop each, niceness 0, ended by PID after each simulation).

    .venv/bin/python -m benchmarks.ray_niceness --supernodes 200 --niceness ray 0 \
        --neighbours 0 2 --repeats 2

Writes ``docs/ray-niceness.md`` and ``docs/ray-niceness.png`` (and ``<out>/results.json``
after every simulation; a tracked copy in ``docs/data/ray-niceness/`` after the last, which
``--report-only`` reads where ``<out>`` has none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    DOCS,
    RAY_DEFAULT,
    WorkerNiceness,
    keep_results,
    machine_line,
    niceness_label,
    pyplot,
    reported_results,
    results_archive,
    results_text,
    save_figure,
    saved_results,
    start_results,
)
from benchmarks.ray_engine import DATA, concurrency, simulate, summarize
from scripts.run import RAY_WORKER_NICENESS

OUT = Path("outputs/bench-ray-niceness")
PAGE = "ray-niceness"
NICENESS_ENV = RAY_WORKER_NICENESS  # the variable scripts/run.py sets for `make run`


class BusyNeighbours:
    """``count`` CPU-bound processes (niceness 0) for the duration of a ``with`` block.

    Each is a bare ``while True: pass`` in a new Python; all are ended by their PIDs on exit
    (terminate, then kill after 5 s), whatever the block raised.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> BusyNeighbours:
        for _ in range(self.count):
            self.processes.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def niceness_value(text: str) -> str:
    """``ray`` or a whole number in [-20, 19] (argparse type); the error names what is allowed."""
    if text == RAY_DEFAULT:
        return text
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -20 <= value <= 19:
        raise argparse.ArgumentTypeError(
            f"{text!r}: allowed are '{RAY_DEFAULT}' (Ray's default) or a whole number -20..19"
        )
    return str(value)


def report(results: list[dict[str, Any]], command: str, docs: Path) -> None:
    """``docs/ray-niceness.md`` (a row per niceness x neighbours) and ``ray-niceness.png``."""
    docs.mkdir(parents=True, exist_ok=True)
    first = results[0]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["niceness"], r["neighbours"]), []).append(r)

    def med(runs: list[dict[str, Any]], field: str) -> float:
        if field in ("round-1", "steady"):
            return statistics.median(summarize(r)[field] for r in runs)
        return statistics.median(r[field] for r in runs)

    lines = [
        "# Flower's Ray engine beside other work: Ray's worker niceness",
        "",
        f"Command: `{command}` ({first['machine']}; {first['date']}). "
        + results_text(OUT, results_archive(docs, PAGE)),
        "",
        "Ray runs Flower's virtual clients in worker processes at niceness 15 unless "
        f"`{NICENESS_ENV}` says otherwise. Each row is the same simulation as "
        "docs/ray-engine-cpu.md's (`flwr.simulation.run_simulation`, Ray backend, "
        f"{first['supernodes']} SuperNodes, {first['clients']} clients per round of 1 CPU each, "
        f"the fmnist-gpu model on one block for {len(first['round-seconds'])} rounds), with that "
        "niceness, alone or beside `busy neighbours`: CPU-bound processes at niceness 0, as any "
        "other program on the machine runs, started before the simulation and ended after it. "
        "Medians over the repeats (separate simulations, the conditions interleaved); `x alone` "
        "is the steady round against the same niceness without neighbours.",
        "",
        "| worker niceness | busy neighbours | repeats | round 1 (s) | key queries (s) | "
        "steady round (s) | x alone | client train s | simulation (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    bars = []
    for (niceness, neighbours), runs in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != RAY_DEFAULT, kv[0][0], kv[0][1])
    ):
        steady = med(runs, "steady")
        alone = groups.get((niceness, 0))
        ratio = f"{steady / med(alone, 'steady'):.1f}" if alone else "-"
        label = niceness_label(niceness)
        bars.append((f"{label}\n{neighbours} busy", steady))
        lines.append(
            f"| {label} | {neighbours} | {len(runs)} | {med(runs, 'round-1'):.1f} | "
            f"{med(runs, 'key-seconds'):.1f} | {steady:.2f} | {ratio} | "
            f"{med(runs, 'client-train-seconds'):.2f} | {med(runs, 'wall-seconds'):.0f} |"
        )
    lines += ["", "![ray-niceness.png](ray-niceness.png)"]
    (docs / "ray-niceness.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    ax.bar(range(len(bars)), [b[1] for b in bars])
    ax.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("steady round (s, log)")
    ax.set_title(f"Ray engine beside busy processes ({first['machine'].split(',')[0]})")
    save_figure(fig, docs / "ray-niceness.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=200)
    parser.add_argument("--clients", type=int, default=10, help="clients per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--niceness", type=niceness_value, nargs="+", default=[RAY_DEFAULT, "0"],
        help=f"worker niceness per condition: '{RAY_DEFAULT}' (unset) or -20..19",
    )  # fmt: skip
    parser.add_argument("--neighbours", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--report-only", action="store_true", help="report <out>/results.json")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: needs >= 2 (round 1 is reported apart)")
    if args.clients > args.supernodes:
        parser.error(f"--clients {args.clients}: at most --supernodes {args.supernodes}")
    if any(n < 0 for n in args.neighbours):
        parser.error(f"--neighbours {args.neighbours}: each must be >= 0")
    archive = results_archive(args.docs, PAGE)
    if args.report_only:
        report(*reported_results(args.out, archive), args.docs)
        return
    start_results(args.out, "benchmarks.ray_niceness", argv)
    base = {
        "supernodes": args.supernodes, "clients": args.clients, "client-cpus": 1.0,
        "client-gpus": 0.0, "at-once": concurrency(os.cpu_count() or 1, 1.0, 0.0, 0),
        "local-epochs": 1,
        "machine": machine_line(), "gpu": None, "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip
    results: list[dict[str, Any]] = []
    for repeat in range(args.repeats):  # interleaved, so a drift in the machine hits them all
        for niceness in args.niceness:
            for neighbours in args.neighbours:
                setting = {**base, "repeat": repeat, "niceness": niceness,
                           "neighbours": neighbours}  # fmt: skip
                name = f"nice{niceness}-busy{neighbours}-r{repeat}"
                with (
                    tempfile.TemporaryDirectory(dir=args.out) as runs,
                    WorkerNiceness(niceness),
                    BusyNeighbours(neighbours),
                ):
                    results.append(simulate(setting, args.data, Path(runs), name, args.rounds, 1))
                print(json.dumps(results[-1]), file=sys.stderr)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    keep_results(args.out, archive)
    report(results, saved_results(args.out)[1], args.docs)


if __name__ == "__main__":
    main()
