"""The daemon's socket loop on loopback: replies, queue, busy, timeouts, cancel, signals, events, bad frames.

Mechanics use a deterministic stand-in backend (StandInBackend) so timings are controlled; the
real engine runs end to end in test_daemon_engine_infill_end_to_end and in the fuzz, load and
fault tests.
"""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from cmi_daemon.client import DaemonClient, DaemonError, read_event, subscribe
from cmi_daemon.daemon import protocol
from cmi_daemon.daemon.engine_backend import EngineBackend
from cmi_daemon.daemon.server import Daemon
from cmi_daemon.daemon.settings import Settings, load_settings
from cmi_daemon.errors import CMIError
from daemon_support import StandInBackend, check_infill_reply, infill_request, threaded_daemon
from tiny_bundle import tiny_bundle_dir


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return tiny_bundle_dir(tmp_path_factory)


def _client(daemon, timeout_ms=10_000) -> DaemonClient:
    return DaemonClient(connection=daemon.connection_info(), timeout_ms=timeout_ms)


def test_daemon_engine_infill_end_to_end(tiny_bundle):
    with threaded_daemon(EngineBackend(tiny_bundle, "cpu")) as daemon, _client(daemon) as client:
        hello = client.hello()
        assert hello["protocol"] == protocol.PROTOCOL_VERSION and "infill" in hello["capabilities"]
        assert hello["model"]["name"] == "tiny" and hello["limits"]["max_candidates"] == 8
        request = infill_request(candidates=3)
        reply = client.infill(request)
        check_infill_reply(reply, request)
        assert set(reply["timings_ms"]) >= {"queue", "infill", "total"}
        assert client.infill(request)["candidates"] == reply["candidates"], "same seed, same notes"
        status = client.status()
        assert status["requests_served"] == 2 and status["state"] == "idle"
        assert status["profiles"][0]["repeated"] == 1, "the second infill of a session is a repeat"


def test_status_answers_at_once_while_an_infill_runs():
    backend = StandInBackend(delay_s=2.0)
    with threaded_daemon(backend) as daemon, _client(daemon) as client:
        request_id = client.send("infill", infill_request())
        assert backend.started.wait(5)
        started_s = time.monotonic()
        status = client.status()
        assert time.monotonic() - started_s < 0.5
        assert status["state"] == "busy" and status["running"] == request_id
        reply = client.receive(request_id)
        assert reply["ok"] and reply["type"] == "infill_reply"


def test_full_queue_answers_busy_and_queued_infills_are_served_in_order():
    backend = StandInBackend(delay_s=0.3)
    with threaded_daemon(backend, queue_size=2) as daemon, _client(daemon) as client:
        ids = [client.send("infill", infill_request(session=f"s{i}")) for i in range(5)]
        replies = [client.receive(i) for i in ids]
        codes = [r["error"]["code"] if not r["ok"] else "ok" for r in replies]
        assert codes == ["ok", "ok", "ok", "busy", "busy"]
        assert [r["content"]["session"] for r in replies[:3]] == ["s0", "s1", "s2"]


def test_timeout_and_cancel():
    backend = StandInBackend(delay_s=5.0)
    with threaded_daemon(backend, queue_size=4) as daemon, _client(daemon) as client:
        with pytest.raises(DaemonError) as caught:
            client.infill(dict(infill_request(), timeout_ms=300))
        assert caught.value.code == "timeout"
        running = client.send("infill", infill_request(session="a"))
        queued = client.send("infill", infill_request(session="b"))
        time.sleep(0.3)
        assert client.cancel(queued) == {"request": queued, "state": "queued"}
        assert client.cancel(running) == {"request": running, "state": "running"}
        for request_id in (running, queued):
            assert client.receive(request_id)["error"]["code"] == "cancelled"
        with pytest.raises(DaemonError) as caught:
            client.cancel("no-such-request")
        assert caught.value.code == "not_found" and caught.value.field == "content.request"
        assert client.status()["requests_failed"] == 3


def test_engine_fault_is_internal_and_the_daemon_keeps_serving():
    backend = StandInBackend(fail=True)
    with threaded_daemon(backend) as daemon, _client(daemon) as client:
        with pytest.raises(DaemonError) as caught:
            client.infill(infill_request())
        assert caught.value.code == "internal"
        backend.fail = False
        check_infill_reply(client.infill(infill_request()), infill_request())


class RecordingSink:
    def __init__(self):
        self.signals = []
        self.resets = []

    def on_signal(self, signal):
        self.signals.append(signal)

    def reset_profile(self, profile):
        self.resets.append(profile)


def test_feedback_and_repeats_reach_the_signal_hook_and_the_profiles(tmp_path):
    sink = RecordingSink()
    daemon = Daemon(StandInBackend(), Settings(port=0), sink=sink, profiles_path=tmp_path / "profiles.json")
    thread = threading.Thread(target=daemon.serve)
    thread.start()
    try:
        with _client(daemon) as client:
            events = subscribe(daemon.connection_info(), ["dil."])
            time.sleep(0.3)
            with pytest.raises(DaemonError) as caught:
                client.feedback("never-infilled", "accept")
            assert caught.value.code == "not_found"
            client.infill(infill_request(session="take:8-12", profile="ana"))
            client.infill(infill_request(session="take:8-12", profile="ana"))
            assert client.feedback("take:8-12", "accept") == {"session": "take:8-12", "verdict": "accept",
                                                              "profile": "ana"}
            assert [(s.kind, s.profile, s.session) for s in sink.signals] == [
                ("repeat", "ana", "take:8-12"), ("accept", "ana", "take:8-12")]
            assert sink.signals[1].candidate[0][0].pitch == 60
            assert events.poll(2000)
            topic, event = read_event(events, daemon.key)
            assert topic == "dil.ana" and event["content"]["signal"] == "repeat"
            events.close()
            profiles = client.profiles()["profiles"]
            assert profiles == [{"name": "ana", "accepted": 1, "rejected": 0, "repeated": 1,
                                 "last_signal_at": profiles[0]["last_signal_at"], "learned": None}]
            assert client.profiles(reset="ana") == {"profiles": [], "reset": "ana"}
            assert sink.resets == ["ana"]
            with pytest.raises(DaemonError) as caught:
                client.profiles(reset="ana")
            assert caught.value.code == "not_found"
    finally:
        daemon.request_stop()
        thread.join(10)


def test_progress_events_are_published_and_signed():
    with threaded_daemon(StandInBackend(delay_s=0.2)) as daemon, _client(daemon) as client:
        events = subscribe(daemon.connection_info(), ["progress."])
        time.sleep(0.3)
        request_id = client.send("infill", infill_request())
        client.receive(request_id)
        stages = []
        while events.poll(500):
            topic, event = read_event(events, daemon.key)
            assert topic == f"progress.{request_id}" and event["type"] == "progress"
            stages.append(event["content"]["stage"])
        events.close()
        assert stages[0] == "queued" and "decode" in stages and stages[-1] == "done"


def _raw_socket(daemon):
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(daemon.request_endpoint)
    return socket


def _raw_reply(socket, key, timeout_ms=3000):
    assert socket.poll(timeout_ms), "no reply"
    signature, body = socket.recv_multipart()
    assert protocol.signature_matches(key, body, signature)
    return msgpack.unpackb(body)


def test_untrusted_messages_get_error_replies_without_id():
    with threaded_daemon(StandInBackend(), limits=protocol.Limits(max_message_bytes=10_000)) as daemon:
        socket = _raw_socket(daemon)
        body = protocol.pack(protocol.request_envelope("r1", "status", {}))
        cases = [
            ([b"only one frame"], "bad_message"),
            ([b"a", b"b", b"c"], "bad_message"),
            ([b"0" * 64, body], "bad_signature"),
            ([protocol.sign("f" * 64, body), body], "bad_signature"),
            ([protocol.sign(daemon.key, body[:-2]), body[:-2]], "bad_message"),
            ([b"x" * 64, b"y" * 20_000], "too_large"),
        ]
        for frames, code in cases:
            socket.send_multipart(frames)
            reply = _raw_reply(socket, daemon.key)
            assert (reply["ok"], reply["id"], reply["type"], reply["error"]["code"]) == (False, None, "error", code)
        wrong_version = protocol.pack({"protocol": "2.0", "id": "r2", "type": "status", "content": {}})
        socket.send_multipart([protocol.sign(daemon.key, wrong_version), wrong_version])
        reply = _raw_reply(socket, daemon.key)
        assert (reply["id"], reply["type"], reply["error"]["code"]) == ("r2", "error", "unsupported_version")
        assert protocol.PROTOCOL_VERSION in reply["error"]["message"]
        socket.close()


def test_req_sockets_work_too():
    with threaded_daemon(StandInBackend()) as daemon:
        socket = zmq.Context.instance().socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(daemon.request_endpoint)
        socket.send_multipart(protocol.signed_frames(daemon.key, protocol.request_envelope("q", "status", {})))
        reply = _raw_reply(socket, daemon.key)
        assert reply["id"] == "q" and reply["ok"] and reply["content"]["state"] == "idle"
        socket.close()


def test_shutdown_cancels_queued_infills_and_refuses_new_ones():
    backend = StandInBackend(delay_s=1.0)
    with threaded_daemon(backend, shutdown_grace_ms=3000) as daemon, _client(daemon) as client:
        running = client.send("infill", infill_request(session="a"))
        queued = client.send("infill", infill_request(session="b"))
        assert backend.started.wait(5)
        assert client.shutdown() == {"stopping": True}
        assert client.receive(queued)["error"]["code"] == "cancelled"
        assert client.status()["state"] == "stopping" and client.hello()["protocol"] == protocol.PROTOCOL_VERSION
        for refused in (lambda: client.profiles(), lambda: client.infill(infill_request(session="c"))):
            with pytest.raises(DaemonError, match="shutting_down"):
                refused()
        assert client.receive(running)["ok"], "the running infill finishes within the grace period"


def test_an_infill_read_after_shutdown_is_refused_not_taken():
    # Both requests wait in the socket before the loop starts, so it reads them in one turn.
    daemon = Daemon(StandInBackend(), Settings(port=0))
    client = _client(daemon)
    shutdown = client.send("shutdown", {})
    infill = client.send("infill", infill_request())
    assert daemon.router.poll(5000)
    time.sleep(0.2)
    thread = threading.Thread(target=daemon.serve, name="daemon-under-test")
    thread.start()
    try:
        assert client.receive(shutdown)["content"] == {"stopping": True}
        reply = client.receive(infill)
        assert (reply["ok"], reply.get("error", {}).get("code")) == (False, "shutting_down")
    finally:
        client.close()
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_a_duplicate_in_flight_id_gets_an_error_carrying_that_id():
    with threaded_daemon(StandInBackend(delay_s=0.5)) as daemon, _client(daemon):
        socket = _raw_socket(daemon)
        frames = protocol.signed_frames(daemon.key, protocol.request_envelope("same", "infill", infill_request()))
        socket.send_multipart(frames)
        socket.send_multipart(frames)
        duplicate, first = _raw_reply(socket, daemon.key), _raw_reply(socket, daemon.key)
        assert (duplicate["id"], duplicate["type"], duplicate["error"]["code"], duplicate["error"]["field"]) == \
            ("same", "infill_reply", "invalid_field", "message.id")
        assert (first["id"], first["ok"]) == ("same", True)
        socket.close()


def test_status_counts_malformed_messages_and_failed_infills():
    with threaded_daemon(StandInBackend()) as daemon, _client(daemon) as client:
        socket = _raw_socket(daemon)
        socket.send_multipart([b"0" * 64, b"body"])
        assert _raw_reply(socket, daemon.key)["error"]["code"] == "bad_signature"
        socket.close()
        with pytest.raises(DaemonError, match="invalid_field"):
            client.infill(dict(infill_request(), targets=[5]))
        with pytest.raises(DaemonError, match="not_found"):
            client.feedback("no-such-session", "accept")
        with pytest.raises(DaemonError, match="not_found"):
            client.profiles(reset="nobody")
        client.infill(infill_request())
        status = client.status()
        assert (status["messages_rejected"], status["requests_failed"], status["requests_served"]) == (2, 1, 1)


def test_hello_limits_are_floats_where_the_protocol_says_and_integers_elsewhere(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[limits]\nmax_range_qn = 16\nmax_position_qn = 5000\n")
    settings = load_settings(config, {"port": 0})
    with threaded_daemon(StandInBackend(), limits=settings.limits) as daemon, _client(daemon) as client:
        limits = client.hello()["limits"]
    floats = {"max_range_qn", "max_position_qn", "max_temperature", "max_repetition_penalty"}
    assert limits["max_range_qn"] == 16.0
    assert {name for name, value in limits.items() if type(value) is float} == floats
    assert all(type(value) is int for name, value in limits.items() if name not in floats)


def test_binding_off_loopback_needs_curve():
    with pytest.raises(CMIError, match="only loopback"):
        Daemon(StandInBackend(), Settings(port=0, bind_address="0.0.0.0"))


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ")
def test_curve_daemon_serves_curve_clients():
    public_key, secret_key = zmq.curve_keypair()
    daemon = Daemon(StandInBackend(), Settings(port=0), curve_secret_key=secret_key)
    assert daemon.connection_info()["curve_server_key"] == public_key.decode()
    thread = threading.Thread(target=daemon.serve)
    thread.start()
    try:
        with _client(daemon) as client:
            assert client.status()["state"] == "idle"
    finally:
        daemon.request_stop()
        thread.join(10)


@pytest.mark.parametrize("address", ["::1", "[::1]"])
def test_ipv6_loopback_is_accepted_with_or_without_brackets(address):
    daemon = Daemon(StandInBackend(), Settings(port=0, bind_address=address))
    thread = threading.Thread(target=daemon.serve)
    thread.start()
    try:
        assert daemon.settings.loopback and daemon.request_endpoint.startswith("tcp://[::1]:")
    finally:
        daemon.request_stop()
        thread.join(30)
