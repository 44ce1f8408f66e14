#!/usr/bin/env python
"""Run this Flower app with `flwr run` on a private local SuperLink (simulation engine); exit 0
only when Flower reports the run `finished:completed`. Ends every process it started, by PID.

    .venv/bin/python scripts/run.py --num-supernodes 100 --run-config "depth=6 mask-ratio=0.9"
"""

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NAME = "fedmae-local"  # the connection's name in $FLWR_HOME/config.toml
# Without --disable-runtime-dependency-installation it `uv sync`s a CUDA torch for each run.
SUPERLINK = "--insecure --simulation --isolation subprocess --host 127.0.0.1"
SUPERLINK += " --disable-runtime-dependency-installation"


def run_config_string(overrides: dict[str, Any]) -> str:
    """``{"depth": 6, "run-name": "x"}`` -> ``"depth=6 run-name='x'"`` for ``--run-config``."""
    quote = {bool: lambda v: str(v).lower(), str: lambda v: f"'{v}'"}
    return " ".join(f"{k}={quote.get(type(v), str)(v)}" for k, v in overrides.items())


def _below(skip: set[int]) -> list[int]:
    """Every process below this one, zombies too, but ``skip`` and theirs."""
    found, stack = [], [os.getpid()]
    while stack:
        found.append(pid := stack.pop())
        with contextlib.suppress(OSError):  # it ended meanwhile (/proc/<pid> gone)
            for task in list(Path(f"/proc/{pid}/task").glob("*/children")):
                with contextlib.suppress(OSError):  # that thread ended meanwhile
                    stack += [int(c) for c in task.read_text().split() if int(c) not in skip]
    return found[1:]


def _end_all(superlink: subprocess.Popen[bytes] | None, skip: set[int]) -> None:
    """SIGTERM, then SIGKILL, the SuperLink's group and all below this process (but ``skip``).

    A SIGTERM'd SuperLink leaves flwr-simulation and Ray running mid-run; as a child subreaper,
    this process adopts such orphans, so walking its own tree finds them all."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in ([-superlink.pid] if superlink else []) + _below(skip):  # -pid: its group
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while (left := _below(skip)) and time.monotonic() < deadline:
            for pid in left:  # reap what we adopted, or it stays a zombie
                with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if not left:
            return
    print(f"[run] WARNING: processes survived SIGKILL: {left}", flush=True)


def _runs(env: dict[str, str]) -> list[dict[str, Any]]:
    """The runs on our SuperLink (`flwr list`): none, or our one."""
    cmd = ["flwr", "list", NAME, "--format", "json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False).stdout
    with contextlib.suppress(ValueError):
        return list(json.loads(out[out.find("{") :]).get("runs", []))
    return []


def run(
    num_supernodes: int = 100,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    run_config: str | None = None,
    flwr_home: str | Path | None = None,
    timeout: float | None = None,
) -> int:
    """Run the app: 0 on ``finished:completed``, 124 on timeout, else non-zero."""
    home, tmp = Path(flwr_home or REPO / ".flwr").resolve(), Path(tempfile.mkdtemp(dir="/tmp"))
    (home / "mpl").mkdir(parents=True, exist_ok=True)  # /tmp: Ray's socket paths must be short
    env = dict(os.environ, FLWR_HOME=str(home), RAY_TMPDIR=str(tmp), MPLCONFIGDIR=f"{home}/mpl")
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    env.setdefault("FEDMAE_CACHE_DIR", str(REPO / ".cache" / "node-data"))  # ignored, in the repo
    # Flower's commands (ours, and those SuperLink/SuperExec start by name) sit beside a venv's
    # interpreter; a bare interpreter needs them on PATH already (scripts/gpu_check.sh).
    bindir = Path(sys.executable).parent
    env.update(RAY_USAGE_STATS_ENABLED="0", PATH=f"{bindir}:{env.get('PATH', '')}")
    ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER: our tree's orphans come to us
    skip, superlink, log = set(_below(set())), None, home / "superlink.log"
    deadline = time.monotonic() + (timeout or 1e9)
    # SIGTERM and SIGHUP (make killed, terminal closed) take Ctrl-C's path: the cleanup below.
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, signal.default_int_handler) for sig in signals}
    try:
        with socket.socket() as sock:  # a free port: the SuperLink serves all its APIs on it
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with log.open("w") as out:  # flwr-simulation's and Ray's output land there too
            cmd = ["flower-superlink", *SUPERLINK.split(), "--port", str(port)]
            superlink = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=out,
                                         start_new_session=True)  # fmt: skip
        while True:  # until the port accepts connections
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
                break
            if superlink.poll() is not None or time.monotonic() > deadline:
                print(f"[run] the SuperLink did not start; see {log}", flush=True)
                return 3
            time.sleep(0.2)
        # The CLI reads connections from $FLWR_HOME/config.toml only; an explicit address makes
        # it use this SuperLink rather than start a detached one of its own.
        conn = f'[superlink.{NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
        (home / "config.toml").write_text(conn)
        fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}"
        fed += f" client-resources-num-gpus={float(client_gpus)}"
        cmd = ["flwr", "run", str(REPO), NAME, "--federation-config", fed, "--stream"]
        try:  # --stream prints the run's logs until it ends, but not its outcome
            left = None if timeout is None else max(1.0, deadline - time.monotonic())
            extra = ["--run-config", run_config] if run_config else []
            subprocess.run(cmd + extra, env=env, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            print(f"[run] TIMEOUT: still running after {timeout:g} s; stopping it", flush=True)
            for row in _runs(env):
                subprocess.run(["flwr", "stop", row["run-id"], NAME], env=env, check=False)
            return 124
        row = (_runs(env) or [{"status": "never submitted"}])[0]
        if row["status"] == "finished:completed":
            return 0
        details = f"{row['status']} {row.get('status-details', '')}".strip()
        print(f"[run] FAILED: the run {details} (SuperLink log: {log})", flush=True)
        return 1
    except KeyboardInterrupt:
        print("[run] interrupted: ending the run's processes", flush=True)
        return 130
    finally:
        for sig in signals:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        _end_all(superlink, skip)
        shutil.rmtree(tmp, ignore_errors=True)
        for sig, handler in old.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=100)
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per ClientApp (Ray)")
    parser.add_argument("--client-gpus", type=float, default=0.0, help="GPU share per ClientApp")
    parser.add_argument("--run-config", help="as `flwr run --run-config`")
    parser.add_argument("--flwr-home", help="this runner's own Flower home; default <repo>/.flwr")
    parser.add_argument("--timeout", type=float, help="seconds; then `flwr stop`, exit 124")
    return run(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
