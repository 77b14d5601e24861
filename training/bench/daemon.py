"""Load benchmark of a running daemon: N concurrent clients x M infills each; throughput and latency.

    python -m training.bench_daemon [--clients 8] [--infills 20] [--connection-file PATH]

Each client is a thread with its own DaemonClient; a `busy` reply is retried after a short pause
(and counted). The request is a small two-track song with a 4-QN range infilled on one track.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from cmi_daemon.inference.measure import cpu_model
from cmi_daemon.client import DaemonClient, DaemonError, load_connection

BUSY_RETRY_PAUSE_S = 0.02
INFILL_TIMEOUT_MS = 120_000


@dataclass
class LoadReport:
    latencies_ms: list[float] = field(default_factory=list)
    busy_retries: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def throughput_per_s(self) -> float:
        return len(self.latencies_ms) / self.elapsed_s if self.elapsed_s else 0.0

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]

    def summary(self) -> str:
        return (f"{len(self.latencies_ms)} infills in {self.elapsed_s:.1f} s: {self.throughput_per_s:.1f} infills/s, "
                f"latency p50 {self.percentile_ms(0.5):.0f} ms, p95 {self.percentile_ms(0.95):.0f} ms, "
                f"max {max(self.latencies_ms, default=float('nan')):.0f} ms; {self.busy_retries} busy retries, "
                f"{len(self.errors)} errors")


def sample_request(client_index: int, infill_index: int) -> dict:
    """A small song (melody + bass, 16 QN) whose bars 3-4 of the melody are infilled."""
    melody = [[float(qn), 0.5, 60 + (qn * 7 + client_index) % 12, 90] for qn in range(16)]
    bass = [[float(qn), 2.0, 36 + qn % 5, 80] for qn in range(0, 16, 2)]
    return {
        "session": f"bench-{client_index}-{infill_index}",
        "tracks": [{"name": "Melody", "program": 0, "notes": melody},
                   {"name": "Bass", "program": 33, "notes": bass}],
        "tempo": [[0.0, 120.0]],
        "time_signatures": [[0.0, 4, 4]],
        "range": [8.0, 12.0],
        "targets": [0],
        "options": {"candidates": 1, "seed": client_index * 1000 + infill_index},
    }


def _client_run(connection: dict, client_index: int, n_infills: int, report: LoadReport, lock: threading.Lock,
                make_request: Callable[[int, int], dict], check: Optional[Callable[[dict, dict], None]]) -> None:
    with DaemonClient(connection=connection, timeout_ms=INFILL_TIMEOUT_MS) as client:
        for infill_index in range(n_infills):
            request = make_request(client_index, infill_index)
            started_s = time.perf_counter()
            while True:
                try:
                    reply = client.infill(request)
                    break
                except DaemonError as error:
                    if error.code != "busy":
                        with lock:
                            report.errors.append(str(error))
                        reply = None
                        break
                    with lock:
                        report.busy_retries += 1
                    time.sleep(BUSY_RETRY_PAUSE_S)
            latency_ms = (time.perf_counter() - started_s) * 1000.0
            if reply is not None:
                if check is not None:
                    check(reply, request)
                with lock:
                    report.latencies_ms.append(latency_ms)


def run_load(connection: dict, n_clients: int, n_infills: int,
             make_request: Callable[[int, int], dict] = sample_request,
             check: Optional[Callable[[dict, dict], None]] = None) -> LoadReport:
    """n_clients threads, each sending n_infills infills one after another; busy replies are retried."""
    report = LoadReport()
    lock = threading.Lock()
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            _client_run(connection, index, n_infills, report, lock, make_request, check)
        except BaseException as error:  # re-raised in the caller's thread below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i,), name=f"load-client-{i}") for i in range(n_clients)]
    started_s = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report.elapsed_s = time.perf_counter() - started_s
    if failures:
        raise failures[0]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.bench_daemon", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--infills", type=int, default=20, help="infills per client")
    parser.add_argument("--connection-file", type=Path, help="default: the running daemon's")
    args = parser.parse_args(argv)
    connection = load_connection(args.connection_file)
    with DaemonClient(connection=connection) as client:
        status = client.status()
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"daemon: PID {status['pid']}, model {status['model'].get('name')} on {status['device']}")
    report = run_load(connection, args.clients, args.infills)
    print(f"{args.clients} clients x {args.infills} infills: {report.summary()}")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
