"""Fuzzing a live daemon process (real engine, tiny model) with random, mutated, truncated and badly
signed messages: each gets the reply docs/protocol.md promises, the daemon survives, and a valid
infill still succeeds afterwards."""

from __future__ import annotations

import copy
import math

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmi_daemon.daemon import protocol
from cmi_daemon.client import load_connection
from daemon_support import check_infill_reply, client_for, connection_path, infill_request, start_daemon_process
from tiny_bundle import tiny_bundle_dir

pytestmark = pytest.mark.slow

REPLY_TIMEOUT_MS = 30_000


def fuzz_settings(max_examples: int) -> settings:
    """Fixed examples (derandomized, no database) so the suite's runtime and outcome are stable."""
    return settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def live_daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz-home")
    process = start_daemon_process(home, tiny_bundle_dir(tmp_path_factory), "--queue-size", "4")
    info = load_connection(connection_path(home))
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(info["request_endpoint"])
    yield home, process, info, socket
    socket.close()
    process.terminate()
    process.wait(30)


def _exchange(live_daemon, frames: list[bytes]) -> dict:
    """Send frames, return the signed reply; fails if the daemon died or stayed silent."""
    _, process, info, socket = live_daemon
    socket.send_multipart(frames)
    assert socket.poll(REPLY_TIMEOUT_MS), "no reply: the daemon must answer every message"
    assert process.poll() is None, "the daemon died"
    reply_frames = socket.recv_multipart()
    if frames[0] == b"" and len(frames) > 1 or frames == [b""]:
        assert reply_frames[0] == b"", "an empty first frame is a REQ delimiter and is echoed"
        reply_frames = reply_frames[1:]
    signature, body = reply_frames
    assert protocol.signature_matches(info["key"], body, signature)
    reply = msgpack.unpackb(body)
    assert reply["protocol"] == protocol.PROTOCOL_VERSION
    if not reply["ok"]:
        assert reply["error"]["code"] in protocol.ERROR_CODES
        assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    return reply


def _signed(info, body: bytes) -> list[bytes]:
    return [protocol.sign(info["key"], body), body]


# No subnormal floats: the engine's CPU path flushes denormals process-wide.
scalars = (st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1)
           | st.floats(allow_nan=True, allow_subnormal=False)
           | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                      | st.dictionaries(st.text(max_size=8) | st.integers(-2 ** 63, 2 ** 63), inner, max_size=5),
                      max_leaves=30)
weird = (st.sampled_from([math.nan, math.inf, -math.inf, -1, -0.5, 128, 1e300, 2 ** 63, "", "x" * 300, None,
                          True, [], {}, [[]], b"\x00"]) | scalars
         | st.builds(lambda n: [[0.0, 1.0, 60, 100]] * n, st.integers(0, 3000)))


def _paths(value, prefix=()):
    """Every path to a value inside a request content (maps and lists)."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value[:6]):
            yield from _paths(child, prefix + (index,))


BASE_CONTENT = infill_request(session="fuzz", start_qn=8.0, end_qn=9.0)
CONTENT_PATHS = [path for path in _paths(BASE_CONTENT) if path]


def _mutated(path, replacement, delete):
    content = copy.deepcopy(BASE_CONTENT)
    parent = content
    for step in path[:-1]:
        parent = parent[step]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = replacement
    return content


@fuzz_settings(1000)
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_random_frames(live_daemon, frames):
    reply = _exchange(live_daemon, frames)
    assert not reply["ok"] and reply["id"] is None
    assert reply["error"]["code"] in ("bad_message", "bad_signature", "too_large")


@fuzz_settings(1000)
@given(value=values)
def test_random_signed_bodies(live_daemon, value):
    reply = _exchange(live_daemon, _signed(live_daemon[2], msgpack.packb(value)))
    assert not reply["ok"]


@fuzz_settings(1000)
@given(message_type=st.sampled_from(protocol.MESSAGE_TYPES[:-1]), content=values)
def test_random_content_of_every_type(live_daemon, message_type, content):
    envelope = protocol.request_envelope("fuzz-id", message_type, content)
    reply = _exchange(live_daemon, _signed(live_daemon[2], msgpack.packb(envelope)))
    assert reply["id"] == "fuzz-id"
    if not reply["ok"]:
        assert reply["error"]["code"] in ("bad_message", "invalid_field", "not_found", "too_large")


@fuzz_settings(1500)
@given(path=st.sampled_from(CONTENT_PATHS), replacement=weird, delete=st.booleans())
def test_mutated_infills(live_daemon, path, replacement, delete):
    content = _mutated(path, replacement, delete)
    try:
        body = msgpack.packb(protocol.request_envelope("mutant", "infill", content))
    except (OverflowError, ValueError, TypeError):
        return
    reply = _exchange(live_daemon, _signed(live_daemon[2], body))
    assert reply["id"] == "mutant"
    if reply["ok"]:
        check_infill_reply(reply["content"], content)
    else:
        assert reply["error"]["code"] in ("invalid_field", "too_large", "busy")
        if reply["error"]["code"] == "invalid_field":
            assert reply["error"]["field"].startswith(("content", "message"))


@fuzz_settings(500)
@given(cut=st.integers(1, 200), flip=st.integers(0, 63))
def test_truncated_and_badly_signed(live_daemon, cut, flip):
    info = live_daemon[2]
    body = msgpack.packb(protocol.request_envelope("t", "infill", BASE_CONTENT))
    truncated = body[:max(0, len(body) - cut)]
    assert _exchange(live_daemon, _signed(info, truncated))["error"]["code"] == "bad_message"
    signature = bytearray(protocol.sign(info["key"], body))
    signature[flip] = ord("0") if signature[flip] != ord("0") else ord("1")
    assert _exchange(live_daemon, [bytes(signature), body])["error"]["code"] == "bad_signature"


def test_huge_arrays_are_too_large(live_daemon):
    info = live_daemon[2]
    content = copy.deepcopy(BASE_CONTENT)
    content["tracks"][0]["notes"] = [[1.0, 1.0, 60, 100]] * 100_001
    reply = _exchange(live_daemon, _signed(info, msgpack.packb(protocol.request_envelope("big", "infill", content))))
    assert (reply["error"]["code"], reply["error"]["field"]) == ("too_large", "content.tracks[0].notes")
    oversized = b"\x00" * (9 * 1024 * 1024)
    reply = _exchange(live_daemon, _signed(info, oversized))
    assert reply["error"]["code"] == "too_large"


def test_valid_infill_after_the_fuzz(live_daemon):
    home, process, _, _ = live_daemon
    with client_for(home) as client:
        request = infill_request(candidates=2)
        check_infill_reply(client.infill(request), request)
        status = client.status()
    assert process.poll() is None
    print(f"fuzz: {status['messages_rejected']} messages rejected, {status['requests_served']} infills served")
    assert status["messages_rejected"] >= 4000 and status["requests_served"] >= 1
