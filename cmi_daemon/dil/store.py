"""Profiles on disk: `<root>/<name>.profile/` holds `state.safetensors` (adapted weights and
optimizer state in one file, so they can never disagree) and `log.json` (the latest interactions).

Every write goes through files.write_private_atomic (temporary file, fsync, rename; folders 0700,
files 0600): a crash or a kill -9 at any moment leaves either the previous file or the new one. A
state file made for another base model (its `base` metadata differs) is ignored, with a warning, as
the base model's.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from ..files import TEMPORARY_PATTERN, remove_temporaries, write_private_atomic

log = logging.getLogger("cmi_daemon.dil")

STATE_FORMAT = "cmi-dil-1"
STATE_FILE = "state.safetensors"
LOG_FILE = "log.json"
LOG_ENTRIES = 500
"""The interaction log keeps the latest entries only."""
PROFILE_SUFFIX = ".profile"
MAX_HEADER_BYTES = 100_000_000
"""The largest safetensors header read (the format's own bound)."""


@dataclass
class SavedState:
    tensors: dict[str, torch.Tensor]
    steps: int
    signals: int


class ProfileStore:
    """The profile folders under root (the daemon's `paths.data_dir() / "dil"`)."""

    def __init__(self, root: Path, base_id: str):
        self.root = Path(root)
        self.base_id = base_id
        self._unusable: dict[str, tuple[int, int, int]] = {}
        """Profile -> (inode, mtime ns, size) of a state file found unusable: not read (nor warned
        about) again; every save makes a new file (an atomic rename), so a new state is read."""
        self._learned: dict[str, tuple[tuple[int, int, int], Optional[dict]]] = {}
        """Profile -> (version, `learned` of that version) of the state file read last."""

    def folder(self, profile: str) -> Path:
        """A profile's folder; the suffix keeps names such as `..` inside root."""
        return self.root / (profile + PROFILE_SUFFIX)

    def profiles(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[:-len(PROFILE_SUFFIX)] for p in self.root.iterdir()
                      if p.name.endswith(PROFILE_SUFFIX) and (p / STATE_FILE).is_file())

    def remove_temporaries(self) -> int:
        """Delete the temporary files of writes a kill cut short (call while no one writes); returns how many."""
        return remove_temporaries(self.root, f"*{PROFILE_SUFFIX}/{TEMPORARY_PATTERN}")

    def save(self, profile: str, tensors: dict[str, torch.Tensor], steps: int, signals: int,
             settings_json: str) -> None:
        metadata = {"format": STATE_FORMAT, "base": self.base_id, "steps": str(steps), "signals": str(signals),
                    "settings": settings_json}
        write_private_atomic(self.folder(profile) / STATE_FILE, save(tensors, metadata=metadata))

    def load(self, profile: str) -> Optional[SavedState]:
        """The saved state, or None when there is none usable (absent, damaged or for another model)."""
        path = self.folder(profile) / STATE_FILE
        version = _file_version(path)
        if version is None:
            return None
        if self._unusable.get(profile) == version:
            return None
        try:
            data = path.read_bytes()
            metadata = _metadata(data)
            tensors = load(data)
        except (OSError, ValueError, SafetensorError) as error:
            return self._refuse(profile, version, f"ignoring unreadable {path} ({error})")
        if not self._made_here(metadata):
            return self._refuse(profile, version, f"{path} was adapted from another model; using the base model")
        return SavedState(tensors, int(metadata.get("steps", 0)), int(metadata.get("signals", 0)))

    def learned(self, profile: str) -> Optional[dict]:
        """What the saved state holds: {"signals": handled, "steps": gradient steps}, read from the
        state file's header (saved in one write with the weights, so never a count without its
        learning), or None when no usable state is saved."""
        path = self.folder(profile) / STATE_FILE
        version = _file_version(path)
        if version is None:
            return None
        cached = self._learned.get(profile)
        if cached is None or cached[0] != version:
            try:
                with open(path, "rb") as file:
                    size = file.read(8)
                    metadata = _metadata(size + file.read(min(int.from_bytes(size, "little"), MAX_HEADER_BYTES)))
                learned = ({"signals": int(metadata["signals"]), "steps": int(metadata["steps"])}
                           if self._made_here(metadata) else None)
            except (OSError, ValueError, KeyError):
                learned = None
            cached = self._learned[profile] = (version, learned)
        return cached[1]

    def _made_here(self, metadata: dict) -> bool:
        """Whether a state's metadata says it is of this format and base model."""
        return metadata.get("format") == STATE_FORMAT and metadata.get("base") == self.base_id

    def _refuse(self, profile: str, version: tuple[int, int, int], reason: str) -> None:
        self._unusable[profile] = version
        log.warning("profile %s: %s", profile, reason)
        return None

    def read_log(self, profile: str) -> list[dict]:
        try:
            entries = json.loads((self.folder(profile) / LOG_FILE).read_text(encoding="utf-8"))
            return list(entries) if isinstance(entries, list) else []
        except (OSError, ValueError):
            return []

    def append_log(self, profile: str, entry: dict) -> None:
        entries = (self.read_log(profile) + [entry])[-LOG_ENTRIES:]
        write_private_atomic(self.folder(profile) / LOG_FILE, json.dumps(entries, indent=0).encode("utf-8"))

    def reset(self, profile: str) -> None:
        """Forget the profile: its folder goes (renamed first, so a kill never leaves half of it)."""
        folder = self.folder(profile)
        if not folder.exists():
            return
        doomed = folder.with_name(folder.name + ".deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _file_version(path: Path) -> Optional[tuple[int, int, int]]:
    """(inode, mtime ns, size) of a file, None when it cannot be read: every atomic save changes it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _metadata(data: bytes) -> dict:
    """The `__metadata__` map of a safetensors file's header."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return dict(header.get("__metadata__") or {})
