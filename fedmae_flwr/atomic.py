"""Files a crash never leaves half-written: every output a resumed or inspected run reads back
(checkpoints, config, summary, backbone, pictures) is written to a temp file beside it, synced,
and renamed over the old one; a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

# atomic_write's temp names: ".<name>.<pid>.<8 hex digits>"
_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}")
_IN_PROGRESS: set[str] = set()  # this process's temp files being written (any thread)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` writes the file at the temp path ``tmp``; it then replaces ``path``.

    The file gets the umask's mode, as any file (not mkstemp's or safetensors' 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name in the same folder (one file system: the rename is atomic), unique per writer.
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    _IN_PROGRESS.add(tmp)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except BaseException:
        _IN_PROGRESS.discard(tmp)
        raise
    mode = os.stat(tmp).st_mode & 0o777
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer may have made the file anew (safetensors: 0600)
        with open(tmp, "rb") as f:  # on disk before the rename: a power cut leaves old or new
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        _IN_PROGRESS.discard(tmp)
    return path


def remove_stale_temp_files(folder: str | Path, targets: re.Pattern[str]) -> list[Path]:
    """Remove the temp files :func:`atomic_write` left in ``folder`` for a file named as
    ``targets`` matches, when their writer was killed mid-write (a SIGKILL, the OOM killer, a
    power cut: no ``finally`` runs); returns what it removed. A temp file of a live process, or
    one this process is writing, is left alone."""
    removed = []
    for path in Path(folder).glob(".*"):
        match = _TEMP_NAME.fullmatch(path.name)
        if (match is None or not targets.fullmatch(match["target"]) or str(path) in _IN_PROGRESS
                or _alive(int(match["pid"])) or not path.is_file()):  # fmt: skip
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (this one's own pid included: a restarted server may get
    the killed one's pid, which :data:`_IN_PROGRESS` tells apart)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return pid > 0  # another user's process; an absurd pid is no process
    return True


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
