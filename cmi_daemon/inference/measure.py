"""Measuring on this machine, for `cmi-daemon bench` and training/bench: the CPU's name, the fastest
of repeated calls, the peak resident memory, and the bench songs' infill requests.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from ..music.regions import window_song
from ..music.tokens import Song
from .controls import CONTEXT_BARS

BENCH_SONGS_DIR = Path(__file__).resolve().parents[1] / "data" / "bench_songs"
"""Two POP909 songs with their beat files, shipped in the package (licence and credit in its README.md)."""
BLANKS_PER_SONG = 6


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fastest_s(function: Callable[[], object], repeats: int) -> float:
    """Fastest seconds per call over `repeats` calls after one warm-up call."""
    function()
    fastest = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest


def peak_rss_mb() -> float:
    """Resident-memory high-water mark of this process: ru_maxrss (KB on Linux, bytes on macOS), or
    psutil's peak working set on Windows, which has no `resource` module."""
    try:
        import resource
    except ImportError:
        return psutil.Process().memory_info().peak_wset / (1024 * 1024)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def latency_requests(song: Song, bar_lines: list[float], width_bars: int) -> list[tuple[Song, float, float]]:
    """(song cut to 8 bars around the blank, start_qn, end_qn) at blanks spread over the song."""
    first_bars = list(range(CONTEXT_BARS, len(bar_lines) - width_bars - CONTEXT_BARS, width_bars + CONTEXT_BARS))
    requests = []
    for bar in first_bars[:BLANKS_PER_SONG]:
        window_start, start_qn = bar_lines[bar - CONTEXT_BARS], bar_lines[bar]
        end_qn, window_end = bar_lines[bar + width_bars], bar_lines[bar + width_bars + CONTEXT_BARS]
        requests.append((window_song(song, window_start, window_end), start_qn, end_qn))
    return requests


def song_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.mid"))
