"""What every benchmark shares: the machine's description and a timer robust to a shared machine."""

from __future__ import annotations

import platform
import time
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(function, repeats: int) -> float:
    """Fastest seconds per call over `repeats` calls after one warm-up call: the least disturbed
    by other work on a shared machine."""
    function()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest
