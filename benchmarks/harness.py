"""Shared by the benchmarks: one resumable ``flwr run`` per configuration, and report helpers.

Every benchmark run is the reference configuration (``BUDGET`` + ``EVALUATION`` on a partition
of Fashion-MNIST over 100 nodes) plus a few changes, and is named after them
(``fedmae-iid-s0-local-epochs4``), so the benchmarks share one folder, ``outputs/bench/``, and
a configuration two benchmarks need runs once. A run whose ``summary.json`` exists is loaded
instead of run again: an interrupted benchmark resumes where it stopped, and ``--report-only``
reports a partial grid.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from fedmae_flwr.config import default_run_config, load_config_yaml, to_flat
from scripts.run import RAY_WORKER_NICENESS, run_config_string
from scripts.run import run as flwr_run

ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = ROOT / "outputs" / "bench"
DOCS = ROOT / "docs"
NUM_SUPERNODES = 100
# Written by run_variant beside a run it made: {"flwr-run-seconds", "machine"}.
RUN_RECORD = "bench-run.json"
ALGORITHMS = ("fedmae", "fedavg-mae", "centralized", "local", "random-init")
# Algorithms whose result does not depend on how the data is split over nodes: run once per seed.
PARTITION_FREE = ("centralized", "random-init")
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"partitioner": "iid"},
    "dirichlet-0.5": {"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
    "dirichlet-0.1": {"partitioner": "dirichlet", "dirichlet-alpha": 0.1},
}
# The reference budget: the schema defaults of these keys (named so the reports state them).
BUDGET: dict[str, Any] = {
    key: default_run_config()[key]
    for key in ("depth", "rounds-per-stage", "clients-per-round", "local-epochs")
}
# One evaluation protocol for every backbone of every benchmark, lighter than `make run`'s to
# fit 2 CPU cores.
EVALUATION: dict[str, Any] = {
    "probe-train-images": 5000,
    "probe-epochs": 50,
    "finetune-labels": 1000,
    "finetune-epochs": 15,
    # The studies of docs/ablations.md, feature-depth.md (and docs/budget.md as of commit
    # 17655eb; it now uses the grid's protocol) were measured with a bare linear head; pinned so
    # that their runs stay reproducible (the grid's FINETUNE_PROTOCOL and the schema default use
    # the BatchNorm head).
    "finetune-head-norm": "none",
    # ... and with crop + flip (the schema default is now off: docs/finetune-recipe.md).
    "finetune-augment": True,
    "test-images": 5000,
    "stage-knn-images": 2000,
    "evaluate-clients": 0,
    "evaluate-random-init": False,
}
# The quality grid (`make bench-quality`, sized for 2 CPU cores) cannot afford the fine-tune in
# every run: its runs score probe, k-NN and PSNR only (5,000 test images, one `local` node per
# run) and live in their own folder, so numbers of the two protocols never mix. Its fine-tune
# column is the evaluation protocol of docs/eval-protocol.md run on the exported backbones
# afterwards (`make bench-quality-finetune`: label subsets, lr chosen on validation).
GRID_EVALUATION: dict[str, Any] = {
    # No fine-tune in the runs, so no head to pin (the grid's runs of 2026-12-04 have no such key).
    **{key: value for key, value in EVALUATION.items() if key != "finetune-head-norm"},
    "finetune-labels": 0,
    "stage-knn-images": 1000,
    "local-clients": 1,
}
# The fine-tuning protocol the grid's backbones get afterwards (the eval keys of a run;
# conf/full-eval.yaml is the same): disjoint label subsets, a validation share of each, the lr
# kept by validation top-1, the kept model alone scored on the test images.
FINETUNE_PROTOCOL: dict[str, Any] = {
    "finetune-labels": 1000,
    "finetune-epochs": 30,
    "finetune-subsets": 3,
    "finetune-val-fraction": 0.2,
    # Two lrs, kept per subset by validation top-1: 1e-3 fits random init best, FedAvg-MAE's
    # backbone did better at 2e-3 (one subset each, docs/finetune-recipe.md). A grid_finetune
    # cache at one of them is widened by fine-tuning the other alone (exactly the same values).
    "finetune-lr-grid": "1e-3,2e-3",
    "finetune-head-norm": "batchnorm",
    # No crop + flip: with it 30 epochs on 800 labels left every backbone under-fitting
    # (train top-1 70-76 %); without, random init fits its labels (docs/finetune-recipe.md).
    "finetune-augment": False,
    "test-images": EVALUATION["test-images"],
}
EVALUATION_PROTOCOL = (
    "fine-tuning: AdamW, warm-up + cosine, label smoothing 0.1, crop + flip only where "
    "finetune-augment is on; probe: BatchNorm without affine + linear head on mean-pooled tokens"
)


def run_name(
    algorithm: str, partition: str, seed: int, changes: dict[str, Any] | None = None
) -> str:
    """``<algorithm>-<partition|pooled>-s<seed>[-<key><value>...]`` for the changed keys.

    A "change" to a ``BUDGET`` key's own value is none: such a run is the reference run.
    """
    part = "pooled" if algorithm in PARTITION_FREE else partition
    changed = sorted((k, v) for k, v in (changes or {}).items() if BUDGET.get(k) != v)
    suffix = "".join(f"-{key}{value}" for key, value in changed)
    return f"{algorithm}-{part}-s{seed}{suffix}"


def finished(out_root: Path, name: str) -> bool:
    return (out_root / name / "summary.json").is_file()


def finished_seeds(
    out_root: Path, algorithm: str, partition: str, changes: dict[str, Any] | None = None
) -> list[int]:
    """The seeds at which ``run_name(algorithm, partition, seed, changes)`` has finished."""
    prefix = run_name(algorithm, partition, 0).removesuffix("0")
    heads = {p.name.removeprefix(prefix).split("-")[0] for p in out_root.glob(f"{prefix}*")}
    seeds = sorted(int(head) for head in heads if head.isdigit())
    return [s for s in seeds if finished(out_root, run_name(algorithm, partition, s, changes))]


def run_variant(
    algorithm: str,
    partition: str,
    seed: int,
    out_root: Path,
    tag: str,
    changes: dict[str, Any] | None = None,
    timeout: float = 3600,
    report_only: bool = False,
    evaluation: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The reference configuration with ``changes``, run or loaded (see ``run_or_load``).

    With ``report_only`` a run that has not finished is neither started nor returned (None).
    ``evaluation`` replaces ``EVALUATION`` (the grid's lighter protocol, ``GRID_EVALUATION``).
    The result also holds ``"bench"``: the ``RUN_RECORD`` written when this harness made the run
    (``{}`` for a run made before it wrote one).
    """
    name = run_name(algorithm, partition, seed, changes)
    if report_only and not finished(out_root, name):
        return None
    overrides = {
        **BUDGET,
        **(EVALUATION if evaluation is None else evaluation),
        **PARTITIONS[partition],
        "algorithm": algorithm,
        "seed": seed,
        **(changes or {}),
    }
    fresh, start = not finished(out_root, name), time.perf_counter()
    run = run_or_load(name, overrides, out_root, tag, timeout=timeout)
    record = out_root / name / RUN_RECORD
    if fresh:  # what summary.json cannot hold: the whole `flwr run`, start-up included
        seconds = time.perf_counter() - start
        record.write_text(json.dumps({"flwr-run-seconds": seconds, "machine": machine_line()}))
    bench = json.loads(record.read_text()) if record.is_file() else {}
    return {**run, "algorithm": algorithm, "seed": seed, "bench": bench}


def run_or_load(
    name: str,
    overrides: dict[str, Any],
    out_root: Path,
    tag: str,
    num_supernodes: int = NUM_SUPERNODES,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Run ``overrides`` as ``<out_root>/<name>`` through ``flwr run`` unless it finished before.

    Returns ``{"name", "summary", "rows"}`` (``rows``: the run's metrics.jsonl lines). Raises
    ``RuntimeError`` when the run fails, naming it, and when a finished run under that name was
    made with other settings (another evaluation protocol, say) rather than reuse it.
    """
    run_dir = out_root / name
    if finished(out_root, name):
        check_same_config(run_dir, overrides)
    else:
        overrides = {**overrides, "output-dir": str(out_root), "run-name": name}
        print(f"[{tag}] {name}: {run_config_string(overrides)}", flush=True)
        start = time.perf_counter()
        rc = flwr_run(
            num_supernodes=num_supernodes,
            run_config=run_config_string(overrides),
            timeout=timeout,
        )
        if rc != 0 or not finished(out_root, name):
            raise RuntimeError(f"run {name} failed (exit {rc}); see the log above")
        print(f"[{tag}] {name} done in {time.perf_counter() - start:.0f} s", flush=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"name": name, "summary": summary, "rows": rows}


def check_same_config(run_dir: Path, overrides: dict[str, Any]) -> None:
    """Raise if the finished run in ``run_dir`` differs from ``overrides`` in any key."""
    saved = to_flat(load_config_yaml(run_dir / "config.yaml"))
    differ = [
        f"{key}={saved.get(key)!r} (asked {value!r})"
        for key, value in overrides.items()
        if key not in ("output-dir", "run-name") and saved.get(key) != value
    ]
    if differ:
        raise RuntimeError(
            f"{run_dir} was run with {', '.join(differ)}: move it away, or give this benchmark "
            "another --out folder, rather than mix settings in one report"
        )


def count_text(count: int) -> str:
    """A label or image count as the reports write it: ``1000`` -> ``"1k"``, ``1500`` as is."""
    return f"{count // 1000}k" if count >= 1000 and count % 1000 == 0 else str(count)


def protocols(finetune_labels: int) -> tuple[tuple[str, str], ...]:
    """Downstream protocols as summary.json keys them, with their report labels."""
    return (
        ("finetune-accuracy", f"fine-tune {count_text(finetune_labels)} labels"),
        ("linear-probe-accuracy", "linear probe"),
        ("knn-accuracy", "k-NN"),
    )


PROTOCOLS = protocols(EVALUATION["finetune-labels"])


def accuracy(run: dict[str, Any], key: str, algorithm: str) -> float | None:
    """Top-1 (0-1) of ``algorithm``'s backbone under protocol ``key`` in one run, if measured."""
    return run["summary"].get(key, {}).get(algorithm)


def accuracies(runs: list[dict[str, Any]], key: str, algorithm: str) -> list[float]:
    """``accuracy`` over ``runs``, leaving out the runs that did not measure it."""
    return [v for r in runs if (v := accuracy(r, key, algorithm)) is not None]


def mean_std(values: list[float], scale: float = 100.0) -> str:
    """``mean ± std`` (one value: just the value) of ``values`` times ``scale``, one decimal."""
    if not values:
        return "-"
    mean = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {scale * statistics.stdev(values):.1f}"


def machine_line() -> str:
    """Cores, CPU model and the vector instructions torch uses, architecture, Python: enough to
    tell two machines apart, which matters because the same seed gives slightly different
    numbers on different CPUs (bit-identical on one machine; docs/findings.md, 'One seed,
    one result')."""
    import platform

    import torch

    isa = torch.backends.cpu.get_cpu_capability()
    return (
        f"{os.cpu_count()} CPU cores ({cpu_model()}, torch {isa}), {platform.machine()}, "
        f"Python {platform.python_version()}"
    )


NOT_RECORDED = "machine not recorded"


def machines_text(machines: list[str | None], noun: str = "run") -> str:
    """The machine(s) a page's measurements were made on, from their records (never this
    machine's: a page may be rewritten elsewhere from tracked records): the one machine, or each
    with how many of them it made ("A (4 runs); B (2 runs)"); a record without one is
    :data:`NOT_RECORDED`."""
    counts: dict[str, int] = {}
    for machine in machines:
        counts[machine or NOT_RECORDED] = counts.get(machine or NOT_RECORDED, 0) + 1
    if len(counts) <= 1:
        return next(iter(counts), NOT_RECORDED)
    return "; ".join(f"{machine} ({n} {noun}{'s' * (n != 1)})" for machine, n in counts.items())


def run_machines(runs: list[dict[str, Any]]) -> list[str | None]:
    """The machine each run's ``RUN_RECORD`` names (None where it names none)."""
    return [run.get("bench", {}).get("machine") for run in runs]


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``platform.processor()`` elsewhere)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU model unknown"


RAY_DEFAULT = "ray"  # a WorkerNiceness that leaves the variable unset: Ray's own niceness (15)


class WorkerNiceness:
    """``RAY_worker_niceness`` set to ``value`` (or unset for :data:`RAY_DEFAULT`) inside the
    block, restored after it."""

    def __init__(self, value: str) -> None:
        self.value = value
        self._before: str | None = None

    def __enter__(self) -> WorkerNiceness:
        self._before = os.environ.get(RAY_WORKER_NICENESS)
        if self.value == RAY_DEFAULT:
            os.environ.pop(RAY_WORKER_NICENESS, None)
        else:
            os.environ[RAY_WORKER_NICENESS] = self.value
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is None:
            os.environ.pop(RAY_WORKER_NICENESS, None)
        else:
            os.environ[RAY_WORKER_NICENESS] = self._before


def ray_workers_as_make_run() -> WorkerNiceness:
    """This process's Ray workers at the niceness ``make run`` gives them (0, unless the
    environment sets ``RAY_worker_niceness``; Ray's own default is 15, which any busy program
    starves: docs/ray-niceness.md), for a ``with`` block; its ``value`` is what the results
    record, and the environment is as it was after the block."""
    return WorkerNiceness(os.environ.get(RAY_WORKER_NICENESS, "0"))


def niceness_label(value: str) -> str:
    """A worker niceness as the pages write it: ``RAY_DEFAULT`` is "15 (Ray's default)"."""
    return "15 (Ray's default)" if value == RAY_DEFAULT else value


def niceness_text(results: list[dict[str, Any]]) -> str:
    """The Ray workers' niceness the results were measured at (those measured before it was
    recorded ran at Ray's default: nothing set it then)."""
    values = sorted({niceness_label(str(r.get("worker-niceness", RAY_DEFAULT))) for r in results})
    return f"Ray workers at niceness {' and '.join(values)}"


def add_folder_arguments(parser: Any, out: Path = OUT_ROOT) -> None:
    """``--out`` (where the runs are) and ``--docs`` (where the report goes)."""
    parser.add_argument("--out", type=Path, default=out)
    parser.add_argument("--docs", type=Path, default=DOCS)


def add_run_arguments(
    parser: Any, seeds: list[int], partition: bool = True, out: Path = OUT_ROOT
) -> None:
    """The options every run-based benchmark takes: seeds, (partition), folders, report-only."""
    parser.add_argument("--seeds", nargs="+", type=int, default=seeds)
    if partition:
        parser.add_argument("--partition", default="iid", choices=PARTITIONS)
    add_folder_arguments(parser, out)
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from finished runs only"
    )


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend: the reports' plots need no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Lay ``fig`` out, write it to ``path`` as every report's plot is (110 dpi), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces this invocation, for the report."""
    import sys

    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


RESULT_FILES = ("results.json", "command.txt")


def results_archive(docs: Path, page: str) -> Path:
    """Where a measuring benchmark keeps a tracked copy of its ``RESULT_FILES``:
    ``<docs>/data/<page>/``, so that its page can be rewritten on a machine that did not measure
    (``outputs/`` is ignored by git; the grid's runs have ``benchmarks.run_archive``)."""
    return docs / "data" / page


def keep_results(out: Path, archive: Path) -> None:
    """Copy the ``RESULT_FILES`` of ``out`` into ``archive`` (after a measurement)."""
    import shutil

    archive.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        shutil.copyfile(out / name, archive / name)


def reported_results(out: Path, archive: Path) -> tuple[list[dict[str, Any]], str]:
    """What ``--report-only`` writes the page from: ``out``'s results (kept in ``archive`` too,
    so results fetched from another machine are tracked with the page), else ``archive``'s."""
    if all((out / name).is_file() for name in RESULT_FILES):
        keep_results(out, archive)
    return saved_results(out, archive)


def saved_results(out: Path, archive: Path | None = None) -> tuple[list[dict[str, Any]], str]:
    """The ``results.json`` and ``command.txt`` a measuring benchmark left in ``out`` (or, where
    ``out`` has none, its tracked copy in ``archive``): what its ``--report-only`` writes the
    page from (the page names the command that measured)."""
    import json

    source = out
    if not (out / "results.json").is_file() and archive is not None:
        source = archive
    if not all((source / name).is_file() for name in RESULT_FILES):
        where = f"{out}" + ("" if archive is None else f" nor in {archive}")
        raise SystemExit(
            f"no {' and '.join(RESULT_FILES)} in {where}: measure first (without --report-only)"
        )
    results = json.loads((source / "results.json").read_text())
    return results, (source / "command.txt").read_text().strip()


def results_text(default_out: Path, archive: Path) -> str:
    """The page's sentence on where its measurements are."""
    return (
        f"Results: `results.json` in the command's `--out` (default `{default_out}`), tracked in "
        f"`{_shown(archive)}`; this page is written from it."
    )


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def start_results(out: Path, module: str, argv: list[str] | None) -> None:
    """Make ``out``, keep this invocation's command in it, and put the nodes' decoded-image cache
    under it rather than ~/.cache (the env var reaches Ray's workers)."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    (out / "command.txt").write_text(command_line(module, argv))
    os.environ.setdefault("FEDMAE_CACHE_DIR", str((out / "node-cache").resolve()))
