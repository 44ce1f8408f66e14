"""What sampling by node key costs: one ``query`` per node, once per run, on Flower's Ray engine.

FedMAE asks every node for its key before it first samples (:mod:`fedmae_flwr.strategies
.node_keys`), so that one seed trains the same partitions whatever random ids the simulation
draws; ``sample-by=node-id`` skips the queries. This benchmark runs the app both ways through
``flwr.simulation.run_simulation`` (Ray backend, one CPU per virtual client) on Fashion-MNIST at
several numbers of SuperNodes, side by side, with a small model and schedule (1 block x 3
rounds, 10 nodes per round, light evaluation), and times the whole simulation, the first round
(which includes the queries and the Ray actors' warm-up, paid either way) and the key queries
themselves (``NodeKeys.learn``, wrapped here). Repeats are separate simulations; the report
gives medians and the cost as the difference of the two modes' medians.

    .venv/bin/python -m benchmarks.node_keys --supernodes 100 1000 2000 --repeats 2

Writes ``docs/node-keys.md`` and ``docs/node-keys.png`` (and ``<out>/results.json``, with a tracked
copy in ``docs/data/node-keys/`` that ``--report-only`` reads where ``<out>`` has none).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    DOCS,
    keep_results,
    machine_line,
    niceness_text,
    pyplot,
    ray_workers_as_make_run,
    reported_results,
    results_archive,
    results_text,
    save_figure,
    saved_results,
    start_results,
)
from fedmae_flwr.data.fashion_mnist import DEFAULT_DIR

OUT = Path("outputs/bench-node-keys")
PAGE = "node-keys"
DATA = Path(DEFAULT_DIR)  # the app's own default, so both read one place
SMALL_RUN = {
    "depth": 1, "rounds-per-stage": 3, "clients-per-round": 10, "evaluate-clients": 0,
    "embed-dim": 64, "num-heads": 2, "decoder-embed-dim": 32, "decoder-num-heads": 2,
    "eval-images": 100, "grid-images": 4, "probe-train-images": 200, "probe-epochs": 1,
    "stage-knn-images": 100, "test-images": 100, "finetune-labels": 0,
    "evaluate-random-init": False, "node-wait-timeout": 600,
}  # fmt: skip


def simulate(
    num_supernodes: int, sample_by: str, data: Path, out: Path, name: str
) -> dict[str, Any]:
    """One simulation; the key queries' seconds and node count, round seconds, wall seconds."""
    from flwr.simulation import run_simulation

    from fedmae_flwr.client_app import build_client_app
    from fedmae_flwr.server_app import build_server_app
    from fedmae_flwr.strategies.node_keys import NodeKeys

    timings: list[tuple[float, int]] = []
    learn = NodeKeys.learn

    def timed_learn(self: NodeKeys, grid: Any, node_ids: Any, timeout: float) -> None:
        node_ids = list(node_ids)
        asked = len(set(node_ids) - set(self._keys))
        start = time.perf_counter()
        learn(self, grid, node_ids, timeout)
        if asked:
            timings.append((time.perf_counter() - start, asked))

    overrides = {**SMALL_RUN, "sample-by": sample_by, "data-path": str(data),
                 "output-dir": str(out), "run-name": name}  # fmt: skip
    NodeKeys.learn = timed_learn  # the ServerApp runs in this process (a thread of it)
    start = time.perf_counter()
    try:
        run_simulation(
            server_app=build_server_app(overrides),
            client_app=build_client_app(overrides),
            num_supernodes=num_supernodes,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0}},
        )
    finally:
        NodeKeys.learn = learn
    wall = time.perf_counter() - start
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    if len(rows) != SMALL_RUN["rounds-per-stage"] or len(timings) != (sample_by == "node-key"):
        raise RuntimeError(f"{name}: {len(rows)} rounds and {len(timings)} key rounds recorded")
    return {
        "supernodes": num_supernodes,
        "sample-by": sample_by,
        "queried": timings[0][1] if timings else 0,
        "key-seconds": timings[0][0] if timings else 0.0,
        "round-seconds": [r["seconds"] for r in rows],
        "wall-seconds": wall,
        # stamped when measured, so that --report-only rewrites the page with the measuring
        # day and machine rather than today's
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine_line(),
    }


def report(results: list[dict[str, Any]], command: str, docs: Path) -> None:
    runs: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in results:
        runs.setdefault((r["supernodes"], r["sample-by"]), []).append(r)

    def median(n: int, mode: str, field: str) -> float:
        values = [r[field] if field != "round-1" else r["round-seconds"][0] for r in runs[n, mode]]
        return statistics.median(values)

    dates = sorted({r.get("date", "date not recorded") for r in results})
    machines = sorted({r.get("machine", "machine not recorded") for r in results})
    lines = [
        "# What sampling by node key costs",
        "",
        f"Command: `{command}` ({'; '.join(machines)}; {' to '.join(dates)}; "
        f"{niceness_text(results)}). {results_text(OUT, results_archive(docs, PAGE))} "
        "Seconds are the machine's at the time: other jobs may have shared it, and per-"
        "message costs grow steeply when they do (docs/findings.md, 'One seed, one result').",
        "",
        "FedMAE asks every node once per run for its key (a `query` message; "
        "`fedmae_flwr/strategies/node_keys.py`) and samples nodes in key order, so that one seed "
        "trains the same partitions in every run although Flower's simulation draws new random "
        "node ids each time (`tests/test_simulation.py`: two Ray simulations at one seed give "
        "bit-identical backbones, and so does a simulation resumed from a checkpoint). "
        "`sample-by=node-id` skips the queries. Both ran side by side: "
        "`flwr.simulation.run_simulation`, Ray backend, 1 CPU per virtual client, Fashion-MNIST "
        "split over the SuperNodes, 1 block x 3 rounds of 10 nodes, width 64. Medians over the "
        "repeats, in seconds. Round 1 includes the queries and the Ray actors' warm-up (paid "
        "in both modes); the cost of the keys is the difference of the two modes' whole "
        "simulations.",
        "",
        "| SuperNodes | repeats | key queries | round 1, node-key | round 1, node-id | "
        "simulation, node-key | simulation, node-id | cost | cost per node (ms) | cost per "
        "repeat |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    plotted = []
    for n in sorted({n for n, _ in runs}):
        if (n, "node-id") not in runs or (n, "node-key") not in runs:
            continue
        cost = median(n, "node-key", "wall-seconds") - median(n, "node-id", "wall-seconds")
        pairs = zip(runs[n, "node-key"], runs[n, "node-id"], strict=False)  # same repeat
        per_repeat = ", ".join(f"{k['wall-seconds'] - i['wall-seconds']:+.0f}" for k, i in pairs)
        plotted.append((n, median(n, "node-key", "key-seconds"), cost))
        lines.append(
            f"| {n} | {len(runs[n, 'node-key'])} | {median(n, 'node-key', 'key-seconds'):.1f} | "
            f"{median(n, 'node-key', 'round-1'):.1f} | {median(n, 'node-id', 'round-1'):.1f} | "
            f"{median(n, 'node-key', 'wall-seconds'):.0f} | "
            f"{median(n, 'node-id', 'wall-seconds'):.0f} | {cost:+.1f} | "
            f"{1000 * cost / n:+.0f} | {per_repeat} |"
        )
    lines += [
        "",
        "The queries are paid once per run (and again after a resume: a new simulation has new "
        "node ids). A node answers from its ClientApp's `query` handler without loading data or "
        "a model; what a query costs is Flower's per-message overhead on the Ray engine.",
        "",
        "![node-keys.png](node-keys.png)",
    ]
    (docs / "node-keys.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ns = [p[0] for p in plotted]
    ax.plot(ns, [p[1] for p in plotted], "o-", label="key queries (node-key)")
    ax.plot(ns, [p[2] for p in plotted], "s--", label="simulation: node-key - node-id")
    ax.set_xscale("log")
    ax.set_xlabel("SuperNodes")
    ax.set_ylabel("seconds")
    ax.legend()
    ax.set_title("Sampling by node key on Ray (2 CPU cores)")
    save_figure(fig, docs / "node-keys.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, nargs="+", default=[100, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--report-only", action="store_true", help="report <out>/results.json")
    args = parser.parse_args(argv)
    archive = results_archive(args.docs, PAGE)
    if args.report_only:
        report(*reported_results(args.out, archive), args.docs)
        return
    start_results(args.out, "benchmarks.node_keys", argv)
    with ray_workers_as_make_run() as workers:
        results = []
        for repeat in range(args.repeats):
            for n in args.supernodes:
                for mode in ("node-key", "node-id"):
                    with tempfile.TemporaryDirectory(dir=args.out) as runs:
                        name = f"n{n}-{mode}-r{repeat}"
                        result = simulate(n, mode, args.data, Path(runs), name)
                        results.append({**result, "worker-niceness": workers.value})
                print(json.dumps(results[-1]), file=sys.stderr)
                (args.out / "results.json").write_text(json.dumps(results, indent=1))
    keep_results(args.out, archive)
    report(results, saved_results(args.out)[1], args.docs)


if __name__ == "__main__":
    main()
