"""Atomic file writes (a reader sees the old file or the new one, never half of either) and the
daemon's private folders and files (0700 / 0600 whatever the umask)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

PRIVATE_FOLDER_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
TEMPORARY_PATTERN = ".*.*.tmp"
"""What write_bytes_atomic's temporaries look like (`.NAME.HEX.tmp`), for cleaning up after a kill."""


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


def private_folder(path) -> Path:
    """The folder at path, made with its missing parents as 0700 (an existing one is set to 0700):
    the daemon's folders are its user's alone, whatever the umask."""
    path = Path(path)
    missing = []
    folder = path
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, PRIVATE_FOLDER_MODE)
        except FileExistsError:
            pass
    if os.name != "nt":
        os.chmod(path, PRIVATE_FOLDER_MODE)
    return path


def open_private(path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    """os.open of a file in a private folder, the file made 0600 (an existing one set to 0600)."""
    path = Path(path)
    private_folder(path.parent)
    handle = os.open(path, flags | getattr(os, "O_BINARY", 0), PRIVATE_FILE_MODE)
    if os.name != "nt":
        os.fchmod(handle, PRIVATE_FILE_MODE)
    return handle


def write_private_atomic(path, data: bytes) -> None:
    """write_bytes_atomic into a private folder, the file (and its temporary) 0600."""
    path = Path(path)
    private_folder(path.parent)
    write_bytes_atomic(path, data, mode=PRIVATE_FILE_MODE, make_folders=False)


def remove_temporaries(folder, pattern: str = TEMPORARY_PATTERN) -> int:
    """Delete the temporaries of atomic writes a kill cut short in folder (glob pattern relative to
    it; call while no one writes there); returns how many."""
    folder = Path(folder)
    removed = 0
    for temporary in folder.glob(pattern) if folder.is_dir() else ():
        temporary.unlink(missing_ok=True)
        removed += 1
    return removed
