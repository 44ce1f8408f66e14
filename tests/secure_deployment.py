"""Faults on a secure loopback federation, for tests/test_secure_deployment.py.

    .venv/bin/python -m tests.secure_deployment --root /tmp/secure --report /tmp/report.json

scripts/deploy_local.py's federation (TLS, node auth, a SuperLink database) with three
registered devices and one whose key nobody registered, then, in order:

1. the SuperLink is stopped and started again on its database: registered keys survive;
2. the devices and the unregistered one start; the latter must be refused;
3. a run (2 blocks x 3 rounds, 2 clients a round, no federated evaluation) is submitted and one
   device is shut down for good (SIGTERM: it deactivates, so it is not sampled);
4. after its reply in the first round of block 2, another device goes down (--crash: SIGTERM,
   or SIGKILL) and is started again: it rejoins under its node id, lacks the prefix, says so,
   and gets it again;
5. a run that needs 3 devices while 2 are alive is submitted: it must end ``finished:failed``
   within its ``node-wait-timeout``, saying how many nodes are connected and how many needed.

Writes what it saw (exit codes, node ids, the run's row and metrics, a timeline) to --report;
the test judges it. Exit 0 when the scenario could be played out. Ends every process by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.deploy_local import NAME, SecureFederation, image_folders, tiny_run_config

DEVICES = ["device-a", "device-b", "device-c"]
ROGUE = "unregistered"
CRASHES, DIES = "device-b", "device-c"


def _sent(fed: SecureFederation, name: str) -> int:
    """How many replies the SuperNode ``name`` has sent (its log, across restarts)."""
    return (fed.logs / f"{name}.log").read_text(errors="replace").count("Sent successfully")


def _lines(path: Path) -> int:
    """Whole lines in ``path`` so far (0 while it does not exist)."""
    try:
        return path.read_text(errors="replace").count("\n")
    except OSError:
        return 0


def _node_ids(fed: SecureFederation) -> dict[str, str]:
    out = fed.flwr("supernode", "list", NAME, "--format", "json", check=False).stdout
    nodes = json.loads(out[out.find("{") :]).get("nodes", []) if "{" in out else []
    return {n["node-id"]: n["status"] for n in nodes}


def _restart(fed: SecureFederation, name: str, data: Path, deadline: float) -> int:
    """Start ``name`` again every 5 s while it exits at once (refused); the starts it took."""
    starts = 0
    while time.monotonic() < deadline:
        fed.start_supernode(name, data)
        starts += 1
        with contextlib.suppress(subprocess.TimeoutExpired):
            fed.supernodes[name].wait(8)  # a refused SuperNode exits within seconds
            time.sleep(5)
            continue
        return starts
    return starts


def scenario(fed: SecureFederation, timeout: float, crash: signal.Signals) -> dict[str, Any]:
    start, timeline = time.monotonic(), []

    def note(event: str) -> None:
        timeline.append(f"{time.monotonic() - start:6.1f} s  {event}")
        print(f"[secure] {timeline[-1]}", flush=True)

    folders = image_folders(fed.root, [*DEVICES, ROGUE, "server"], per_node=16)
    registered = _bring_up(fed, folders, note)
    if registered is None:
        return {"error": "the devices did not come online", "timeline": timeline}

    cfg = {**tiny_run_config(fed.root, clients=2), "rounds-per-stage": 3, "evaluate-clients": 0}
    cfg.update({"round-timeout": 90.0, "node-wait-timeout": 60.0, "run-name": "faults"})
    run_id = fed.submit(cfg)
    note(f"run {run_id} submitted")
    fed.supernodes[DIES].send_signal(signal.SIGTERM)  # shut down for good
    dead_rc = fed.supernodes[DIES].wait(30)
    note(f"{DIES} shut down (exit {dead_rc})")
    deadline = time.monotonic() + timeout
    metrics = fed.root / "outputs" / "faults" / "metrics.jsonl"
    crashed = _crash_after_round_4(fed, run_id, metrics, folders[CRASHES], crash, deadline, note)
    row = fed.wait(run_id, max(1.0, deadline - time.monotonic()))
    note(f"run {row.get('status')}")
    too_few = _too_few_devices(fed, note)
    return {
        "registered": registered,
        "nodes-at-end": _node_ids(fed),
        "rogue-exit": fed.supernodes[ROGUE].poll(),
        # whole: under load its connection retries can follow (and bury) the refusal
        "rogue-log": (fed.logs / f"{ROGUE}.log").read_text(errors="replace"),
        "superlink-log": (fed.logs / "superlink.log").read_text(errors="replace"),
        "dead-exit": dead_rc,
        "crashed": crashed,
        "crash-signal": crash.name,
        "crashed-replies": _sent(fed, CRASHES),
        "run": row,
        "metrics": [json.loads(line) for line in metrics.read_text().splitlines()]
        if metrics.exists()
        else [],
        "too-few": too_few,
        "timeline": timeline,
    }


def _bring_up(
    fed: SecureFederation, folders: dict[str, Path], note: Callable[[str], None]
) -> dict[str, str] | None:
    """Steps 1-2: keys registered, the SuperLink restarted on its database, every device (the
    unregistered one too) started; the registered node ids, or None if 3 did not come online."""
    fed.make_secrets([*DEVICES, ROGUE])
    fed.start_superlink()
    fed.register(DEVICES)
    registered = _node_ids(fed)
    note(f"SuperLink up, {len(registered)} keys registered")
    assert fed.superlink is not None
    fed.superlink.send_signal(signal.SIGTERM)  # a restart on the same --database
    fed.superlink.wait(30)
    fed.start_superlink()
    note("SuperLink restarted on its database")
    for name in [*DEVICES, ROGUE]:
        fed.start_supernode(name, folders[name])
    deadline = time.monotonic() + 60
    while sum(s == "online" for s in _node_ids(fed).values()) < 3:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.5)
    note("3 devices online")
    return registered


def _crash_after_round_4(
    fed: SecureFederation,
    run_id: int,
    metrics: Path,
    data: Path,
    crash: signal.Signals,
    deadline: float,
    note: Callable[[str], None],
) -> bool:
    """Step 4: stop CRASHES once it has replied in round 4 and the server has aggregated that
    round, then start it again until the SuperLink takes it back; whether that happened.

    Block 2 starts at round 4. After its reply the device waits 3 s before it asks for the next
    message; stopped before the server collected round 4, the SuperLink may turn that reply into
    an error. It is started again as systemd's Restart=on-failure would (after a SIGKILL, Flower
    1.41 refuses the node id until its heartbeat expires: up to 60 s).
    """
    asked = time.monotonic()
    while time.monotonic() < deadline:
        if time.monotonic() - asked > 5:  # `flwr list` costs a second of CPU: not too often
            if fed.run_row(run_id).get("status", "").startswith("finished"):
                return False
            asked = time.monotonic()
        if _sent(fed, CRASHES) >= 4 and _lines(metrics) >= 4:
            fed.supernodes[CRASHES].send_signal(crash)
            fed.supernodes[CRASHES].wait(30)
            note(f"{CRASHES} stopped ({crash.name}) after {_sent(fed, CRASHES)} replies")
            starts = _restart(fed, CRASHES, data, deadline)
            note(f"{CRASHES} back online after {starts} start(s)")
            return True
        time.sleep(0.1)
    return False


def _too_few_devices(fed: SecureFederation, note: Callable[[str], None]) -> dict[str, Any]:
    """Submit a run needing 3 devices with 2 alive; its row, wait and log once it ends."""
    cfg = {**tiny_run_config(fed.root, clients=3), "evaluate-clients": 0,
           "node-wait-timeout": 10.0, "run-name": "too-few"}  # fmt: skip
    begun = time.monotonic()
    run_id = fed.submit(cfg)
    row = fed.wait(run_id, 180)
    seconds = time.monotonic() - begun
    note(f"run {run_id} needing 3 devices: {row.get('status')} after {seconds:.0f} s")
    log = fed.flwr("log", str(run_id), NAME, "--show", check=False)
    return {"run": row, "seconds": seconds, "log": (log.stdout + log.stderr)[-6000:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=300, help="seconds for the run")
    parser.add_argument(
        "--crash",
        choices=["SIGTERM", "SIGKILL"],
        default="SIGTERM",
        help="how device-b goes down mid-run (SIGTERM: it deactivates first)",
    )
    args = parser.parse_args(argv)
    with SecureFederation(args.root) as fed:
        report = scenario(fed, args.timeout, signal.Signals[args.crash])
    args.report.write_text(json.dumps(report, indent=1))
    return 1 if "error" in report else 0


if __name__ == "__main__":
    sys.exit(main())
