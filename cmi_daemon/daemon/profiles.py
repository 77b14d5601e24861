"""Per-profile signal counts (accepted, rejected, repeated, last signal) kept by the daemon in
profiles.json of the user data folder; `cmi-daemon profiles` reads and resets them on disk when no
daemon runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ..files import write_private_atomic

log = logging.getLogger("cmi_daemon.daemon.profiles")


class ProfileBook:
    """Per-profile signal counts, saved atomically to a JSON file after each change."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.profiles: dict[str, dict] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            self.profiles = {str(name): dict(entry) for name, entry in stored.items()}
        except (OSError, ValueError, AttributeError, TypeError) as error:
            log.warning("ignoring unreadable profile file %s (%s)", path, error)

    def record(self, profile: str, kind: str, time_s: float) -> None:
        entry = self.profiles.setdefault(profile, {"accepted": 0, "rejected": 0, "repeated": 0,
                                                   "last_signal_at": None})
        entry[{"accept": "accepted", "reject": "rejected", "repeat": "repeated"}[kind]] += 1
        entry["last_signal_at"] = time_s
        self._save()

    def reset(self, profile: str) -> bool:
        if self.profiles.pop(profile, None) is None:
            return False
        self._save()
        return True

    def listing(self) -> list[dict]:
        return [{"name": name, **entry} for name, entry in sorted(self.profiles.items())]

    def _save(self) -> None:
        if self.path is not None:
            write_private_atomic(self.path, json.dumps(self.profiles, indent=1).encode("utf-8"))
