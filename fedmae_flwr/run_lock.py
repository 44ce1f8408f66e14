"""One live run per run folder: an advisory lock the ServerApp holds while it writes.

Two runs of one ``run-name`` used to share a folder: a second fresh run moved the first one's
live folder aside and both then wrote into the new one (metrics of both runs interleaved,
checkpoints mixed), and ``resume=true`` after a SuperLink crash ran beside the orphaned
ServerApp that Flower had kept alive. The lock is ``flock`` on a file beside the run folder
(``<output-dir>/.locks/<run-name>.lock``; not inside it, since a fresh run moves the folder):
the kernel drops it when its holder ends, however it ends, so a crashed run never leaves it
held. Advisory and local: it guards runs on one machine or one shared filesystem that honours
``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from logging import WARNING
from pathlib import Path

from flwr.common import log

from fedmae_flwr.config import ConfigError

__all__ = ["LOCKS", "RunFolderInUse", "hold_run_folder"]

LOCKS = ".locks"


class RunFolderInUse(ConfigError):
    """The run folder is held by a live run."""


@contextlib.contextmanager
def hold_run_folder(folder: Path, flower_run_id: int | None = None) -> Iterator[None]:
    """Hold ``folder`` for this process until the block ends; RunFolderInUse, naming the holder
    (process, host, Flower run id, start time), if a live run holds it."""
    path = folder.parent / LOCKS / f"{folder.name}.lock"
    fd = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_text(path)
        os.close(fd)
        raise RunFolderInUse(
            f"{folder} is being written by a live run ({holder}); two runs in one folder mix "
            "their metrics and checkpoints. Give this run another run-name (or output-dir), or "
            "end that run first (`flwr stop <run-id>`; after a SuperLink crash its ServerApp "
            "can still be running: `flwr list` shows it)."
        ) from None
    except OSError as err:  # no flock on this filesystem (NFS without lockd, some FUSE
        # mounts), or .locks not writable (another user's output-dir): run as before the lock
        if fd is not None:
            os.close(fd)
        log(WARNING, "Cannot lock %s (%s): this run does not guard its folder against a "
            "second live run of its name", path, err)  # fmt: skip
        yield
        return
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "flower-run-id":
                  flower_run_id, "started": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiter)


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return "holder unknown"
    run_id = holder.get("flower-run-id")
    return (
        f"process {holder.get('pid')} on {holder.get('host')}"
        + (f", Flower run {run_id}" if run_id is not None else "")
        + f", started {holder.get('started')}"
    )
