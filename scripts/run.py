#!/usr/bin/env python
"""Run this Flower app with `flwr run` on a private local SuperLink (simulation engine); exit 0
only when Flower reports the run `finished:completed`. Ends every process it started, by PID.

    .venv/bin/python scripts/run.py --num-supernodes 100 --run-config "depth=6 mask-ratio=0.9"
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file (make run): make `scripts` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.processes import ProcessTree, free_port, processes_below, wait_for_port

REPO = Path(__file__).resolve().parent.parent
NAME = "fedmae-local"  # the connection's name in $FLWR_HOME/config.toml
# Without --disable-runtime-dependency-installation it `uv sync`s a CUDA torch for each run.
SUPERLINK = "--insecure --simulation --isolation subprocess --host 127.0.0.1"
SUPERLINK += " --disable-runtime-dependency-installation"


def run_config_string(overrides: dict[str, Any]) -> str:
    """``{"depth": 6, "run-name": "x"}`` -> ``"depth=6 run-name='x'"`` for ``--run-config``."""
    quote = {bool: lambda v: str(v).lower(), str: lambda v: f"'{v}'"}
    return " ".join(f"{k}={quote.get(type(v), str)(v)}" for k, v in overrides.items())


# Ray reads its workers' niceness from this variable when `ray.init` starts its services.
RAY_WORKER_NICENESS = "RAY_worker_niceness"


def flwr_env(
    home: Path, ray_tmp: Path | None = None, ray_address: str | None = None
) -> dict[str, str]:
    """This process's environment for Flower's commands, with their state under ``home`` (and
    Ray's under ``ray_tmp``, a short path: Ray's socket paths must be short). With
    ``ray_address`` the simulation joins that running Ray cluster instead of starting Ray."""
    (home / "mpl").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FLWR_HOME=str(home), MPLCONFIGDIR=f"{home}/mpl")
    env.update({"RAY_TMPDIR": str(ray_tmp)} if ray_tmp else {})
    # Flower's Ray backend calls ray.init() without an address, which connects to RAY_ADDRESS.
    env.update({"RAY_ADDRESS": ray_address} if ray_address else {})
    env.update(
        FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", RAY_USAGE_STATS_ENABLED="0"
    )
    env.setdefault("FEDMAE_CACHE_DIR", str(REPO / ".cache" / "node-data"))  # ignored, in the repo
    # Ray starts the workers that host the virtual clients at niceness 15: beside any other
    # program they get a sliver of the cores (two busy processes made rounds 28x slower on 2
    # cores, docs/ray-niceness.md). A simulation the user started should compete as an equal;
    # their own value wins.
    env.setdefault(RAY_WORKER_NICENESS, "0")
    # Flower's commands (ours, and those SuperLink/SuperExec start by name) sit beside a venv's
    # interpreter; a bare interpreter needs them on PATH already (scripts/gpu_check.sh).
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def flwr_runs(env: dict[str, str]) -> list[dict[str, Any]] | None:
    """The runs on our SuperLink (`flwr list`): none, or our one; None when it did not answer
    (`flwr list` says ``"success": false``: the SuperLink is gone, say)."""
    cmd = ["flwr", "list", NAME, "--format", "json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False).stdout
    try:
        reply = json.loads(out[out.find("{") :])
    except ValueError:
        return None
    if not isinstance(reply, dict) or reply.get("success") is False:
        return None
    return list(reply.get("runs", []))


# Times `flwr list` may go unanswered in a row before the outcome takes the SuperLink for gone.
UNANSWERED_LISTS = 3


# After `flwr run --stream` returns, the SuperLink can still list the run as running while its
# ServerApp process ends Ray's actors: minutes on a busy 2-core machine. The outcome waits as long
# as that process lives (a fixed limit failed finished runs under load), then this long for the
# SuperLink to record the final status.
FINAL_STATUS_GRACE_S = 120.0
# The process that runs a simulation's ServerApp and its Ray engine (Flower starts it by name).
SIMULATION_PROCESS = "flwr-simulation"


def simulation_alive() -> bool:
    """Whether a ``flwr-simulation`` process runs below this one (our SuperExec's, or one it
    left to us as child subreaper)."""
    for pid in processes_below(set()):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if any(Path(a.decode(errors="replace")).name == SIMULATION_PROCESS for a in argv[:2]):
                return True
    return False


def outcome(
    env: dict[str, str],
    log: Path,
    grace: float = FINAL_STATUS_GRACE_S,
    still_ending: Callable[[], bool] = lambda: False,
) -> int:
    """0 when the run finished completed, else 1 (and says how it ended).

    A run not yet ``finished:*`` is polled while ``still_ending()`` (its ServerApp process
    lives), however long that takes, and then for up to ``grace`` seconds more.
    """
    give_up, said, unanswered = time.monotonic() + grace, False, 0
    while True:
        runs = flwr_runs(env)
        if runs is None:
            unanswered += 1
            if unanswered >= UNANSWERED_LISTS:  # killed mid-run: not "never submitted"
                row = {
                    "status": "status unknown:",
                    "status-details": "the SuperLink stopped answering (it ended during the run)",
                }
                break
            time.sleep(1.0)
            continue
        unanswered = 0
        row = (runs or [{"status": "never submitted"}])[0]
        if row["status"].startswith("finished") or row["status"] == "never submitted":
            break
        if still_ending():
            give_up = time.monotonic() + grace
            if not said:
                print("[run] the log stream ended; waiting for the run's process to end",
                      flush=True)  # fmt: skip
                said = True
        elif time.monotonic() > give_up:
            print(f"[run] still {row['status']} {grace:g} s after its log stream ended", flush=True)
            break
        time.sleep(1.0)
    if row["status"] == "finished:completed":
        return 0
    details = f"{row['status']} {row.get('status-details', '')}".strip()
    print(f"[run] FAILED: the run {details} (SuperLink log: {log})", flush=True)
    return 1


# The pairs flwr.common.config.parse_config_args reads (its own pattern).
KEY_VALUE = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")


def config_lines(run_config: str | list[str] | None) -> list[str]:
    """``--run-config`` values, one or several (later keys win, as for `flwr run`), none empty."""
    lines = [run_config] if isinstance(run_config, str) else list(run_config or [])
    return [line for line in lines if line.strip()]


def parse_run_config(lines: list[str]) -> dict[str, Any]:
    """The overrides ``lines`` give, merged as `flwr run` merges them (a later line wins); a
    ValueError naming the line Flower cannot read (Flower's own error is a click exception and
    a traceback, which names neither the line nor a repeated key)."""
    import click
    from flwr.common.config import parse_config_args

    for line in lines:
        # Flower reads the key=value pairs it finds and drops the rest unread ('depth = 3',
        # 'mask-ratio 0.5'): the run then started with defaults.
        if stray := KEY_VALUE.sub(" ", line).split():
            raise ValueError(
                f"--run-config {line!r}: {' '.join(stray)!r} is no key=value pair, and Flower "
                "would drop it unread. Write space-separated key=value pairs without spaces "
                "around '=', strings in quotes (dataset='imagefolder')"
            )
        try:
            parse_config_args([line])
        except (click.ClickException, ValueError) as err:
            message = getattr(err, "message", str(err))
            raise ValueError(
                f"--run-config {line!r} is not what Flower reads: space-separated key=value "
                "pairs, strings in quotes (dataset='imagefolder'), numbers and true/false bare, "
                "each key once (a second --run-config overrides an earlier one). Flower says: "
                f"{message}"
            ) from None
    return parse_config_args(lines)


def run_config_problem(
    run_config: str | list[str] | None, num_supernodes: int | None = None
) -> str | None:
    """Why the app would refuse ``run_config`` (None: it would not), checked here as the
    ServerApp checks it: Flower only says "[code: 15] Invalid run configuration." for an unknown
    key (the key's name is in superlink.log), and a bad value surfaces at the ServerApp's start.
    With ``num_supernodes``, also whether a simulation of that many nodes can run it
    (:func:`fedmae_flwr.simulation_nodes.simulation_problem`). With ``resume=true``, whether the
    run it continues was made with this config, and on as many nodes
    (:func:`fedmae_flwr.server_app.check_resume`): refused after Flower's and Ray's start-up
    (over a minute) otherwise."""
    from fedmae_flwr.config import resolve_config
    from fedmae_flwr.server_app import check_resume
    from fedmae_flwr.simulation_nodes import simulation_problem

    try:
        cfg = resolve_config(parse_run_config(config_lines(run_config)))
        if num_supernodes is not None and (problem := simulation_problem(cfg, num_supernodes)):
            return problem
        if cfg.resume:
            check_resume(cfg, run_folder(cfg), num_supernodes)
    except ValueError as err:  # ConfigError is one
        return str(err)
    return None


def run_folder(cfg: Any) -> Path:
    """The run folder a config names, as the ServerApp that this script's SuperLink starts in
    the repo sees it (a relative output-dir is the repo's)."""
    return REPO / Path(cfg.output_dir).expanduser() / cfg.run_name  # REPO / absolute = absolute


def print_run_summary(run_config: str | list[str] | None) -> int:
    """``scripts/print_summary.py`` on the run folder the config names (its own output-dir and
    run-name, wherever they were set; a relative output-dir is the repo's, where the SuperLink
    this script starts runs the ServerApp)."""
    from fedmae_flwr.config import resolve_config
    from scripts.print_summary import main as print_summary

    cfg = resolve_config(parse_run_config(config_lines(run_config)))
    return print_summary(str(run_folder(cfg) / "summary.json"))


def run(
    num_supernodes: int = 100,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
    run_config: str | list[str] | None = None,
    flwr_home: str | Path | None = None,
    timeout: float | None = None,
    check_config: bool = True,
    ray_address: str | None = None,
    print_summary: bool = False,
) -> int:
    """Run the app: 0 on ``finished:completed``, 124 on timeout, 130 when interrupted, 2 for a
    run config the app refuses or cannot run on ``num_supernodes`` nodes (before anything
    starts; ``check_config=False`` submits it unchecked, to Flower's and the ServerApp's own
    checks), else 1. ``run_config``: one string or several (a later value of a key wins);
    ``print_summary``: print the completed run's summary (exit 1 if it is incomplete)."""
    lines = config_lines(run_config)
    try:  # Flower refuses what it cannot parse anyway, with a traceback: checked here always
        parse_run_config(lines)
    except ValueError as err:
        print(f"[run] refused, nothing started: {err}", flush=True)
        return 2
    if check_config and (problem := run_config_problem(lines, num_supernodes)):
        print(f"[run] refused, nothing started: {problem}", flush=True)
        return 2
    code = _run(num_supernodes, client_cpus, client_gpus, lines, flwr_home, timeout, ray_address)
    return print_run_summary(lines) if print_summary and code == 0 else code


def _run(
    num_supernodes: int,
    client_cpus: int,
    client_gpus: float,
    lines: list[str],
    flwr_home: str | Path | None,
    timeout: float | None,
    ray_address: str | None,
) -> int:
    home, ray_tmp = Path(flwr_home or REPO / ".flwr").resolve(), Path(tempfile.mkdtemp(dir="/tmp"))
    env, log = (
        flwr_env(home, ray_tmp, ray_address),
        home / "superlink.log",
    )  # /tmp: Ray's sockets need short paths
    deadline = time.monotonic() + (timeout or 1e9)
    log.unlink(missing_ok=True)
    try:
        with ProcessTree(temp_dirs=[ray_tmp]) as tree:
            port = free_port()  # the SuperLink serves all its APIs on it
            superlink = tree.start(["flower-superlink", *SUPERLINK.split(), "--port", str(port)],
                                   log, env, REPO)  # fmt: skip
            if not wait_for_port(port, superlink, timeout=max(1.0, deadline - time.monotonic())):
                print(f"[run] the SuperLink did not start; see {log}", flush=True)
                return 3
            # The CLI reads connections from $FLWR_HOME/config.toml only; an explicit address
            # makes it use this SuperLink rather than start a detached one of its own.
            conn = f'[superlink.{NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
            (home / "config.toml").write_text(conn)
            fed = f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}"
            fed += f" client-resources-num-gpus={float(client_gpus)}"
            cmd = ["flwr", "run", str(REPO), NAME, "--federation-config", fed, "--stream"]
            cmd += [arg for line in lines for arg in ("--run-config", line)]
            try:  # --stream prints the run's logs until it ends, but not its outcome
                left = None if timeout is None else max(1.0, deadline - time.monotonic())
                subprocess.run(cmd, env=env, timeout=left, check=False)
            except subprocess.TimeoutExpired:
                print(f"[run] TIMEOUT: still running after {timeout:g} s; stopping it", flush=True)
                for row in flwr_runs(env) or []:
                    subprocess.run(["flwr", "stop", row["run-id"], NAME], env=env, check=False)
                return 124
            # Past --timeout's deadline, a run still ending is not waited for any longer.
            ending = lambda: simulation_alive() and time.monotonic() < deadline  # noqa: E731
            return outcome(env, log, still_ending=ending)
    except KeyboardInterrupt:
        print("[run] interrupted: every process it started has ended", flush=True)
        return 130
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=100)
    parser.add_argument("--client-cpus", type=int, default=1, help="CPUs per ClientApp (Ray)")
    parser.add_argument("--client-gpus", type=float, default=0.0, help="GPU share per ClientApp")
    parser.add_argument(
        "--run-config",
        action="append",
        help="as `flwr run --run-config`; may repeat (a later value of a key wins)",
    )
    parser.add_argument("--flwr-home", help="this runner's own Flower home; default <repo>/.flwr")
    parser.add_argument("--timeout", type=float, help="seconds; then `flwr stop`, exit 124")
    parser.add_argument(
        "--ray-address",
        help="run the simulation on this running Ray cluster (HEAD:6379; `ray start --head` "
        "there, `ray start --address HEAD:6379` on each other machine) instead of a Ray of its "
        "own on this machine; every machine needs this repo and its .venv at the same path",
    )
    parser.add_argument(
        "--no-config-check",
        dest="check_config",
        action="store_false",
        help="submit --run-config unchecked (Flower and the ServerApp check it, as for a "
        "SuperLink of your own)",
    )
    parser.add_argument(
        "--print-summary",
        action="store_true",
        help="after a completed run, print its summary.json (the run folder its config names)",
    )
    return run(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
