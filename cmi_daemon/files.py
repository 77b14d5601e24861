"""Atomic file writes: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_bytes_atomic(path, data: bytes, mode: int | None = None, make_folders: bool = True) -> None:
    """Write data to path through a temporary file in the same folder, fsync, then rename.

    The file gets `mode`, or the permissions a plain open() would give it (0o666 less the umask).
    Missing folders are made, unless make_folders is false (FileNotFoundError then). A symbolic
    link at path is replaced, not followed: pass the resolved path to replace the file it names.
    """
    path = Path(path)
    if make_folders:
        path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666 if mode is None else mode)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(temporary, mode)  # exact, whatever the umask
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
