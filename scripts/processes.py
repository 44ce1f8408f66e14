"""The processes a script starts for a federation, and ending every one of them by PID.

A SIGTERM'd SuperLink leaves SuperExec, flwr-simulation and Ray running mid-run, each in a
session of its own. A script that makes itself a child subreaper adopts such orphans, so walking
its own process tree finds them all; what ran below it before (its caller's children) is spared.
Used by scripts/run.py, scripts/deploy_local.py and the tests' loopback deployments.

A SIGKILL (the OOM killer, `kill -9`, a CI job's limit) cannot be caught, and the orphans would
then go to init, still running. So a ProcessTree also starts a guard: a small process in a
session of its own that notes, twice a second, every process below its owner (PID and start
time); when the owner dies without dismissing it, the guard ends those that still live, and what
runs below them, the same way (SIGTERM, then SIGKILL), and removes the owner's temp folders
(Ray's, say: a SIGKILLed run left its sockets and logs in /tmp).

PIDs are reused, so a PID alone may name a stranger by the time it is signalled: every signal
here goes to the process that was seen (its PID and start time), through a pidfd opened before
that identity is checked, so a process that took over the PID meanwhile is never hit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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


def descendants(skip: set[int], root: int | None = None) -> list[int]:
    """Every process below ``root`` (this one), zombies too, but ``skip`` and theirs."""
    return list(processes_below(skip, root))


def processes_below(skip: set[int], root: int | None = None) -> dict[int, str]:
    """PID -> start time of every process below ``root`` (this one), zombies too, but ``skip``
    and theirs. Each is read with its parent's PID, which must be the one it was listed under:
    a PID that ended and was reused during the walk is left out, not taken for a descendant."""
    found: dict[int, str] = {}
    stack = [os.getpid() if root is None else root]
    while stack:
        parent = stack.pop()
        children: list[int] = []
        with contextlib.suppress(OSError):  # it ended meanwhile (/proc/<pid> gone)
            for task in list(Path(f"/proc/{parent}/task").glob("*/children")):
                with contextlib.suppress(OSError):  # that thread ended meanwhile
                    children += [int(c) for c in task.read_text().split()]
        for child in children:
            fields = None if child in skip else _stat(child)
            if fields is not None and int(fields[1]) == parent:
                found[child] = fields[19]
                stack.append(child)
    return found


def end_all(skip: set[int], groups: Sequence[int] = ()) -> None:
    """SIGTERM, then SIGKILL, the process ``groups`` and everything below this process but
    ``skip``; reaps what it adopted, so nothing is left as a zombie."""

    def reap(left: list[int]) -> None:
        for pid in left:
            with contextlib.suppress(ChildProcessError):  # not our child: its parent reaps
                os.waitpid(pid, os.WNOHANG)

    def alive() -> dict[int, str]:
        return processes_below(skip)

    # -pid: the whole group (its leader is our child, unreaped, so its PID is not reused)
    if left := _terminate(alive, [-g for g in groups], reap):
        print(f"[processes] WARNING: processes survived SIGKILL: {left}", flush=True)


def _terminate(
    alive: Callable[[], dict[int, str]],
    groups: Sequence[int] = (),
    while_waiting: Callable[[list[int]], None] = lambda left: None,
) -> list[int]:
    """SIGTERM the process ``groups`` (negative PIDs) and each process of ``alive()`` (PID ->
    start time), give them 15 s to go (``while_waiting`` on what is left, every 0.2 s), then the
    same with SIGKILL and 5 s; returns what is left."""
    left: list[int] = []
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for group in groups:
            with contextlib.suppress(OSError):
                os.kill(group, sig)
        for pid, started in alive().items():
            send_signal(pid, started, sig)
        deadline = time.monotonic() + grace
        while (left := list(alive())) and time.monotonic() < deadline:
            while_waiting(left)
            time.sleep(0.2)
        if not left:
            return []
    return left


def send_signal(pid: int, started: str, sig: int) -> bool:
    """Send ``sig`` to process ``pid`` only if it is still the one that started at ``started``
    (:func:`start_time`); True if sent. The pidfd is opened first and the start time checked
    after, so the signal reaches that process or none: a PID reused in between fails the check.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        if e.errno != errno.ENOSYS:  # gone
            return False
        # A kernel without pidfds (before Linux 5.3): the check and the signal stay apart.
        with contextlib.suppress(OSError):
            if start_time(pid) == started:
                os.kill(pid, sig)
                return True
        return False
    try:
        if start_time(pid) != started:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:  # it ended after the check: the pidfd still names it, so nobody is hit
        return False
    finally:
        os.close(pidfd)


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the process's name (state first), or None once
    it is gone. The name may hold spaces and parentheses, so it is cut at the last ')'."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot): with the PID, a process's identity, since
    PIDs are reused. None once it is gone."""
    fields = _stat(pid)
    return None if fields is None else fields[19]  # field 22 of proc(5)


# The guard's argument before each temp folder it removes when its owner dies.
TEMP_DIR_FLAG = "--temp-dir"
# How often the guard notes its owner's processes: one started and orphaned within this interval
# of the owner's death can escape it.
GUARD_INTERVAL_S = 0.5


def guard(owner: int, skip: set[int], dismissal: Any = None, temp_dirs: Sequence[Path] = ()) -> int:
    """Note every process below ``owner`` (this guard's parent; but ``skip``, this guard and
    theirs) until ``owner`` ends; return 0 when ``dismissal`` (a readable pipe end) says "done"
    first. Otherwise end the noted processes that still live and everything below them, by PID,
    remove ``temp_dirs``, and return 1.
    """
    noted: dict[int, str] = {}
    skip = skip | {os.getpid()}
    # The guard is its owner's child: once the owner is gone it has another parent, however
    # soon its PID is reused (a start time read after the owner died could be a stranger's).
    while os.getppid() == owner:
        walk = processes_below(skip, root=owner)
        if os.getppid() != owner:  # the owner died during the walk: it may have met a stranger
            break
        noted = {pid: t for pid, t in noted.items() if start_time(pid) == t}  # the living
        noted.update(walk)
        if dismissal is not None and select.select([dismissal], [], [], GUARD_INTERVAL_S)[0]:
            if os.read(dismissal.fileno(), 16).startswith(b"done"):
                return 0
            break  # end of file: the owner died (the kernel closed its end)
        elif dismissal is None:
            time.sleep(GUARD_INTERVAL_S)
    _end_noted(noted)
    for folder in temp_dirs:  # after the processes that wrote into them have ended
        shutil.rmtree(folder, ignore_errors=True)
    return 1


def _end_noted(noted: dict[int, str]) -> None:
    """SIGTERM, then SIGKILL, the ``noted`` processes that are still the ones noted, and what
    runs below them now (the orphans went to init: nobody here can reap them)."""

    def alive() -> dict[int, str]:
        same = {pid: t for pid, t in noted.items() if start_time(pid) == t}
        below = {d: t for pid in same for d, t in processes_below(set(), root=pid).items()}
        return {pid: t for pid, t in (same | below).items() if not ended(pid)}

    _terminate(alive)


def ended(pid: int) -> bool:
    """Gone, or a zombie: ended, its exit status not yet read by its parent."""
    fields = _stat(pid)
    return fields is None or fields[0] == "Z"


class ProcessTree:
    """``with ProcessTree() as tree:`` — on exit, every process started below this one (by
    :meth:`start` or by those) has ended, by PID; a signal inside raises KeyboardInterrupt.

    Linux only (prctl, /proc). Use it in a process of its own: it makes that process a child
    subreaper for good. If that process is SIGKILLed, its guard ends them (module docstring).

    Args:
        temp_dirs: folders of the owner's (made before the tree) that the processes write into:
            removed on exit once they have ended, and by the guard if the owner is SIGKILLed.
    """

    def __init__(self, temp_dirs: Sequence[str | Path] = ()) -> None:
        self._temp_dirs = [Path(d).resolve() for d in temp_dirs]
        self._skip: set[int] = set()
        self._leaders: list[subprocess.Popen[bytes]] = []
        self._handlers: dict[int, Any] = {}
        self._guard: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ProcessTree:
        ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1)
        self._skip = set(descendants(set()))
        self._handlers = {sig: signal.signal(sig, signal.default_int_handler) for sig in SIGNALS}
        # Its own session: the terminal's Ctrl-C, or a kill of the owner's group, spares it.
        cmd = [sys.executable, __file__, "guard", str(os.getpid()), *map(str, self._skip)]
        cmd += [arg for d in self._temp_dirs for arg in (TEMP_DIR_FLAG, str(d))]
        self._guard = subprocess.Popen(cmd, stdin=subprocess.PIPE, start_new_session=True)
        self._skip.add(self._guard.pid)
        return self

    @property
    def guard_pid(self) -> int | None:
        """The guard's PID (None outside ``with``)."""
        return None if self._guard is None else self._guard.pid

    def __exit__(self, *_: object) -> None:
        for sig in SIGNALS:  # a second signal must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        try:
            end_all(self._skip, [p.pid for p in self._leaders])
            for folder in self._temp_dirs:
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            self._dismiss_guard()
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)

    def _dismiss_guard(self) -> None:
        """All ended (or the cleanup failed and this process lives on): the guard may go."""
        if self._guard is None:
            return
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self._guard.communicate(b"done", timeout=30)
        with contextlib.suppress(OSError):
            self._guard.kill()  # no-op once it exited
        self._guard.wait()
        self._guard = None

    def start(
        self, cmd: list[str], log: Path, env: dict[str, str], cwd: Path
    ) -> subprocess.Popen[bytes]:
        """``cmd`` in a session of its own, its output appended to ``log``."""
        with log.open("ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=out,
                                    start_new_session=True)  # fmt: skip
        self._leaders.append(proc)
        return proc


if __name__ == "__main__" and sys.argv[1:2] == ["guard"]:
    # `python processes.py guard OWNER [SKIP...] [--temp-dir DIR...]`, started by ProcessTree
    # with its dismissal on stdin. In a session of its own, the owner's terminal or group
    # signals do not reach it; a hangup or Ctrl-C meant for the owner must not end it either.
    for _sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(_sig, signal.SIG_IGN)
    _args, _skip, _dirs = iter(sys.argv[3:]), set(), []
    for _arg in _args:
        if _arg == TEMP_DIR_FLAG:
            _dirs.append(Path(next(_args)))
        else:
            _skip.add(int(_arg))
    sys.exit(guard(int(sys.argv[2]), _skip, sys.stdin, _dirs))
