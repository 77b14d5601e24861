"""Infill latency while the DIL learner works, against the same infills with it idle.

    python -m training.bench_dil --model BUNDLE [--songs DIR] [--infills 12]

Infills of 2-bar blanks with 8 bars of context (cmi_daemon.inference.measure.latency_requests) alternate
between an idle learner and a learner kept busy by a stream of repeat signals (each: two AdamW
steps, a save, new ONNX sessions for the profile), same request and seed in both conditions, so
load from other processes hits both alike. Prints the machine line, the median and p95
latencies, their ratios (busy / idle; the target is at most 1.25) and how many signals the
learner handled while the infills ran.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from cmi_daemon.inference.measure import BENCH_SONGS_DIR, cpu_model, latency_requests, song_files
from cmi_daemon.daemon.schema import InfillRequest, InfillRequestOptions
from cmi_daemon.daemon.server import InteractionSignal
from cmi_daemon.dil.learner import Learner
from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.tokens import read_midi
from training.eval.blanks import target_tracks

PROFILE = "bench"


def requests(songs_dir: Path, n_infills: int) -> list[InfillRequest]:
    found = []
    for path in song_files(songs_dir):
        song = read_midi(path)
        for index, (window, start_qn, end_qn) in enumerate(latency_requests(song, bar_lines_qn(song, path)[0], 2)):
            found.append(InfillRequest(f"{path.stem}:{index}", window, start_qn, end_qn, target_tracks(window),
                                       InfillRequestOptions(profile=PROFILE)))
            if len(found) == n_infills:
                return found
    return found


class SignalFeeder(threading.Thread):
    """Keeps the learner's queue holding a few repeat signals until stopped."""

    def __init__(self, learner: Learner, signals: list[InteractionSignal]):
        super().__init__(name="bench-feeder", daemon=True)
        self.learner, self.signals = learner, signals
        self.stop = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stop.is_set():
            if self.learner.queue.qsize() < 2:
                self.learner.on_signal(self.signals[self.sent % len(self.signals)])
                self.sent += 1
            time.sleep(0.01)


def timed_infill(engine: Engine, request: InfillRequest, seed: int) -> float:
    started = time.perf_counter()
    engine.infill(request.song, request.start_qn, request.end_qn, request.target_tracks,
                  InfillOptions(seed=seed), profile=PROFILE)
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--songs", type=Path, default=BENCH_SONGS_DIR)
    parser.add_argument("--infills", type=int, default=12)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    engine = Engine(args.model)
    chosen = requests(args.songs, args.infills)
    if not chosen:
        raise SystemExit(f"--songs {args.songs}: no song long enough for a 2-bar blank with 8 bars of context")
    with tempfile.TemporaryDirectory() as folder:
        learner = Learner(engine, Path(folder), seed=0)
        learner.wait_idle()
        signals = []
        for index, request in enumerate(chosen):
            candidate = engine.infill(request.song, request.start_qn, request.end_qn, request.target_tracks,
                                      InfillOptions(seed=index), profile=PROFILE).candidates[0].notes
            signals.append(InteractionSignal("repeat", PROFILE, request.session, request, candidate, time.time()))
        idle_s, busy_s = [], []
        handled = 0
        for index, request in enumerate(chosen):
            learner.wait_idle()
            idle_s.append(timed_infill(engine, request, 1000 + index))
            feeder = SignalFeeder(learner, signals)
            logged_before = len(learner.store.read_log(PROFILE))
            feeder.start()
            time.sleep(0.5)  # the learner is mid-signal when the infill starts
            busy_s.append(timed_infill(engine, request, 1000 + index))
            feeder.stop.set()
            feeder.join()
            learner.wait_idle(300)
            handled += len(learner.store.read_log(PROFILE)) - logged_before
        learner.close()
    idle, busy = np.array(idle_s), np.array(busy_s)
    figures = {
        "machine": f"{cpu_model()}, {os.cpu_count()} logical CPUs, load average "
                   f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "model": str(args.model), "infills": len(chosen),
        "idle_median_ms": round(1000 * float(np.median(idle)), 1),
        "busy_median_ms": round(1000 * float(np.median(busy)), 1),
        "idle_p95_ms": round(1000 * float(np.percentile(idle, 95)), 1),
        "busy_p95_ms": round(1000 * float(np.percentile(busy, 95)), 1),
        "median_ratio": round(float(np.median(busy) / np.median(idle)), 3),
        "p95_ratio": round(float(np.percentile(busy, 95) / np.percentile(idle, 95)), 3),
        "paired_median_ratio": round(float(np.median(busy / idle)), 3),
        "signals_handled_while_busy": handled,
    }
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
