"""Where tests find ../shared/data, and one clear skip for clones that do not have it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_DIR = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = Path(os.environ.get("CMI_SHARED_DATA_DIR", REPO_DIR.parent / "shared" / "data"))
FIXTURE_MIDI_DIR = REPO_DIR / "tests" / "fixtures" / "midi"


def shared_data_path(*parts: str) -> Path:
    """Path under the shared data folder; skips the calling test when it is not there."""
    path = SHARED_DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared data beside the repo, or set "
                    "CMI_SHARED_DATA_DIR); this clone does not have it")
    return path
