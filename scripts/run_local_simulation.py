#!/usr/bin/env python
"""Run a Flower app through a real ``flwr run`` against a private, local SuperLink.

Flower 1.41 wiring (verified against the installed ``flwr`` sources):

* The Flower CLI no longer reads ``[tool.flwr.federations]`` from ``pyproject.toml``;
  ``flwr run`` *migrates* such a table into ``$FLWR_HOME/config.toml`` and comments it
  out in ``pyproject.toml`` (a tracked file). SuperLink connections therefore live in
  ``$FLWR_HOME/config.toml`` as ``[superlink.<name>]`` tables (``address``, ``insecure``).
* ``options.*`` keys on a connection (num-supernodes, backend resources) are deprecated;
  the simulation settings go into ``flwr run --federation-config`` and are sent to the
  SuperLink as a ``SimulationConfig`` override (keys ``num-supernodes``,
  ``client-resources-num-cpus``, ``client-resources-num-gpus``, ...).
* A connection whose address is ``:local:`` makes the CLI auto-start a *detached*
  ``flower-superlink`` on fixed ports (39091/39093) that keeps running afterwards. We
  start our own SuperLink instead (free port, own session) and point an explicit
  ``address`` at it, so the CLI treats it as user-managed.
* The SuperLink serves Control, Fleet and Runtime APIs over one HTTP port (``--port``).
  It spawns ``flower-superexec`` in a *new session*, which spawns ``flwr-simulation``,
  which starts Ray (gcs_server, raylet, workers). A process-group kill alone therefore
  misses most of the tree; we also track descendants and tag every child with a unique
  environment marker so stragglers can be found and ended by PID.

Usage (from the repo root)::

    .venv/bin/python scripts/run_local_simulation.py --num-supernodes 100 \
        --run-config "num-server-rounds=2"
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REPO_ROOT = Path(__file__).resolve().parent.parent

# Environment variable carried by every process this script starts (inherited through
# SuperLink -> SuperExec -> flwr-simulation -> Ray). Used to find our own stragglers,
# including processes that re-parented themselves or started new sessions.
MARKER_ENV = "FEDMAE_LOCAL_SIM_TOKEN"

# Exit codes of the CLI / return values of ``run_local_simulation``.
EXIT_COMPLETED = 0
EXIT_FAILED = 1
EXIT_STOPPED = 2
EXIT_STARTUP_ERROR = 3
EXIT_LEFTOVER_PROCESSES = 4
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

SUPERLINK_STARTUP_TIMEOUT_S = 90.0  # 2-core machines need ~5-15 s; keep slack
FLWR_CLI_TIMEOUT_S = 300.0  # `flwr run` builds the FAB (walks the app dir) before submitting
GRACE_PERIOD_S = 10.0  # SIGTERM -> SIGKILL
POLL_INTERVAL_STREAMING_S = 10.0  # status polls are CLI subprocesses: costly on 2 cores
POLL_INTERVAL_IDLE_S = 2.0


# --------------------------------------------------------------------------------------
# Process bookkeeping via /proc (stdlib only; psutil is not a dependency)
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcInfo:
    """Minimal /proc view of one process."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start_time: int  # clock ticks since boot; (pid, start_time) identifies a process


def read_proc(pid: int) -> ProcInfo | None:
    """Parse ``/proc/<pid>/stat``; None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces/parentheses: split after the last ')'.
    rest = raw[raw.rfind(")") + 2 :].split()
    return ProcInfo(
        pid=pid,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        state=rest[0],
        start_time=int(rest[19]),
    )


def _all_procs() -> dict[int, ProcInfo]:
    """Snapshot every visible process."""
    procs: dict[int, ProcInfo] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = read_proc(int(entry.name))
            if info is not None:
                procs[info.pid] = info
    return procs


def _descendants(roots: Iterable[int], procs: dict[int, ProcInfo]) -> set[int]:
    """PIDs of all descendants of ``roots`` (roots included if alive)."""
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    stack = [pid for pid in roots if pid in procs]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    return found


def _has_marker(pid: int, token: str, ray_tmpdir: str) -> bool:
    """True if the process inherited our marker env var or runs inside our Ray tmpdir."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        if f"{MARKER_ENV}={token}".encode() in environ.split(b"\0"):
            return True
        # Ray passes --session_dir/--temp_dir under RAY_TMPDIR on its daemons' cmdlines.
        return ray_tmpdir.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:160]


@dataclass
class ProcessTracker:
    """Remembers every process started (directly or indirectly) by this run."""

    token: str
    ray_tmpdir: str
    roots: set[int] = field(default_factory=set)
    seen: dict[int, int] = field(default_factory=dict)  # pid -> start_time
    sessions: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_root(self, pid: int) -> None:
        """Register a direct child whose subtree belongs to this run."""
        with self._lock:
            self.roots.add(pid)
        self.snapshot()

    def snapshot(self) -> None:
        """Record the current descendants, before their parents die and they re-parent."""
        procs = _all_procs()
        own_sid = os.getsid(0)
        with self._lock:
            for pid in _descendants(self.roots, procs):
                info = procs[pid]
                self.seen.setdefault(pid, info.start_time)
                # Sessions created by our descendants (SuperExec, Ray daemons) are ours;
                # never our own session, which contains the user's shell.
                if info.sid != own_sid:
                    self.sessions.add(info.sid)

    def alive(self) -> dict[int, ProcInfo]:
        """All live (non-zombie) processes that belong to this run."""
        procs = _all_procs()
        me = os.getpid()
        own_sid = os.getsid(0)
        with self._lock:
            candidates = _descendants(self.roots, procs)
            candidates |= {
                p for p, st in self.seen.items() if p in procs and procs[p].start_time == st
            }
            candidates |= {
                p for p, i in procs.items() if i.sid in self.sessions and i.sid != own_sid
            }
        candidates |= {p for p in procs if _has_marker(p, self.token, self.ray_tmpdir)}
        candidates.discard(me)
        # Zombies are already dead; PID 1 in some containers never reaps them.
        return {p: procs[p] for p in candidates if p in procs and procs[p].state != "Z"}


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(tracker: ProcessTracker, deadline: float) -> dict[int, ProcInfo]:
    left = tracker.alive()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = tracker.alive()
    return left


def shutdown_processes(
    tracker: ProcessTracker,
    superlink: subprocess.Popen[bytes] | None,
    grace: float = GRACE_PERIOD_S,
) -> dict[int, ProcInfo]:
    """Stop the SuperLink and everything it spawned; return survivors (should be empty).

    Order matters: the SuperLink is asked to stop first (SIGTERM to its process group)
    so it can terminate its SuperExec; SuperExec and flwr-simulation watch their parent
    PID and shut Ray down when it disappears. Whatever is still around after the grace
    period is sent SIGTERM, then SIGKILL, by PID.
    """
    tracker.snapshot()
    if superlink is not None and superlink.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(superlink.pid, signal.SIGTERM)  # pgid == pid (start_new_session)
        with contextlib.suppress(subprocess.TimeoutExpired):
            superlink.wait(timeout=grace)
    left = _wait_gone(tracker, time.monotonic() + grace)
    if left:
        _signal_pids(left, signal.SIGTERM)
        left = _wait_gone(tracker, time.monotonic() + grace)
    if left:
        print(f"[run_local_simulation] SIGKILL {sorted(left)}", file=sys.stderr)
        if superlink is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(superlink.pid, signal.SIGKILL)
        _signal_pids(left, signal.SIGKILL)
        left = _wait_gone(tracker, time.monotonic() + 5.0)
    if superlink is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            superlink.wait(timeout=5.0)  # reap our direct child (no zombie)
    return left


# --------------------------------------------------------------------------------------
# Flower config (config.toml) handling
# --------------------------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escaping is valid TOML basic-string syntax
    raise TypeError(f"Unsupported TOML value: {value!r}")


def _flatten(prefix: str, table: dict[str, Any]) -> list[str]:
    """Dotted-key lines, the same layout ``flwr`` itself writes (``options.x = 1``)."""
    lines = []
    for key, value in table.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            lines.extend(_flatten(dotted, value))
        else:
            lines.append(f"{dotted} = {_toml_value(value)}")
    return lines


def _render_flower_config(config: dict[str, Any]) -> str:
    superlink = config.get("superlink", {})
    out = ["[superlink]"]
    out += [f"{k} = {_toml_value(v)}" for k, v in superlink.items() if not isinstance(v, dict)]
    for name, conn in superlink.items():
        if isinstance(conn, dict):
            out += ["", f"[superlink.{name}]", *_flatten("", conn)]
    return "\n".join(out) + "\n"


@contextlib.contextmanager
def _locked_config(flwr_home: Path) -> Any:
    """Read-modify-write ``config.toml`` under a lock (concurrent runs share FLWR_HOME)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    with open(flwr_home / "config.toml.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        config: dict[str, Any] = {}
        if path.exists():
            try:
                config = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError:
                config = {}  # flwr would refuse a corrupt file anyway; start fresh
        config.setdefault("superlink", {})
        yield config
        tmp = path.with_suffix(".toml.tmp")
        tmp.write_text(_render_flower_config(config))
        tmp.replace(path)


def write_connection(flwr_home: Path, name: str, address: str) -> None:
    """Add ``[superlink.<name>]`` pointing at our SuperLink to ``$FLWR_HOME/config.toml``.

    An explicit address (not ``:local:``) makes ``flwr`` treat the SuperLink as
    user-managed, so it never auto-starts its own detached one.
    """
    with _locked_config(flwr_home) as config:
        superlink = config["superlink"]
        # flwr creates this default file itself if missing; keep a valid default.
        superlink.setdefault("default", name)
        superlink[name] = {"address": address, "insecure": True}


def remove_connection(flwr_home: Path, name: str) -> None:
    """Drop our per-run connection again (its port is meaningless after the run)."""
    with _locked_config(flwr_home) as config:
        superlink = config["superlink"]
        superlink.pop(name, None)
        if superlink.get("default") == name:
            superlink.pop("default")


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _free_port() -> int:
    # Bind to port 0 so the kernel picks a free port; a tiny race remains until the
    # SuperLink binds it, which is handled by retrying the start-up.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bin(name: str) -> str:
    """Prefer the executable next to the running interpreter (the venv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"'{name}' not found next to {sys.executable} or on PATH")
    return found


def _short_tmpdir() -> str:
    # Ray puts Unix sockets under RAY_TMPDIR; AF_UNIX paths are limited to 107 bytes,
    # so use /tmp directly rather than a possibly long $TMPDIR.
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
    return tempfile.mkdtemp(prefix="fsim-", dir=base)


def build_env(flwr_home: Path, ray_tmpdir: str, token: str) -> dict[str, str]:
    """Environment for every child: keep all state in FLWR_HOME or the temp dir."""
    env = os.environ.copy()
    venv_bin = str(Path(sys.executable).parent)
    # SuperLink launches `flower-superexec`/`flwr-simulation` by name: they must resolve
    # to this venv even if it is not activated.
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # Also read by SuperLink (`_runtime_dependency_install_default`); belt and braces
            # with the CLI flag: never `uv sync` the app's (CUDA torch) dependencies.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "MPLCONFIGDIR": str(flwr_home / "mpl"),
            "RAY_TMPDIR": ray_tmpdir,
            "TMPDIR": ray_tmpdir,  # Python/torch temp files end up in our temp dir
            # Ray: no usage-stats file/network call, no dashboard (saves CPU and a port).
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
            "PYTHONDONTWRITEBYTECODE": "1",  # no __pycache__ inside FLWR_HOME/apps
            "PYTHONUNBUFFERED": "1",
            MARKER_ENV: token,
        }
    )
    return env


def _flwr(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_bin("flwr"), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _parse_json_output(stdout: str) -> dict[str, Any]:
    """The CLI prints one JSON object with ``--format json``; tolerate stray lines."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError(f"no JSON in flwr output: {stdout!r}")
    return dict(json.loads(stdout[start:]))


def _wait_for_superlink(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Poll the SuperLink's HTTP ``/health`` endpoint until it answers."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/health"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return "(no log)"


class LogFollower:
    """Runs ``flwr log <id> --stream`` and echoes it, keeping a tail for error reports."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, out: TextIO) -> None:
        self.tail: deque[str] = deque(maxlen=60)
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
        self._out = out
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.tail.append(line)
            self._out.write(line)
            self._out.flush()

    def running(self) -> bool:
        """True while the stream is open (it closes when the run finishes)."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Give the stream a moment to drain, then end it."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5.0)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._thread.join(timeout=5.0)


def _log(msg: str) -> None:
    print(f"[run_local_simulation] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# Core
# --------------------------------------------------------------------------------------
def run_config_string(overrides: dict[str, Any]) -> str:
    """``{"depth": 6, "run-name": "x"}`` -> ``"depth=6 run-name='x'"`` for ``--run-config``."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return f"'{v}'" if isinstance(v, str) else str(v)

    return " ".join(f"{k}={value(v)}" for k, v in overrides.items())


def run_local_simulation(
    app_dir: str | Path = REPO_ROOT,
    num_supernodes: int = 100,
    client_cpus: int = 1,
    run_config: str | None = None,
    flwr_home: str | Path | None = None,
    timeout: float = 1800.0,
    *,
    log_file: str | Path | None = None,
    process_record: dict[str, Any] | None = None,
    out: TextIO | None = None,
    node_configs: list[str] | None = None,
    client_gpus: float = 0.0,
) -> int:
    """Run the Flower app in ``app_dir`` on a private local SuperLink (simulation mode).

    With ``node_configs`` it is a deployment instead: no simulation engine, one real
    ``flower-supernode`` per entry (its ``--node-config``, e.g. ``"data-path='/data/a'"``),
    connected over insecure local HTTP; ``num_supernodes`` and ``client_cpus`` are unused.

    Args:
        app_dir: Flower app directory (contains ``pyproject.toml``).
        num_supernodes: Number of simulated SuperNodes.
        client_cpus: CPUs reserved per ClientApp in Ray (limits concurrency).
        client_gpus: GPU share reserved per ClientApp in Ray (e.g. 0.1: ten clients share a
            GPU); 0 = clients see no GPU reservation (they still use one under device=auto).
        run_config: Passed verbatim to ``flwr run --run-config``
            (e.g. ``"num-server-rounds=2 lr=0.01"`` or a TOML file path).
        flwr_home: Flower home (config.toml, installed FABs); default ``<app_dir>/.flwr``.
        timeout: Seconds until the run is stopped and reported as timed out.
        log_file: SuperLink log file; default ``<flwr_home>/superlink.log``.
        process_record: If given, filled with ``superlink_pid``, ``superlink_pgid``,
            ``pids`` (every process seen), ``ray_tmpdir``, ``token`` and ``survivors``
            so callers (tests) can verify the cleanup independently.
        out: Stream for progress output (default ``sys.stdout``).
        node_configs: Deployment mode, see above.

    Returns:
        0 on ``finished:completed``; 1 failed; 2 stopped; 3 start-up error; 4 leftover
        processes after cleanup; 124 timeout; 130 interrupted.
    """
    out = out or sys.stdout
    app_path = Path(app_dir).expanduser().resolve()
    home = Path(flwr_home).expanduser().resolve() if flwr_home else app_path / ".flwr"
    log_path = Path(log_file).expanduser().resolve() if log_file else home / "superlink.log"
    home.mkdir(parents=True, exist_ok=True)
    (home / "mpl").mkdir(exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    pyproject = app_path / "pyproject.toml"
    if "federations" in tomllib.loads(pyproject.read_text()).get("tool", {}).get("flwr", {}):
        # `flwr run` would migrate and comment out this table, rewriting pyproject.toml.
        _log(f"refusing to run: {pyproject} has [tool.flwr.federations]; remove it")
        return EXIT_STARTUP_ERROR

    token = uuid.uuid4().hex
    ray_tmpdir = _short_tmpdir()
    env = build_env(home, ray_tmpdir, token)
    tracker = ProcessTracker(token=token, ray_tmpdir=ray_tmpdir)
    superlink: subprocess.Popen[bytes] | None = None
    supernodes: list[subprocess.Popen[bytes]] = []
    follower: LogFollower | None = None
    conn_name: str | None = None
    rc = EXIT_STARTUP_ERROR
    started = time.monotonic()
    if process_record is not None:
        process_record.update(token=token, ray_tmpdir=ray_tmpdir, pids={})

    def _body() -> int:
        nonlocal superlink, follower, conn_name
        rc = EXIT_FAILED
        # ---- 1. SuperLink (own session => own process group; retried on port races)
        port = 0
        for attempt in range(3):
            port = _free_port()
            cmd = [
                _bin("flower-superlink"),
                "--insecure",
                *([] if node_configs else ["--simulation"]),
                "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
                "--host", "127.0.0.1",
                "--port", str(port),
                "--log-file", str(log_path),
            ]  # fmt: skip
            with open(log_path.with_suffix(log_path.suffix + ".console"), "ab") as console:
                # cwd = app dir: relative paths in the run config (e.g. outputs/) resolve
                # inside the repo for the ServerApp/ClientApps spawned below.
                superlink = subprocess.Popen(
                    cmd,
                    env=env,
                    cwd=app_path,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            tracker.add_root(superlink.pid)
            if process_record is not None:
                process_record.update(superlink_pid=superlink.pid, superlink_pgid=superlink.pid)
            _log(f"SuperLink pid={superlink.pid} on 127.0.0.1:{port} (log: {log_path})")
            if _wait_for_superlink(superlink, port, SUPERLINK_STARTUP_TIMEOUT_S):
                break
            _log(f"SuperLink did not come up (attempt {attempt + 1}); log tail:")
            print(_tail(log_path, 15), file=out)
            shutdown_processes(tracker, superlink)
            superlink = None
        if superlink is None:
            return EXIT_STARTUP_ERROR

        # ---- 1b. Deployment: real SuperNodes, each in its own session, with its node config
        for i, node_config in enumerate(node_configs or []):
            with open(log_path.with_name(f"supernode-{i}.log"), "ab") as console:
                node = subprocess.Popen(
                    [
                        _bin("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--port",
                        str(_free_port()),
                        "--node-config",
                        node_config,
                    ],
                    env=env,
                    cwd=app_path,
                    stdin=subprocess.DEVNULL,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            supernodes.append(node)
            tracker.add_root(node.pid)
            _log(f"SuperNode {i} pid={node.pid} node-config {node_config}")

        # ---- 2. Connection in $FLWR_HOME/config.toml (never in pyproject.toml)
        conn_name = f"fedmae-local-{port}"
        write_connection(home, conn_name, f"127.0.0.1:{port}")

        # ---- 3. Submit the run
        fed_cfg = (
            f"num-supernodes={int(num_supernodes)} "
            f"client-resources-num-cpus={int(client_cpus)} "
            f"client-resources-num-gpus={float(client_gpus)}"
        )
        run_args = ["run", str(app_path), conn_name]
        if not node_configs:
            run_args += ["--federation-config", fed_cfg]
        if run_config:
            run_args += ["--run-config", run_config]
        run_args += ["--format", "json"]
        _log("flwr " + " ".join(run_args))
        res = _flwr(run_args, env, app_path, FLWR_CLI_TIMEOUT_S)
        tracker.snapshot()
        try:
            payload = _parse_json_output(res.stdout)
        except ValueError:
            payload = {}
        if res.returncode != 0 or not payload.get("success"):
            _log(f"`flwr run` failed (rc={res.returncode}):\n{res.stdout}\n{res.stderr}")
            return EXIT_STARTUP_ERROR
        run_id = str(payload["run-id"])
        _log(f"run {run_id} submitted (FAB {payload.get('fab-filename')})")

        # ---- 4. Follow logs and poll the status until the run finishes
        follower = LogFollower(
            [_bin("flwr"), "log", run_id, conn_name, "--stream"], env, app_path, out
        )
        deadline = started + timeout
        status = ""
        next_poll = 0.0
        while True:
            tracker.snapshot()
            now = time.monotonic()
            if superlink.poll() is not None:
                _log(f"SuperLink exited unexpectedly (rc={superlink.returncode})")
                status = "superlink-died"
                break
            if now >= deadline:
                _log(f"timeout after {timeout:.0f}s; stopping run {run_id}")
                _flwr(["stop", run_id, conn_name], env, app_path, 60)
                rc = EXIT_TIMEOUT
                break
            if now >= next_poll:
                listing = _flwr(
                    ["list", conn_name, "--run-id", run_id, "--format", "json"],
                    env, app_path, 120,
                )  # fmt: skip
                with contextlib.suppress(ValueError, KeyError, IndexError):
                    status = _parse_json_output(listing.stdout)["runs"][0]["status"]
                if status.startswith("finished"):
                    break
                interval = (
                    POLL_INTERVAL_STREAMING_S if follower.running() else (POLL_INTERVAL_IDLE_S)
                )
                next_poll = time.monotonic() + interval
            time.sleep(0.5)

        if rc != EXIT_TIMEOUT:
            rc = {
                "finished:completed": EXIT_COMPLETED,
                "finished:stopped": EXIT_STOPPED,
            }.get(status, EXIT_FAILED)
        follower.stop(timeout=10.0 if rc == EXIT_COMPLETED else 3.0)
        elapsed = time.monotonic() - started
        _log(f"run {run_id}: status={status or 'unknown'} rc={rc} after {elapsed:.1f}s")
        if rc != EXIT_COMPLETED:
            _log("---- tail of run logs ----")
            print("".join(follower.tail), file=out)
            _log(f"---- tail of {log_path} ----")
            print(_tail(log_path), file=out)
        return rc

    survivors: dict[int, ProcInfo] = {}
    try:
        rc = _body()
    except KeyboardInterrupt:
        _log("interrupted; stopping run and SuperLink")
        rc = EXIT_INTERRUPTED
    finally:
        # Runs on success, failure, Ctrl-C/SIGTERM and unexpected exceptions alike.
        if follower is not None and follower.running():
            follower.stop(timeout=0.0)
        for node in supernodes:  # first, or they keep retrying the vanished SuperLink
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in supernodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=GRACE_PERIOD_S)
        survivors = shutdown_processes(tracker, superlink)
        if conn_name is not None:
            with contextlib.suppress(OSError):
                remove_connection(home, conn_name)
        shutil.rmtree(ray_tmpdir, ignore_errors=True)
        if process_record is not None:
            process_record["pids"] = dict(tracker.seen)
            process_record["survivors"] = sorted(survivors)
        if survivors:
            _log("WARNING: processes survived cleanup:")
            for pid, info in sorted(survivors.items()):
                print(f"  pid={pid} pgid={info.pgid} sid={info.sid} {_cmdline(pid)}", file=out)
        else:
            _log(f"cleanup ok: all {len(tracker.seen)} processes of this run ended")
    if survivors and rc == EXIT_COMPLETED:
        rc = EXIT_LEFTOVER_PROCESSES
    return rc


def _raise_interrupt(signum: int, _frame: Any) -> None:
    # Turn SIGTERM/SIGHUP (e.g. `make` being killed) into the same path as Ctrl-C so the
    # `finally` cleanup in run_local_simulation always runs.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app-dir", type=Path, default=REPO_ROOT)
    parser.add_argument("--num-supernodes", type=int, default=100)
    parser.add_argument(
        "--node-config",
        action="append",
        default=None,
        help="deployment instead of simulation: one real SuperNode per --node-config",
    )
    parser.add_argument("--client-cpus", type=int, default=1)
    parser.add_argument(
        "--client-gpus", type=float, default=0.0, help="GPU share per client in Ray, e.g. 0.1"
    )
    parser.add_argument("--run-config", default=None, help="passed to `flwr run --run-config`")
    parser.add_argument("--flwr-home", type=Path, default=None, help="default <app-dir>/.flwr")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="default <flwr-home>/superlink.log")  # fmt: skip
    args = parser.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    return run_local_simulation(
        app_dir=args.app_dir,
        num_supernodes=args.num_supernodes,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
        run_config=args.run_config,
        flwr_home=args.flwr_home,
        timeout=args.timeout,
        log_file=args.log_file,
        node_configs=args.node_config,
    )


if __name__ == "__main__":
    sys.exit(main())
