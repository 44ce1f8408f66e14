"""Flower's Ray engine with virtual clients sharing a GPU: rounds/s and GPU utilisation.

The way a user scales FedMAE on one machine: ``flwr.simulation.run_simulation`` (the engine
behind ``flwr run`` with ``options.backend.client-resources``), many SuperNodes, each virtual
client asking Ray for ``--client-cpus`` CPUs and ``--client-gpus`` of a GPU, so that Ray packs
``min(CPUs / client-cpus, 1 / client-gpus)`` clients on the machine at once. For each setting
(clients per round x GPU share) one simulation trains a short schedule of the fmnist-gpu model
(width 192, ``--rounds`` rounds of one block, ``--local-epochs`` per round, light evaluation)
and records:

- each round's seconds, stamped when the ServerApp appends its metrics row (this process runs
  the ServerApp; ``RunOutputs.append_metrics`` is wrapped here), so round 1 (Ray's actors
  starting, CUDA contexts, data loading) is reported apart from the steady rounds after it;
- the GPU's utilisation and memory, sampled every ``SAMPLE_SECONDS`` with ``nvidia-smi`` in a
  thread, averaged over the steady rounds (none where no GPU is visible: the CPU path the tests
  take).

    .venv/bin/python -m benchmarks.ray_engine --supernodes 1000 --clients 10 20 50 \
        --client-gpus 0.1 0.05

Writes ``docs/<name>.md`` and ``docs/<name>.png`` (``--name``, default ``ray-engine``; and
``<out>/results.json`` after every
simulation, so a run stopped by a time limit keeps what it measured; a tracked copy in
``docs/data/<name>/`` after the last, which ``--report-only`` reads where ``<out>`` has none).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
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

OUT = Path("outputs/bench-ray-engine")
DATA = Path(DEFAULT_DIR)  # the app's own default, so both read one place
SAMPLE_SECONDS = 0.5
# The fmnist-gpu model (conf/fmnist-gpu.yaml: width 192, patch 4) on one block, evaluated lightly:
# this measures the engine's training rounds, not the evaluation after them.
RUN = {
    "device": "auto", "depth": 1, "evaluate-clients": 0, "eval-images": 100, "grid-images": 4,
    "probe-train-images": 200, "probe-epochs": 1, "stage-knn-images": 100, "test-images": 100,
    "finetune-labels": 0, "evaluate-random-init": False, "node-wait-timeout": 600,
}  # fmt: skip


class GpuSampler:
    """``nvidia-smi`` every ``interval`` seconds in a thread: (monotonic time, util %, MiB used).

    Samples nothing where ``nvidia-smi`` is missing or fails (no GPU): ``samples`` stays empty.
    """

    def __init__(self, interval: float = SAMPLE_SECONDS) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.available = shutil.which("nvidia-smi") is not None

    def _loop(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                 "--format=csv,noheader,nounits", "--id=0"]  # fmt: skip
        while not self._stop.is_set():
            try:
                line = subprocess.run(query, capture_output=True, text=True, timeout=5).stdout
                util, mib = (float(v) for v in line.strip().split(","))
            except (OSError, ValueError, subprocess.SubprocessError):
                return  # no GPU to sample: leave the samples empty
            self.samples.append((time.monotonic(), util, mib))
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        if self.available:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


def steady_window(
    round_ends: list[float], samples: list[tuple[float, float, float]]
) -> dict[str, float | None]:
    """GPU utilisation (mean %) and memory (peak MiB) over the rounds after the first.

    ``round_ends`` are the monotonic times the rounds' metrics rows were written; the window is
    (end of round 1, end of the last round]. ``None`` where no sample falls in it (no GPU, or a
    single round).
    """
    if len(round_ends) < 2:
        return {"gpu-util": None, "gpu-mib-peak": None}
    inside = [s for s in samples if round_ends[0] < s[0] <= round_ends[-1]]
    if not inside:
        return {"gpu-util": None, "gpu-mib-peak": None}
    return {
        "gpu-util": statistics.fmean(s[1] for s in inside),
        "gpu-mib-peak": max(s[2] for s in inside),
    }


def concurrency(cpus: int, client_cpus: float, client_gpus: float, gpus: int) -> int:
    """How many virtual clients Ray runs at once: the tighter of the CPU and the GPU share."""
    by_cpu = int(cpus // client_cpus)
    if client_gpus <= 0:
        return by_cpu
    return min(by_cpu, int(gpus / client_gpus + 1e-9))


def simulate(
    setting: dict[str, Any], data: Path, out: Path, name: str, rounds: int, local_epochs: int
) -> dict[str, Any]:
    """One simulation of ``setting``: its rounds' seconds, steady GPU use, wall seconds."""
    from flwr.simulation import run_simulation

    from fedmae_flwr.client_app import build_client_app
    from fedmae_flwr.run_outputs import RunOutputs
    from fedmae_flwr.server_app import build_server_app
    from fedmae_flwr.strategies.node_keys import NodeKeys

    ends: list[float] = []
    key_seconds: list[float] = []
    append, learn = RunOutputs.append_metrics, NodeKeys.learn

    def stamped_append(self: RunOutputs, row: dict[str, Any]) -> None:
        append(self, row)
        ends.append(time.monotonic())

    def timed_learn(self: NodeKeys, *args: Any, **kwargs: Any) -> None:
        began = time.perf_counter()
        learn(self, *args, **kwargs)
        key_seconds.append(time.perf_counter() - began)

    overrides = {**RUN, "rounds-per-stage": rounds, "local-epochs": local_epochs,
                 "clients-per-round": setting["clients"], "data-path": str(data),
                 "output-dir": str(out), "run-name": name}  # fmt: skip
    resources = {"num_cpus": setting["client-cpus"], "num_gpus": setting["client-gpus"]}
    # The ServerApp runs in this process (a thread of it): stamp its metrics rows and time its
    # key queries (sample-by=node-key asks every SuperNode once, inside round 1).
    RunOutputs.append_metrics, NodeKeys.learn = stamped_append, timed_learn
    start = time.perf_counter()
    try:
        with GpuSampler() as gpu:
            run_simulation(
                server_app=build_server_app(overrides),
                client_app=build_client_app(overrides),
                num_supernodes=setting["supernodes"],
                backend_config={"client_resources": resources},
            )
    finally:
        RunOutputs.append_metrics, NodeKeys.learn = append, learn
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    if len(rows) != rounds or len(ends) != rounds:
        raise RuntimeError(f"{name}: {len(rows)} of {rounds} rounds recorded")
    if any(r["clients"] != setting["clients"] for r in rows):
        raise RuntimeError(f"{name}: a round aggregated fewer than {setting['clients']} clients")
    return {
        **setting,
        "round-seconds": [r["seconds"] for r in rows],
        "key-seconds": sum(key_seconds),
        "images-per-round": rows[-1]["examples"],
        "client-train-seconds": statistics.median(r["train-seconds"] for r in rows[1:] or rows),
        **steady_window(ends, gpu.samples),
        "gpu-sampled": bool(gpu.samples),
        "wall-seconds": wall,
    }


def summarize(result: dict[str, Any]) -> dict[str, float]:
    """Round 1, the steady rounds' median seconds, rounds/s and images/s from one result."""
    seconds = result["round-seconds"]
    steady = statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0]
    return {
        "round-1": seconds[0],
        "steady": steady,
        "rounds-per-s": 1.0 / steady,
        # examples are the images each client holds; a local epoch sees each of them once
        "images-per-s": result["images-per-round"] * result["local-epochs"] / steady,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def report(
    results: list[dict[str, Any]], command: str, docs: Path, name: str = "ray-engine"
) -> None:
    """``docs/<name>.md`` (a row per setting) and ``docs/<name>.png``."""
    docs.mkdir(parents=True, exist_ok=True)  # a new --docs folder: measured results are not lost
    first = results[0]
    lines = [
        f"# Flower's Ray engine: {first['supernodes']} SuperNodes, clients "
        f"{'sharing a GPU' if first['gpu'] else 'on CPUs alone'}",
        "",
        f"Command: `{command}` ({first['machine']}; GPU: {first['gpu'] or 'none'}; "
        f"{first['date']}; {niceness_text(results)}). "
        + results_text(OUT, results_archive(docs, name)),
        "",
        "Each row is one `flwr.simulation.run_simulation` of this app (Ray backend; the engine "
        "`flwr run` uses), Fashion-MNIST split over the SuperNodes, the fmnist-gpu model (width "
        f"192, patch 4) training one block for {len(first['round-seconds'])} rounds of "
        f"{first['local-epochs']} local epoch(s), evaluation kept light. A virtual client asks "
        "Ray for `client CPUs` and `client GPU` (the `client-resources` of a `flwr run` "
        "federation); `at once` is how many clients that lets Ray run side by side. Round 1 "
        "includes Ray's actors starting (CUDA contexts on a GPU), one key query to every "
        "SuperNode (`key queries`: `sample-by=node-key` asks each once per run) and the sampled "
        "nodes decoding their images into the node cache; the steady round is the median of "
        "the rounds after it. GPU utilisation: mean of `nvidia-smi` samples every "
        f"{SAMPLE_SECONDS} s over the steady rounds; memory: their peak, all actors together. "
        "Repeats are separate simulations; each cell is the median over them, rounds/s and "
        "images/s are the median steady round's. Seconds are the "
        "machine's at the time (other jobs may have shared it): compare the rows of one page, "
        "which ran in one command.",
        "",
        "| SuperNodes | clients / round | client CPUs | client GPU | at once | repeats | "
        "round 1 (s) | key queries (s) | steady round (s) | rounds / s | images / s | "
        "client train s | GPU util % | GPU MiB peak | simulation (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        key = (r["supernodes"], r["clients"], r["client-cpus"], r["client-gpus"])
        groups.setdefault(key, []).append(r)
    plotted: dict[float, list[tuple[int, float]]] = {}
    for (n, clients, cpus, gpus), runs in sorted(groups.items()):
        s = [summarize(r) for r in runs]

        def med(values: list[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return statistics.median(present) if present else None

        # Rates from the median steady round (a median of rates is not one over it).
        steady = med([x["steady"] for x in s])
        rounds_per_s = None if steady is None else 1.0 / steady
        images = med([r["images-per-round"] * r["local-epochs"] for r in runs])
        images_per_s = None if steady is None or images is None else images / steady
        plotted.setdefault(gpus, []).append((clients, rounds_per_s))
        lines.append(
            f"| {n} | {clients} | {cpus:g} | {gpus:g} | {runs[0]['at-once']} | {len(runs)} | "
            f"{_cell(med([x['round-1'] for x in s]), '.1f')} | "
            f"{_cell(med([r.get('key-seconds') for r in runs]), '.1f')} | "
            f"{_cell(steady, '.2f')} | {_cell(rounds_per_s, '.2f')} | "
            f"{_cell(images_per_s, '.0f')} | "
            f"{_cell(med([r['client-train-seconds'] for r in runs]), '.2f')} | "
            f"{_cell(med([r['gpu-util'] for r in runs]), '.0f')} | "
            f"{_cell(med([r['gpu-mib-peak'] for r in runs]), '.0f')} | "
            f"{_cell(med([r['wall-seconds'] for r in runs]), '.0f')} |"
        )
    lines += ["", f"![{name}.png]({name}.png)"]
    (docs / f"{name}.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for gpus, points in sorted(plotted.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=f"client GPU {gpus:g}")
    ax.set_xlabel("clients per round")
    ax.set_ylabel("steady rounds / s")
    ax.legend()
    ax.set_title(f"Ray engine, {first['supernodes']} SuperNodes ({first['gpu'] or 'CPU'})")
    save_figure(fig, docs / f"{name}.png")


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--supernodes", type=int, default=1000)
    parser.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=[10, 20, 50],
        help="clients per round, one setting each",
    )
    parser.add_argument(
        "--client-gpus",
        type=float,
        nargs="+",
        default=[0.1],
        help="each virtual client's share of the GPU (0: CPU only)",
    )
    parser.add_argument("--client-cpus", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--seconds",
        type=float,
        default=0.0,
        help="start no simulation after this many seconds (0: no limit)",
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--docs", type=Path, default=DOCS)
    parser.add_argument("--name", default="ray-engine", help="the page: <docs>/<name>.md, .png")
    parser.add_argument("--report-only", action="store_true", help="report <out>/results.json")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds {args.rounds}: needs >= 2 (round 1 is reported apart)")
    if any(c > args.supernodes for c in args.clients):
        parser.error(
            f"--clients {args.clients}: each must be at most --supernodes {args.supernodes}"
        )
    archive = results_archive(args.docs, args.name)
    if args.report_only:
        report(*reported_results(args.out, archive), args.docs, args.name)
        return
    import torch

    gpus, cpus = torch.cuda.device_count(), os.cpu_count() or 1
    if gpus == 0 and any(g > 0 for g in args.client_gpus):
        parser.error(f"--client-gpus {args.client_gpus}: no CUDA GPU here; use 0")
    # Flower stops a simulation whose actor pool would be empty, from a thread that leaves the
    # benchmark little to say: refuse such a setting here, naming what the machine has.
    if fitless := [g for g in args.client_gpus if concurrency(cpus, args.client_cpus, g, gpus) < 1]:
        parser.error(
            f"--client-cpus {args.client_cpus:g} with --client-gpus {fitless}: no virtual client "
            f"fits this machine ({cpus} CPUs, {gpus} GPUs); each needs at most the CPUs there "
            "and a GPU share of at most 1"
        )
    start_results(args.out, "benchmarks.ray_engine", argv)
    with ray_workers_as_make_run() as workers:
        deadline = time.monotonic() + args.seconds if args.seconds else None
        settings = [
            {
                "supernodes": args.supernodes, "clients": clients, "client-cpus": args.client_cpus,
                "client-gpus": client_gpus,
                "at-once": concurrency(cpus, args.client_cpus, client_gpus, gpus),
                "local-epochs": args.local_epochs, "repeat": repeat, "machine": machine_line(),
                "gpu": gpu_name(), "date": time.strftime("%Y-%m-%d"),
                "worker-niceness": workers.value,
            }
            for repeat in range(args.repeats)
            for client_gpus in args.client_gpus
            for clients in args.clients
        ]  # fmt: skip
        results: list[dict[str, Any]] = []
        for setting in settings:
            if deadline is not None and time.monotonic() > deadline:
                print(
                    f"[ray-engine] {args.seconds:g} s spent: {len(settings) - len(results)} "
                    "settings left out",
                    file=sys.stderr,
                )
                break
            name = (
                f"n{setting['supernodes']}-c{setting['clients']}-g{setting['client-gpus']:g}"
                f"-r{setting['repeat']}"
            )
            with tempfile.TemporaryDirectory(dir=args.out) as runs:
                results.append(
                    simulate(setting, args.data, Path(runs), name, args.rounds, args.local_epochs)
                )
            print(json.dumps(results[-1]), file=sys.stderr)
            (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if not results:
        raise SystemExit("[ray-engine] no simulation finished")
    keep_results(args.out, archive)
    report(results, saved_results(args.out)[1], args.docs, args.name)


if __name__ == "__main__":
    main()
