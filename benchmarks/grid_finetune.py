"""The quality grid's fine-tune column: its exported backbones fine-tuned under FINETUNE_PROTOCOL.

The grid's runs score probe, k-NN and PSNR only (``GRID_EVALUATION``: ``finetune-labels=0``).
This fine-tunes each run's exported backbone afterwards through the library's own path, so the
number is exactly what a run with the eval keys of ``FINETUNE_PROTOCOL`` gives: the run's
``config.yaml`` with those keys on top, its dataset, its seed, ``labelled_subsets`` and
:func:`fedmae_flwr.evaluation.downstream.finetune_backbones` (disjoint label subsets, a validation
share of each, the lr kept by validation top-1, the kept model alone scored on the test images).

Each run's result is cached as ``<run>/finetune-protocol.json`` (the result, its seconds, the
machine and the protocol); a run whose cache holds the same protocol is skipped, one whose cache
holds another protocol is fine-tuned again, the other protocol's record kept beside it as
``finetune-protocol.<n>.json`` (measured results are never overwritten); a protocol a set-aside
record holds is read back from it, not fine-tuned again.

    .venv/bin/python -m benchmarks.grid_finetune                    # every finished grid run
    .venv/bin/python -m benchmarks.grid_finetune --runs fedmae-iid-s0 --threads 2

``make bench-quality-finetune`` runs it, then ``benchmarks.quality --report-only``. Runs archived
beside the pages (``benchmarks.run_archive``) are restored first where ``--out`` lacks them; those
fine-tuned on the machine that made them are reported from their records.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.harness import ALGORITHMS, DOCS, FINETUNE_PROTOCOL, ROOT, machine_line
from benchmarks.label_efficiency import run_config
from fedmae_flwr.config import Algorithm, FedMAEConfig, from_flat, to_flat
from fedmae_flwr.data import load_dataset
from fedmae_flwr.devices import resolve_device
from fedmae_flwr.evaluation.downstream import finetune_backbones, labelled_subsets
from fedmae_flwr.evaluation.protocol import SubsetResult, merge_lr_grids, summarize_subsets
from fedmae_flwr.models.export import create_timm_backbone, load_backbone
from fedmae_flwr.server_app import random_init_state

CACHE = "finetune-protocol.json"
LR_GRID = "finetune-lr-grid"
DEFAULT_OUT = ROOT / "outputs" / "bench-grid"


def cache_path(run_dir: Path) -> Path:
    return run_dir / CACHE


def _set_aside_paths(run_dir: Path) -> list[Path]:
    """The ``finetune-protocol.<n>.json`` files of ``run_dir``, by n (oldest first); other
    names alike (``finetune-protocol.old.json``) are the user's, not this module's."""
    paths = [p for p in run_dir.glob("finetune-protocol.*.json") if _number(p).isdigit()]
    return sorted(paths, key=lambda p: int(_number(p)))


def _number(path: Path) -> str:
    """The ``<n>`` of ``finetune-protocol.<n>.json``."""
    return path.suffixes[0][1:]


def _load_record(path: Path) -> dict[str, Any]:
    """A fine-tune record, or a ValueError naming the file that is not one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a readable fine-tune record ({e}); move it away") from e
    if not isinstance(record, dict) or not isinstance(record.get("protocol"), dict):
        raise ValueError(f"{path} is not a fine-tune record (no 'protocol'); move it away")
    return record


def earlier_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of other protocols this run was fine-tuned under, oldest first."""
    return [_load_record(p) for p in _set_aside_paths(run_dir)]


def _set_aside(path: Path) -> None:
    """Move another protocol's record to ``finetune-protocol.<n>.json``, n after the newest."""
    kept = _set_aside_paths(path.parent)
    n = int(_number(kept[-1])) + 1 if kept else 1
    path.rename(path.with_name(f"finetune-protocol.{n}.json"))


def read_cache(run_dir: Path, protocol: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The cached record of ``run_dir`` if it was made under ``protocol`` (FINETUNE_PROTOCOL by
    default); None when there is none or it holds another protocol's result."""
    path = cache_path(run_dir)
    if not path.is_file():
        return None
    record = _load_record(path)
    wanted = FINETUNE_PROTOCOL if protocol is None else protocol
    return record if record.get("protocol") == json.loads(json.dumps(wanted)) else None


def protocol_config(run_dir: Path, protocol: dict[str, Any] | None = None) -> FedMAEConfig:
    """The run's resolved config (``config.yaml``) with the ``protocol`` keys on top, checked
    as any run config is (so it is the config of a run made with those eval keys)."""
    keys = FINETUNE_PROTOCOL if protocol is None else protocol
    saved = to_flat(run_config(run_dir))
    return from_flat({**saved, **keys}, f"{run_dir / 'config.yaml'} + the fine-tune protocol")


def run_backbone(run_dir: Path, cfg: FedMAEConfig) -> nn.Module:
    """The backbone the run exported (a random-init run exports its random-init backbone); a
    random-init run without one gets it rebuilt from its config and seed, as the run builds it."""
    if (run_dir / "backbone.safetensors").is_file():
        return load_backbone(run_dir)
    if cfg.algorithm == Algorithm.RANDOM_INIT:
        return create_timm_backbone(cfg.model, random_init_state(cfg))
    raise FileNotFoundError(
        f"{run_dir} has no exported backbone (backbone.safetensors): a run restored from the "
        "tracked archive (benchmarks.run_archive) keeps its results, not its weights; make the "
        "run again (delete its folder and rerun its benchmark) to fine-tune it under this protocol"
    )


def _records(run_dir: Path) -> list[dict[str, Any]]:
    """Every fine-tune record of ``run_dir``: the set-aside ones (oldest first), then the cache."""
    path = cache_path(run_dir)
    return earlier_records(run_dir) + ([_load_record(path)] if path.is_file() else [])


def _grid_of(run_dir: Path, protocol: dict[str, Any]) -> tuple[float, ...]:
    return protocol_config(run_dir, protocol).eval.lr_grid


def _grid_parts(
    run_dir: Path, protocol: dict[str, Any], grid: tuple[float, ...]
) -> tuple[list[dict[str, Any]], set[float]]:
    """Records of ``run_dir`` measured under ``protocol`` but on part of its lr grid ``grid``:
    disjoint parts, newest first, each kept only where it adds lrs no part taken before holds;
    and the lrs they hold."""
    parts: list[dict[str, Any]] = []
    covered: set[float] = set()
    for record in reversed(_records(run_dir)):
        other = record["protocol"]
        if {**other, LR_GRID: protocol[LR_GRID]} != protocol or other == protocol:
            continue
        lrs = set(_grid_of(run_dir, other))
        if lrs <= set(grid) and not lrs & covered:
            parts.append(record)
            covered |= lrs
    return parts, covered


def _merged(protocol: dict[str, Any], grid: tuple[float, ...], parts: list[dict]) -> dict:
    """The record of ``protocol`` (lr grid ``grid``) from records covering its whole grid
    (``merge_lr_grids``: exactly what one fine-tune over the grid gives); its seconds are the
    parts' sum."""
    names = list(parts[0]["results"])
    results = {
        name: summarize_subsets(merge_lr_grids(
            [[SubsetResult(**r) for r in part["results"][name]["subsets"]] for part in parts],
            grid,
        ))
        for name in names
    }  # fmt: skip
    newest = parts[0]
    return {
        "protocol": protocol,
        "results": results,
        "seconds": sum(part["seconds"] for part in parts),
        "machine": newest["machine"],
        "device": newest["device"],
        "threads": newest["threads"],
        "merged-from": [
            {LR_GRID: part["protocol"][LR_GRID], "seconds": part["seconds"],
             "machine": part["machine"]}
            for part in parts
        ],
    }  # fmt: skip


def _restore(run_dir: Path, protocol: dict[str, Any]) -> dict[str, Any] | None:
    """The newest set-aside record measured under exactly ``protocol``, made the cache again
    (the cache's own record set aside in its place), or None when there is none.

    A run fine-tuned under A, then B, then asked for A again reads A back instead of training
    again; every record stays on disk exactly once."""
    wanted = json.loads(json.dumps(protocol))
    for path in reversed(_set_aside_paths(run_dir)):
        record = _load_record(path)
        if record["protocol"] == wanted:
            held = path.with_name(f"{path.name}.restoring")
            path.rename(held)  # out of the numbering, so the cache's record takes the next n
            if cache_path(run_dir).is_file():
                _set_aside(cache_path(run_dir))
            held.rename(cache_path(run_dir))
            return record
    return None


def _write(run_dir: Path, record: dict[str, Any]) -> None:
    if cache_path(run_dir).is_file():  # another protocol's result (read_cache said so): keep it
        _set_aside(cache_path(run_dir))
    cache_path(run_dir).write_text(json.dumps(record, indent=2))


def finetune_run(
    run_dir: Path, device: str | None = None, protocol: dict[str, Any] | None = None
) -> tuple[dict[str, Any], bool]:
    """Fine-tune ``run_dir``'s backbone under ``protocol`` (FINETUNE_PROTOCOL); cached.

    Where the run was fine-tuned before under the same protocol on part of its lr grid (e.g.
    ``1e-3`` of ``1e-3,2e-3``), only the lrs no record holds are fine-tuned, and the parts are
    merged (:func:`~fedmae_flwr.evaluation.protocol.merge_lr_grids`: the values one fine-tune
    over the whole grid gives); the record says so under ``merged-from``.

    ``device``: None = the run's own ``device`` key (resolved as the run resolves it).
    Returns (the record, whether it was computed now rather than read from the cache).
    """
    protocol = dict(FINETUNE_PROTOCOL if protocol is None else protocol)
    cached = read_cache(run_dir, protocol)
    if cached is not None:
        return cached, False
    if (earlier := _restore(run_dir, protocol)) is not None:
        return earlier, False
    cfg = protocol_config(run_dir, protocol)
    parts, held = _grid_parts(run_dir, protocol, cfg.eval.lr_grid)
    if parts:
        missing = [lr for lr in cfg.eval.lr_grid if lr not in held]
        if missing:
            part, _ = finetune_run(
                run_dir, device, {**protocol, LR_GRID: ",".join(f"{lr:g}" for lr in missing)}
            )
            parts.insert(0, part)
        record = _merged(protocol, cfg.eval.lr_grid, parts)
        _write(run_dir, record)
        return record, True
    where = resolve_device(str(cfg.device) if device is None else device)
    splits = load_dataset(cfg)
    sets = labelled_subsets(cfg.eval, splits, cfg.seed)
    backbone = run_backbone(run_dir, cfg)
    name = cfg.algorithm.value
    start = time.perf_counter()
    results = finetune_backbones(cfg.eval, {name: backbone}, sets, splits, seed=cfg.seed,
                                 device=where)  # fmt: skip
    record = {
        "protocol": protocol,
        "results": results,
        "seconds": time.perf_counter() - start,
        "machine": machine_line(),
        "device": str(where),
        "threads": torch.get_num_threads(),
    }
    _write(run_dir, record)
    return record, True


def finished_runs(out: Path) -> list[str]:
    """Every run folder under ``out`` that finished (summary.json) and has its config."""
    return sorted(
        p.name
        for p in out.iterdir()
        if p.is_dir() and (p / "summary.json").is_file() and (p / "config.yaml").is_file()
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--runs", nargs="+", default=None, help="default: every finished run")
    parser.add_argument("--algorithms", nargs="+", default=None, choices=ALGORITHMS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--device", default=None, help="default: each run's device key")
    parser.add_argument("--docs", type=Path, default=DOCS, help="the pages' folder (its archive)")
    # run_archive imports this module's CACHE at its top, so it is imported here, not there.
    from benchmarks import run_archive

    run_archive.add_archive_argument(parser)
    args = parser.parse_args(argv)
    # The runs a page reports may have been made on another machine: restore their archived
    # result files first, so that runs fine-tuned there are reported from their records, as
    # the report after this (benchmarks.quality --report-only) restores and reads them.
    archive = run_archive.archive_of(args)
    if archive.is_dir():
        args.out.mkdir(parents=True, exist_ok=True)
        run_archive.sync(args.out, archive, "grid-finetune")
    if not args.out.is_dir():
        parser.error(
            f"no run folder {args.out} and no archive {archive}; run the grid first "
            "(make bench-quality)"
        )
    finished = finished_runs(args.out)
    runs = finished if args.runs is None else args.runs
    missing = [r for r in runs if r not in finished]
    if missing:
        parser.error(f"no finished run {missing} under {args.out}")
    if args.algorithms is not None:
        runs = [r for r in runs if run_config(args.out / r).algorithm.value in args.algorithms]
    # A run restored from the tracked archive (benchmarks.run_archive) holds its results, not its
    # weights: one fine-tuned under this protocol is reported from its record; one that was not
    # cannot be fine-tuned here. Named runs must all be; the default list leaves such runs out.
    weightless = [r for r in runs if not can_finetune(args.out / r)]
    if weightless and args.runs is not None:
        parser.error(
            f"runs {weightless} under {args.out} have no exported backbone and no fine-tune "
            "under this protocol (restored from the archive?): make them again to fine-tune them"
        )
    if weightless:
        print(f"[grid-finetune] left out {len(weightless)} runs without a backbone or a "
              f"fine-tune under this protocol: {' '.join(weightless)}", flush=True)  # fmt: skip
    args.runs = [r for r in runs if r not in weightless]
    return args


def can_finetune(run_dir: Path) -> bool:
    """Whether ``run_dir`` has a protocol fine-tune or can get one: a cached record, an exported
    backbone, or random init (whose backbone is rebuilt from its config and seed)."""
    return (
        read_cache(run_dir) is not None
        or (run_dir / "backbone.safetensors").is_file()
        or run_config(run_dir).algorithm == Algorithm.RANDOM_INIT
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    for run in args.runs:
        record, fresh = finetune_run(args.out / run, args.device)
        (result,) = record["results"].values()
        std = result.get("accuracy_std", 0.0)
        how = f"{record['seconds']:.0f} s" if fresh else "cached"
        if fresh and "merged-from" in record:
            grids = " + ".join(part[LR_GRID] for part in reversed(record["merged-from"]))
            how += f" in all, lr grid merged from {grids}"
        print(f"[grid-finetune] {run}: {100 * result['accuracy']:.1f} ± {100 * std:.1f} "
              f"({how})", flush=True)  # fmt: skip
    print(f"[grid-finetune] {len(args.runs)} runs under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
