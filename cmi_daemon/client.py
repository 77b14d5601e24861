"""Python client of the CMI daemon (docs/protocol.md): finds it through the connection file, signs, waits.

Dependency-light on purpose (pyzmq, msgpack, the standard library, and psutil once it checks that
the daemon's process runs): the REAPER bridge runs it inside the DAW's Python. One DaemonClient per
thread.
"""

from __future__ import annotations

import itertools
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import zmq

from . import paths
from .daemon import protocol
from .errors import CMIError
from .music.notes import normalize_notes

DEFAULT_TIMEOUT_MS = 10_000
INFILL_TIMEOUT_MARGIN_MS = 5_000
LIVENESS_CHECK_MS = 250
"""While waiting for a reply, check this often that the daemon's process still exists."""
START_HINT = "start it with `cmi-daemon start` (or `cmi-daemon start --detach` to run it in the background)"


class DaemonNotRunning(CMIError):
    """No daemon answers: no connection file, or its process is gone."""


class DaemonTimeout(CMIError):
    """The daemon did not reply in time."""


class DaemonError(CMIError):
    """The daemon answered with an error reply: `code` is the protocol's stable code."""

    def __init__(self, code: str, message: str, field: Optional[str] = None):
        self.code = code
        self.field = field
        where = f" [{field}]" if field else ""
        super().__init__(f"daemon error {code}{where}: {message}")


def load_connection(connection_file: Optional[Path] = None) -> dict:
    """The connection info of the running daemon, or DaemonNotRunning saying how to start one."""
    path = Path(connection_file) if connection_file is not None else paths.connection_file()
    try:
        info = paths.read_connection_file(path)
    except FileNotFoundError:
        raise DaemonNotRunning(f"the CMI daemon is not running (no connection file at {path}); "
                               f"{START_HINT}") from None
    if not paths.pid_alive(int(info["pid"])):
        raise DaemonNotRunning(f"the CMI daemon is not running (its process {info['pid']} has ended; "
                               f"{path} is left over from it); {START_HINT}")
    return info


class DaemonClient:
    """Signed requests to the daemon over a DEALER socket; replies matched by request id."""

    def __init__(self, connection: Optional[dict] = None, connection_file: Optional[Path] = None,
                 timeout_ms: int = DEFAULT_TIMEOUT_MS, client_name: str = "cmi-python"):
        self.connection = connection if connection is not None else load_connection(connection_file)
        self.key: str = self.connection["key"]
        self.timeout_ms = timeout_ms
        self.client_name = client_name
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        _apply_curve(self._socket, self.connection.get("curve_server_key"))
        self._socket.connect(self.connection["request_endpoint"])
        self._early: dict[str, dict] = {}

    def close(self) -> None:
        self._socket.close(0)

    def __enter__(self) -> "DaemonClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def send(self, message_type: str, content: dict, request_id: Optional[str] = None) -> str:
        """Send a request without waiting; returns its id (pair with `receive`)."""
        request_id = request_id or self.new_id()
        envelope = protocol.request_envelope(request_id, message_type, content)
        self._socket.send_multipart(protocol.signed_frames(self.key, envelope))
        return request_id

    def receive(self, request_id: str, timeout_ms: Optional[int] = None) -> dict:
        """The reply envelope for request_id; replies to other ids are kept for their own receive."""
        if request_id in self._early:
            return self._early.pop(request_id)
        timeout_ms = self.timeout_ms if timeout_ms is None else timeout_ms
        deadline_s = time.monotonic() + timeout_ms / 1000.0
        while True:
            remaining_ms = int(1000 * (deadline_s - time.monotonic()))
            if remaining_ms <= 0:
                self._check_alive()
                raise DaemonTimeout(f"no reply from the CMI daemon within {timeout_ms} ms "
                                    f"(request {request_id}); `cmi-daemon status` shows what it is doing")
            if not self._socket.poll(min(remaining_ms, LIVENESS_CHECK_MS)):
                self._check_alive()
                continue
            reply = self._matching(self._read_reply(), request_id)
            if reply is not None:
                return reply

    def poll_reply(self, request_id: str) -> Optional[dict]:
        """The reply envelope for request_id if it has arrived, else None; never waits (for a DAW's
        UI loop, which calls it once per tick). DaemonNotRunning once the daemon's process is gone."""
        if request_id in self._early:
            return self._early.pop(request_id)
        while True:
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._check_alive()
                return None
            reply = self._matching(self._verified_reply(frames), request_id)
            if reply is not None:
                return reply

    def _matching(self, reply: Optional[dict], request_id: str) -> Optional[dict]:
        """The reply if it answers request_id; a reply to another request is kept for its caller."""
        if reply is None:
            return None
        if reply.get("id") == request_id:
            return reply
        if reply.get("id") is not None:
            self._early[reply["id"]] = reply
        return None

    def _read_reply(self) -> Optional[dict]:
        return self._verified_reply(self._socket.recv_multipart())

    def _verified_reply(self, frames: list) -> Optional[dict]:
        if len(frames) != 2 or not protocol.signature_matches(self.key, frames[1], frames[0]):
            return None
        reply = protocol.unpack(frames[1])
        return reply if isinstance(reply, dict) else None

    def _check_alive(self) -> None:
        pid = int(self.connection.get("pid", 0))
        if pid and not paths.pid_alive(pid):
            raise DaemonNotRunning(f"the CMI daemon is not running: its process {pid} ended before it replied; "
                                   f"{START_HINT}")

    def request(self, message_type: str, content: Optional[dict] = None,
                timeout_ms: Optional[int] = None) -> dict:
        """Send, wait, and return the reply's content; DaemonError for an error reply."""
        reply = self.receive(self.send(message_type, content or {}), timeout_ms)
        return reply_content(reply)

    def hello(self) -> dict:
        return self.request("hello", {"client": self.client_name})

    def status(self) -> dict:
        return self.request("status")

    def shutdown(self) -> dict:
        return self.request("shutdown")

    def profiles(self, reset: Optional[str] = None) -> dict:
        content = {"action": "reset", "name": reset} if reset else {"action": "list"}
        return self.request("profiles", content)

    def feedback(self, session: str, verdict: str, candidate: int = 0) -> dict:
        return self.request("feedback", {"session": session, "verdict": verdict, "candidate": candidate})

    def cancel(self, request_id: str) -> dict:
        return self.request("cancel", {"request": request_id})

    def infill(self, content: dict, timeout_ms: Optional[int] = None) -> dict:
        """Run an infill (content as built by infill_content); waits for the daemon's own timeout."""
        limit_ms = content.get("timeout_ms") or timeout_ms or protocol.Limits().max_timeout_ms
        content = dict(content, timeout_ms=limit_ms) if timeout_ms is not None else content
        return self.request("infill", content, timeout_ms=limit_ms + INFILL_TIMEOUT_MARGIN_MS)


def reply_content(reply: dict) -> dict:
    if reply.get("ok") is True:
        return reply.get("content") or {}
    error = reply.get("error") or {}
    raise DaemonError(str(error.get("code", "internal")), str(error.get("message", "")), error.get("field"))


def infill_content(song: Any, start_qn: float, end_qn: float, targets: Iterable[int], session: str,
                   options: Optional[dict] = None) -> dict:
    """The content of an `infill` request for a song (anything shaped like cmi_daemon.music.tokens.Song), its
    notes under the degenerate-note rule (`notes.normalize_notes`) as the daemon reads them."""
    tempo_map, meter = song.tempo_map, song.meter
    return {
        "session": session,
        "tracks": [{"name": track.name, "program": int(track.program), "drum": bool(track.is_drum),
                    "channel": track.channel,
                    "notes": [[float(n.start_qn), float(n.duration_qn), int(n.pitch), int(n.velocity)]
                              for n in normalize_notes(track.notes)[0]]}
                   for track in song.tracks],
        "tempo": [[float(qn), float(bpm)] for qn, bpm in zip(tempo_map.start_qn, tempo_map.bpm)],
        "time_signatures": [[float(s.start_qn), int(s.numerator), int(s.denominator)] for s in meter.signatures],
        "range": [float(start_qn), float(end_qn)],
        "targets": [int(t) for t in targets],
        "options": dict(options or {}),
    }


def subscribe(connection: dict, topics: Iterable[str]) -> zmq.Socket:
    """A SUB socket on the daemon's events, subscribed to the given topic prefixes."""
    socket = zmq.Context.instance().socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    _apply_curve(socket, connection.get("curve_server_key"))
    for topic in topics:
        socket.setsockopt(zmq.SUBSCRIBE, topic.encode("utf-8"))
    socket.connect(connection["event_endpoint"])
    return socket


def read_event(socket: zmq.Socket, key: str) -> Optional[tuple[str, dict]]:
    """(topic, envelope) of one event, or None when its signature does not match."""
    frames = socket.recv_multipart()
    if len(frames) != 3 or not protocol.signature_matches(key, frames[2], frames[1]):
        return None
    return frames[0].decode("utf-8", "replace"), protocol.unpack(frames[2])


def _apply_curve(socket: zmq.Socket, server_key: Optional[str]) -> None:
    if server_key:
        public_key, secret_key = zmq.curve_keypair()
        socket.curve_serverkey = server_key.encode("ascii")
        socket.curve_publickey = public_key
        socket.curve_secretkey = secret_key


def wait_for_exit(pid: int, timeout_s: float, poll: Callable[[int], bool] = paths.pid_alive) -> bool:
    """Whether the process ended within timeout_s."""
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if not poll(pid):
            return True
        time.sleep(0.05)
    return not poll(pid)
