"""The processes a script starts for a federation, and ending every one of them by PID.

A SIGTERM'd SuperLink leaves SuperExec, flwr-simulation and Ray running mid-run, each in a
session of its own. A script that makes itself a child subreaper adopts such orphans, so walking
its own process tree finds them all; what ran below it before (its caller's children) is spared.
Used by scripts/run.py, scripts/deploy_local.py and the tests' loopback deployments.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PR_SET_CHILD_SUBREAPER = 36
# SIGTERM and SIGHUP (make killed, terminal closed) take Ctrl-C's path: the cleanup.
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, server: subprocess.Popen[bytes], timeout: float) -> bool:
    """True once 127.0.0.1:``port`` accepts connections; False if ``server`` exits first or
    ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)):
            return True
        time.sleep(0.2)
    return False


def descendants(skip: set[int]) -> list[int]:
    """Every process below this one, zombies too, but ``skip`` and theirs."""
    found, stack = [], [os.getpid()]
    while stack:
        found.append(pid := stack.pop())
        with contextlib.suppress(OSError):  # it ended meanwhile (/proc/<pid> gone)
            for task in list(Path(f"/proc/{pid}/task").glob("*/children")):
                with contextlib.suppress(OSError):  # that thread ended meanwhile
                    stack += [int(c) for c in task.read_text().split() if int(c) not in skip]
    return found[1:]


def end_all(skip: set[int], groups: Sequence[int] = ()) -> None:
    """SIGTERM, then SIGKILL, the process ``groups`` and everything below this process but
    ``skip``; reaps what it adopted, so nothing is left as a zombie."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in [-g for g in groups] + descendants(skip):  # -pid: the whole group
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while (left := descendants(skip)) and time.monotonic() < deadline:
            for pid in left:
                with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps
                    os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)
        if not left:
            return
    print(f"[processes] WARNING: processes survived SIGKILL: {left}", flush=True)


class ProcessTree:
    """``with ProcessTree() as tree:`` — on exit, every process started below this one (by
    :meth:`start` or by those) has ended, by PID; a signal inside raises KeyboardInterrupt.

    Linux only (prctl, /proc). Use it in a process of its own: it makes that process a child
    subreaper for good."""

    def __init__(self) -> None:
        self._skip: set[int] = set()
        self._leaders: list[subprocess.Popen[bytes]] = []
        self._handlers: dict[int, Any] = {}

    def __enter__(self) -> ProcessTree:
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._skip = set(descendants(set()))
        self._handlers = {sig: signal.signal(sig, signal.default_int_handler) for sig in SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for sig in SIGNALS:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        end_all(self._skip, [p.pid for p in self._leaders])
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def start(
        self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        """``cmd`` in a session of its own, its output appended to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=out,
                                    start_new_session=True)  # fmt: skip
        self._leaders.append(proc)
        return proc
