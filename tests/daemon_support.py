"""Helpers of the daemon tests: daemons in a thread or a subprocess, requests, RSS; and the tiny
random model bundle they serve (tiny_bundle.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import psutil

from cmi_daemon import paths
from cmi_daemon.client import DaemonClient
from cmi_daemon.daemon.server import Daemon
from cmi_daemon.daemon.settings import Settings

REPO = Path(__file__).resolve().parent.parent
DAEMON_START_TIMEOUT_S = 60.0


def infill_request(session: str = "take-1:8-12", start_qn: float = 8.0, end_qn: float = 12.0,
                   **options) -> dict:
    """A small valid infill: a piano melody over 16 QN and a bass line, infilling the melody."""
    melody = [[float(qn), 0.5, 60 + (qn * 5) % 12, 90] for qn in range(16)]
    bass = [[float(qn), 2.0, 36 + qn % 5, 80] for qn in range(0, 16, 2)]
    return {
        "session": session,
        "tracks": [{"name": "Piano", "program": 0, "drum": False, "notes": melody},
                   {"name": "Bass", "program": 33, "notes": bass}],
        "tempo": [[0.0, 120.0], [8.0, 100.0]],
        "time_signatures": [[0.0, 4, 4]],
        "range": [start_qn, end_qn],
        "targets": [0],
        "options": {"candidates": 1, "seed": 1, **options},
    }


def check_infill_reply(reply: dict, request: dict) -> None:
    start_qn, end_qn = request["range"]
    assert reply["session"] == request["session"]
    assert len(reply["candidates"]) == ((request.get("options") or {}).get("candidates") or 1)
    for candidate in reply["candidates"]:
        assert [entry["track"] for entry in candidate["tracks"]] == request["targets"]
        for entry in candidate["tracks"]:
            for start, duration, pitch, velocity in entry["notes"]:
                assert start_qn <= start < end_qn and 0 < duration <= end_qn - start + 1e-9
                assert 0 <= pitch <= 127 and 1 <= velocity <= 127


@contextmanager
def threaded_daemon(backend, profiles_path=None, **settings):
    """A Daemon on free loopback ports, serving from a thread; yields it (connection_info() to connect).
    With profiles_path, it keeps its profile counters in that file, as the service does."""
    daemon = Daemon(backend, Settings(port=0, **settings), profiles_path=profiles_path)
    thread = threading.Thread(target=daemon.serve, name="daemon-under-test")
    thread.start()
    try:
        yield daemon
    finally:
        daemon.request_stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the daemon did not stop"


def daemon_environment(home: Path) -> dict:
    env = dict(os.environ, CMI_HOME=str(home), PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("XDG_STATE_HOME", None)
    return env


def start_daemon_process(home: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    """`python -m cmi_daemon.cli.main start` with CMI_HOME=home on free ports; returns once it listens."""
    command = [sys.executable, "-m", "cmi_daemon.cli.main", "start", "--model", str(model_dir), "--port", "0", *extra]
    process = subprocess.Popen(command, env=daemon_environment(home), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, cwd=REPO)
    wait_for_connection_file(home, process)
    return process


def connection_path(home: Path) -> Path:
    return home / "state" / paths.CONNECTION_FILE_NAME


def wait_for_connection_file(home: Path, process: subprocess.Popen) -> dict:
    deadline_s = time.monotonic() + DAEMON_START_TIMEOUT_S
    path = connection_path(home)
    while time.monotonic() < deadline_s:
        if process.poll() is not None:
            output = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise AssertionError(f"the daemon exited with {process.returncode}:\n{output}")
        if path.exists():
            info = json.loads(path.read_text())
            if info["pid"] == process.pid:
                return info
        time.sleep(0.1)
    process.kill()
    raise AssertionError("the daemon did not write its connection file in time")


def client_for(home: Path, timeout_ms: int = 30_000) -> DaemonClient:
    return DaemonClient(connection_file=connection_path(home), timeout_ms=timeout_ms)


def process_rss_bytes(pid: int) -> Optional[int]:
    """Resident set size of a running process (psutil); None once it has ended."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.NoSuchProcess:
        return None


class StandInBackend:
    """A deterministic backend for protocol mechanics: one note per target track at the range start.
    `delay_s` makes each infill take that long (polling should_stop), `fail` makes it raise."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False):
        self.delay_s = delay_s
        self.fail = fail
        self.started = threading.Event()
        self.calls = 0

    def describe(self) -> dict:
        return {"name": "stand-in", "path": "-", "device": "cpu"}

    def infill(self, request, progress, should_stop):
        from cmi_daemon.daemon.server import BackendResult
        from cmi_daemon.errors import InfillCancelled
        from cmi_daemon.music.tokens import Note

        self.calls += 1
        self.started.set()
        deadline_s = time.monotonic() + self.delay_s
        while time.monotonic() < deadline_s:
            if should_stop():
                raise InfillCancelled("stopped")
            progress(0.5, "decode")
            time.sleep(0.01)
        if self.fail:
            raise RuntimeError("stand-in failure")
        notes = {t: [Note(request.start_qn, 1.0, 60 + t, 100)] for t in request.target_tracks}
        return BackendResult([notes] * request.options.candidates)
