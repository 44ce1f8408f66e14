"""Files a crash never leaves half-written: every output a resumed or inspected run reads back
(checkpoints, config, summary, backbone, pictures) is written to a temp file beside it, synced,
and renamed over the old one; a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
