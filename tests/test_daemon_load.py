"""Load on a live daemon process with the real engine (tiny model): 8 concurrent clients x 20 infills,
every one answered correctly (busy replies retried), resident memory flat afterwards."""

from __future__ import annotations

import pytest

from cmi_daemon.client import load_connection
from daemon_support import (check_infill_reply, client_for, connection_path, process_rss_bytes,
                            start_daemon_process)
from tiny_bundle import tiny_bundle_dir
from training.bench.daemon import run_load, sample_request

pytestmark = pytest.mark.slow

N_CLIENTS = 8
N_INFILLS = 20
RSS_GROWTH_LIMIT_BYTES = 60 * 1024 * 1024


def test_eight_clients_twenty_infills_each(tmp_path_factory):
    home = tmp_path_factory.mktemp("load-home")
    process = start_daemon_process(home, tiny_bundle_dir(tmp_path_factory), "--queue-size", "4")
    try:
        connection = load_connection(connection_path(home))
        # Sessions of the warm-up are not repeated by the load: a repeat is a "not this" signal and
        # would start the DIL learner, whose memory is measured with the DIL (tests/test_dil.py).
        warm_up = run_load(connection, N_CLIENTS, 3, check=check_infill_reply,
                           make_request=lambda c, i: {**sample_request(c, i), "session": f"warm-up-{c}-{i}"})
        assert not warm_up.errors
        rss_after_warm_up = process_rss_bytes(process.pid)

        report = run_load(connection, N_CLIENTS, N_INFILLS, check=check_infill_reply)
        print(f"\nload: {N_CLIENTS} clients x {N_INFILLS} infills (tiny model, queue 4): {report.summary()}")
        assert not report.errors
        assert len(report.latencies_ms) == N_CLIENTS * N_INFILLS
        assert report.busy_retries > 0, "four waiting places for eight clients: some must have been told busy"

        rss_after_load = process_rss_bytes(process.pid)
        if rss_after_warm_up is not None:
            print(f"RSS: {rss_after_warm_up / 1e6:.0f} MB after warm-up, {rss_after_load / 1e6:.0f} MB after load")
            assert rss_after_load - rss_after_warm_up < RSS_GROWTH_LIMIT_BYTES
        with client_for(home) as client:
            status = client.status()
            assert status["requests_served"] == N_CLIENTS * (N_INFILLS + 3)
            assert status["queue_length"] == 0 and status["state"] == "idle"
            check_infill_reply(client.infill(sample_request(0, 0)), sample_request(0, 0))
    finally:
        process.terminate()
        assert process.wait(30) == 0
    assert not connection_path(home).exists(), "a stopped daemon removes its connection file"
