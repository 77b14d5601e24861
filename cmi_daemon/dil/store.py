"""Profiles on disk: `<root>/<name>.profile/` holds `state.safetensors` (adapted weights and
optimizer state in one file, so they can never disagree) and `log.json` (the latest interactions).

Every write goes through files.write_bytes_atomic (temporary file, fsync, rename): a crash or a
kill -9 at any moment leaves either the previous file or the new one. A state file made for
another base model (its `base` metadata differs) is ignored, with a warning, as the base model's.
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

from ..files import write_bytes_atomic

log = logging.getLogger("cmi_daemon.dil")

STATE_FORMAT = "cmi-dil-1"
STATE_FILE = "state.safetensors"
LOG_FILE = "log.json"
LOG_ENTRIES = 500
"""The interaction log keeps the latest entries only."""
PROFILE_SUFFIX = ".profile"


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
        removed = 0
        for temporary in self.root.glob(f"*{PROFILE_SUFFIX}/.*.tmp") if self.root.is_dir() else ():
            temporary.unlink(missing_ok=True)
            removed += 1
        return removed

    def save(self, profile: str, tensors: dict[str, torch.Tensor], steps: int, signals: int, settings_json: str) -> None:
        metadata = {"format": STATE_FORMAT, "base": self.base_id, "steps": str(steps), "signals": str(signals),
                    "settings": settings_json}
        write_bytes_atomic(self.folder(profile) / STATE_FILE, save(tensors, metadata=metadata))

    def load(self, profile: str) -> Optional[SavedState]:
        """The saved state, or None when there is none usable (absent, damaged or for another model)."""
        path = self.folder(profile) / STATE_FILE
        try:
            stat = path.stat()
        except OSError:
            return None
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._unusable.get(profile) == version:
            return None
        try:
            data = path.read_bytes()
            metadata = _metadata(data)
            tensors = load(data)
        except (OSError, ValueError, SafetensorError) as error:
            return self._refuse(profile, version, f"ignoring unreadable {path} ({error})")
        if metadata.get("format") != STATE_FORMAT or metadata.get("base") != self.base_id:
            return self._refuse(profile, version, f"{path} was adapted from another model; using the base model")
        return SavedState(tensors, int(metadata.get("steps", 0)), int(metadata.get("signals", 0)))

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
        write_bytes_atomic(self.folder(profile) / LOG_FILE, json.dumps(entries, indent=0).encode("utf-8"))

    def reset(self, profile: str) -> None:
        """Forget the profile: its folder goes (renamed first, so a kill never leaves half of it)."""
        folder = self.folder(profile)
        if not folder.exists():
            return
        doomed = folder.with_name(folder.name + ".deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _metadata(data: bytes) -> dict:
    """The `__metadata__` map of a safetensors file's header."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    return dict(header.get("__metadata__") or {})
