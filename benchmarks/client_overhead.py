"""What one ``train`` message costs a ClientApp that Flower starts in a fresh process.

A deployed SuperNode (Flower 1.41, subprocess isolation) starts a new ClientApp process for every
message, so the app's import and the node's data loading are paid per message, not once. This
benchmark runs the project's real ``train`` handler in a fresh interpreter per repeat, with a real
``Message`` (stage 0, the reference model's active tensors) and a ``Context`` as Flower builds
them, and reports, per repeat:

- ``startup``: interpreter start-up (from launching the process to its first line);
- ``import``: ``import fedmae_flwr.client_app``;
- ``data``: the node's images (``client_app.node_data``): decoded and partitioned, or read back
  from the node's on-disk cache;
- ``train``: the handler itself (config, model rebuild, local epoch, reply), data already loaded;
- ``exit``: from the reply to the process' end (interpreter and library tear-down);
- ``total``: the process' wall time less building the test message (which Flower does not do);
- ``cpu``: the process' CPU seconds (user + sys; steadier than wall time on a shared machine).

Two nodes: ``fmnist-partition`` (partition 3 of 100 of Fashion-MNIST's idx files, the default
run) and ``imagefolder-own`` (a deployed device's own folder: 600 PNGs, 3x32x32, as README's
deploy example). The node cache (node-config ``cache-dir``) starts empty, so the first repeat is
cold and the others warm; the median of the warm ones is reported. Two more rows: ``floor``, a
process that only imports torch, timm and Flower's ClientApp (what any such app pays per
message), and ``floor-frozen``, the same with the garbage collector paused during the imports
and their objects frozen afterwards, as ``fedmae_flwr/client_app.py`` does.

    .venv/bin/python benchmarks/client_overhead.py                      # both nodes, 5 repeats
    .venv/bin/python benchmarks/client_overhead.py --python /tmp/clientvenv/bin/python

``--python`` runs the child processes with another interpreter (a client-only install): the child
is this file run as a script, so it imports only the standard library and the installed
``fedmae_flwr``. Results: printed as a table and written to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Modules a light client must not import for an idx or image-folder source.
HEAVY = ("matplotlib", "pandas", "pyarrow", "datasets", "flwr_datasets", "seaborn", "ray")
NODES = ("fmnist-partition", "imagefolder-own", "floor", "floor-frozen")
PHASES = ("startup", "import", "data", "train", "exit", "total", "cpu")


def _floor_child(frozen: bool) -> dict:
    """The floor: only the libraries any torch + timm ClientApp imports, no data, no training;
    ``frozen``: with the garbage collector paused during the imports and their objects frozen,
    as fedmae_flwr/client_app.py does."""
    import gc

    started = time.time()
    t = time.perf_counter()
    if frozen:
        gc.disable()
    import flwr.app
    import flwr.clientapp
    import timm
    import torch

    if frozen:
        gc.freeze()
        gc.enable()
    del flwr, timm, torch
    return {"started": started, "import": time.perf_counter() - t, "build": 0.0, "data": 0.0,
            "train": 0.0, "heavy-modules": sorted(m for m in HEAVY if m in sys.modules),
            "finished": time.time()}  # fmt: skip


def _child(spec: dict) -> dict:
    """One message in this (fresh) process; returns seconds per phase."""
    if "floor" in spec:
        return _floor_child(spec["floor"] == "frozen")
    started = time.time()
    t = time.perf_counter()
    import fedmae_flwr.client_app as client_app

    import_s = time.perf_counter() - t

    t = time.perf_counter()
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmae_flwr.models import CascadeMAE, active_key

    # Messages take their sender's identity from the process (as in tests/local_grid.py).
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    context = Context(
        run_id=1,
        node_id=7,
        node_config=spec["node_config"],
        state=RecordDict(),
        run_config=spec["run_config"],
    )
    cfg = client_app.node_config(context)
    model = CascadeMAE(cfg.model, num_blocks=1)
    arrays = {k: v.contiguous() for k, v in model.state_dict().items() if active_key(k, 0)}
    config = {"server-round": 1, "stage": 0, "frozen-blocks": 0, "prefix-version": ""}
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)})
    msg = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=7)
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    client_app.node_data(context, cfg)
    data_s = time.perf_counter() - t

    t = time.perf_counter()
    reply = client_app.train(msg, context)
    train_s = time.perf_counter() - t
    metrics = reply.content["metrics"]
    return {
        "started": started,
        "import": import_s,
        "build": build_s,
        "data": data_s,
        "train": train_s,
        "num-examples": int(metrics["num-examples"]),
        "train-seconds": float(metrics["train-seconds"]),
        "heavy-modules": sorted(m for m in HEAVY if m in sys.modules),
        "finished": time.time(),
    }


def _app_run_config() -> dict:
    """pyproject's run-config table (every key ``""``), as Flower hands it to the app."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return dict(table)


def _image_folder(folder: Path, count: int = 600) -> Path:
    """``count`` 40x48 RGB PNGs in two class folders (a device's own images), made once."""
    if (folder / "done").is_file():
        return folder
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"{i}.png")
    (folder / "done").touch()
    return folder


def _spec(node: str, out: Path) -> dict:
    run_config = _app_run_config()
    cache = {"cache-dir": str(out / "cache" / node)}
    if node.startswith("floor"):
        return {"floor": node.removeprefix("floor").lstrip("-") or "plain", "node_config": cache}
    if node == "fmnist-partition":
        return {"run_config": run_config,
                "node_config": {"partition-id": 3, "num-partitions": 100, **cache}}  # fmt: skip
    folder = str(_image_folder(out / "images"))
    run_config.update({"dataset": "imagefolder", "data-path": folder, "in-chans": 3,
                       "img-size": 32})  # fmt: skip
    return {"run_config": run_config, "node_config": {"data-path": folder, **cache}}


def _run_once(python: str, spec: dict) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    launched = time.time()
    t = time.perf_counter()
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",  # the installed fedmae_flwr, not a checkout on the path
        check=False,
    )
    wall = time.perf_counter() - t
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["startup"] = result.pop("started") - launched
    result["exit"] = ended - result.pop("finished")
    result["total"] = wall - result["build"]
    # CPU seconds (user + sys) of the whole process, message building included: on a shared
    # machine a steadier measure than wall time, which waits for the other tenants' processes.
    result["cpu"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the children")
    parser.add_argument("--repeats", type=int, default=5, help="fresh processes per node")
    parser.add_argument("--nodes", nargs="+", default=list(NODES), choices=NODES)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench-client-overhead")
    parser.add_argument("--label", default="", help="name of this measurement in the JSON")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"python": args.python, "repeats": args.repeats, "nodes": {}}
    for node in args.nodes:
        spec = _spec(node, args.out)
        shutil.rmtree(spec["node_config"]["cache-dir"], ignore_errors=True)
        runs = [_run_once(args.python, spec) for _ in range(args.repeats)]
        warm = runs[1:] or runs
        report["nodes"][node] = {
            "runs": runs,
            "cold": {k: runs[0][k] for k in PHASES},
            "warm-median": {k: _median(warm, k) for k in PHASES},
        }
    name = args.label or "latest"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1))
    print(f"| node | run | {' | '.join(p + ' s' for p in PHASES)} | heavy modules |")
    print(f"|---|---|{'---|' * len(PHASES)}---|")
    for node, result in report["nodes"].items():
        for run, index in (("cold", 0), ("warm-median", -1)):
            heavy = ", ".join(result["runs"][index]["heavy-modules"]) or "none"
            cells = " | ".join(f"{result[run][p]:.2f}" for p in PHASES)
            print(f"| {node} | {run} | {cells} | {heavy} |")
    print(f"(written to {args.out / (name + '.json')})")


if __name__ == "__main__":
    main()
