"""Shared test helpers: where the committed fixtures and the full data sets live."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "midi"
SHARED_DATA = Path(os.environ.get("CMI_SHARED_DATA", REPO.parent / "shared" / "data"))

POP909_FIXTURES = sorted(FIXTURES.glob("pop909/*/*.mid"))
GROOVE_FIXTURES = sorted(FIXTURES.glob("groove/*.mid"))
ALL_FIXTURES = POP909_FIXTURES + GROOVE_FIXTURES


def shared_data(relative: str) -> Path:
    """A folder of the full data sets; skips the calling test, saying why, when it is absent."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"needs the full data set at {path} (absent in this checkout; "
                    "set CMI_SHARED_DATA to its folder to run this test)")
    return path


def pytest_addoption(parser):
    parser.addoption("--run-load", action="store_true", help="also run the tests marked load (minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "load: a long load test, skipped unless --run-load")
    config.addinivalue_line("markers", "slow: starts processes (daemons, the CLI, pip, torchrun) or takes many "
                                       "seconds; runs by default, -m 'not slow' leaves it out")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-load"):
        return
    skip = pytest.mark.skip(reason="a long load test: run with --run-load")
    for item in items:
        if item.get_closest_marker("load") is not None:
            item.add_marker(skip)
