"""The daemon as a user service: one per user, kill -9 mid-request, restart over stale files, signals,
busy ports, the start/stop/status commands and their exit codes."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest

from cmi_daemon.client import DaemonClient, DaemonNotRunning, load_connection
from cmi_daemon.paths import pid_alive
from daemon_support import (REPO, check_infill_reply, client_for, connection_path, daemon_environment,
                            infill_request, start_daemon_process)
from tiny_bundle import tiny_bundle_dir

pytestmark = pytest.mark.slow


def _cli(home, *args, timeout_s=120):
    return subprocess.run([sys.executable, "-m", "cmi_daemon.cli.main", *args], env=daemon_environment(home),
                          capture_output=True, text=True, timeout=timeout_s, cwd=REPO)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return tiny_bundle_dir(tmp_path_factory)


def test_kill_9_mid_request_then_start_again(tmp_path, tiny_bundle):
    process = start_daemon_process(tmp_path, tiny_bundle)
    client = client_for(tmp_path, timeout_ms=60_000)
    outcome = {}

    def long_infill():
        request = infill_request(start_qn=0.0, end_qn=256.0, candidates=8)
        try:
            client.infill(request)
            outcome["result"] = "reply"
        except DaemonNotRunning as error:
            outcome["result"] = str(error)

    waiter = threading.Thread(target=long_infill)
    waiter.start()
    with client_for(tmp_path) as watcher:
        while watcher.status()["running"] is None:
            time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    waiter.join(10)
    client.close()
    assert "not running" in outcome["result"] and "cmi-daemon start" in outcome["result"]
    assert connection_path(tmp_path).exists(), "kill -9 leaves the connection file behind"
    with pytest.raises(DaemonNotRunning, match="has ended"):
        load_connection(connection_path(tmp_path))
    status = _cli(tmp_path, "status")
    assert status.returncode == 2 and "not running" in status.stderr

    restarted = start_daemon_process(tmp_path, tiny_bundle)
    try:
        with client_for(tmp_path) as client:
            request = infill_request()
            check_infill_reply(client.infill(request), request)
        assert stat.S_IMODE(connection_path(tmp_path).stat().st_mode) == 0o600
        assert (tmp_path / "state" / "daemon.lock").read_text().strip() == str(restarted.pid)
    finally:
        restarted.send_signal(signal.SIGINT)
        assert restarted.wait(30) == 0
    assert not connection_path(tmp_path).exists() and not (tmp_path / "state" / "daemon.lock").exists()


def test_one_daemon_per_user_and_the_commands(tmp_path, tiny_bundle):
    process = start_daemon_process(tmp_path, tiny_bundle)
    try:
        second = _cli(tmp_path, "start", "--model", str(tiny_bundle), "--port", "0")
        assert second.returncode == 2
        assert f"PID {process.pid}" in second.stderr and "tcp://127.0.0.1:" in second.stderr

        status = _cli(tmp_path, "status")
        assert status.returncode == 0, status.stderr
        for words in ("state: idle", f"PID {process.pid}", "model: tiny", "device: cpu", "queue: 0 / 8",
                      "requests served: 0", "profiles: none"):
            assert words in status.stdout

        song = REPO / "tests" / "fixtures" / "midi" / "pop909" / "235" / "235.mid"
        output = tmp_path / "out.mid"
        infill = _cli(tmp_path, "infill", str(song), "--daemon", "--bars", "9-10", "--candidates", "2",
                      "-o", str(output))
        assert infill.returncode == 0, infill.stderr
        assert "infilled by the daemon (tiny)" in infill.stdout
        assert output.stat().st_size > 0 and (tmp_path / "out-2.mid").stat().st_size > 0

        stop = _cli(tmp_path, "stop")
        assert stop.returncode == 0 and f"(PID {process.pid}) stopped" in stop.stdout
        assert process.wait(10) == 0
        assert _cli(tmp_path, "stop").returncode == 2
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_finishes_the_running_infill(tmp_path, tiny_bundle):
    process = start_daemon_process(tmp_path, tiny_bundle)
    with client_for(tmp_path, timeout_ms=60_000) as client:
        request = infill_request(start_qn=0.0, end_qn=16.0, candidates=4)
        request_id = client.send("infill", request)
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        reply = client.receive(request_id)
    assert reply["ok"] or reply["error"]["code"] == "cancelled"
    assert process.wait(30) == 0
    assert not connection_path(tmp_path).exists()


def test_detach_runs_in_the_background(tmp_path, tiny_bundle):
    started = _cli(tmp_path, "start", "--detach", "--model", str(tiny_bundle), "--port", "0")
    assert started.returncode == 0, started.stderr
    assert "started in the background: PID" in started.stdout and str(tmp_path / "logs") in started.stdout
    pid = load_connection(connection_path(tmp_path))["pid"]
    try:
        with client_for(tmp_path) as client:
            assert client.status()["pid"] == pid
    finally:
        assert _cli(tmp_path, "stop").returncode == 0
    assert "ready" in (tmp_path / "logs" / "daemon.log").read_text()


def test_busy_port_and_missing_model_are_clear(tmp_path, tiny_bundle):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = _cli(tmp_path, "start", "--model", str(tiny_bundle), "--port", str(port))
    assert result.returncode == 2 and f"port {port} on 127.0.0.1 is already in use" in result.stderr
    missing = _cli(tmp_path, "start", "--model", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "--model" in missing.stderr
    refused = _cli(tmp_path, "start", "--model", str(tiny_bundle), "--bind", "0.0.0.0", "--port", "0")
    assert refused.returncode == 2 and "only loopback" in refused.stderr


def test_clients_without_a_daemon_get_a_clear_error(tmp_path):
    with pytest.raises(DaemonNotRunning, match="cmi-daemon start"):
        DaemonClient(connection_file=tmp_path / "connection.json")


def test_a_process_is_alive_until_it_ends_and_a_zombie_counts_as_ended():
    """What the client and `status` decide a daemon's connection file by: this process runs; a child
    that has ended is dead before it is reaped (a zombie, on POSIX) and after; no id <= 0 runs."""
    assert pid_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)
    finally:
        child.kill()
    if os.name != "nt":
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, still unreaped: a zombie
        assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
        assert not pid_alive(child.pid)
    child.wait(10)
    assert not pid_alive(child.pid)
    assert not pid_alive(0) and not pid_alive(-1)
