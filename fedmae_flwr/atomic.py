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
_TEMP_NAME = re.compile(r"\..+\.(?P<pid>\d+)\.[0-9a-f]{8}")


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """``write(tmp)`` writes the file at the temp path ``tmp``; it then replaces ``path``.

    The file gets the umask's mode, as any file (not mkstemp's or safetensors' 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A hidden name in the same folder (one file system: the rename is atomic), unique per writer.
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files :func:`atomic_write` left in ``folder`` when its writer was killed
    mid-write (a SIGKILL, the OOM killer, a power cut: no ``finally`` runs), except this
    process's own. Only for a folder no other live process writes into (a held run folder);
    returns what it removed."""
    removed = []
    for path in Path(folder).glob(".*"):
        match = _TEMP_NAME.fullmatch(path.name)
        if match and int(match["pid"]) != os.getpid() and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
