"""The daemon's ZeroMQ server (docs/protocol.md): ROUTER for requests, PUB for events, one inference worker.

The socket loop runs on the calling thread and owns both sockets; it validates every message,
answers everything but `infill` itself, and keeps a bounded queue of infills. One worker thread
runs the backend (the engine, through an adapter implementing InfillBackend) on one infill at a
time, so `status` is answered at once even while a long infill runs. Interaction signals
(feedback, repeated infills of a session) go to a SignalSink: the hook the DIL learner plugs into.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import psutil
import zmq

from .. import __version__
from ..errors import CMIError, InfillCancelled
from ..music.repeats import SEND_BARS
from ..music.tokens import Note, Song
from . import protocol, schema
from .profiles import ProfileBook
from .protocol import Limits, ProtocolError
from .schema import InfillRequest
from .settings import Settings

log = logging.getLogger("cmi_daemon.daemon.server")

POLL_INTERVAL_MS = 50
MAX_MESSAGES_PER_TURN = 64
SESSION_MEMORY = 256
"""Sessions remembered at most, within the byte budget of Settings.session_memory_mib."""
SESSION_NOTE_BYTES = 128
"""What one remembered note costs, by sys.getsizeof: the Note (a 4-tuple, 72 bytes), its two floats
(24 each; pitch and velocity are Python's shared small ints) and its list slot (8)."""
SESSION_FIXED_BYTES = 4096
"""What a remembered session costs besides its notes (tracks, maps, tempo and meter)."""
WINDOW_MARGIN_QN = 1.0
"""Notes this close to the last event a model's window can hold are kept too: one QN is at least one
time step of the tokenizer (8 ms at most 1000 BPM, or 1/N QN), so notes merged into one step stay together."""
OVERSIZE_DROP_FACTOR = 4
CLOSE_LINGER_MS = 500
WORKER_EXIT_WAIT_S = 2.0
PROGRESS_INTERVAL_S = 0.1
"""At most one progress event per request in this interval: engines may report every decode step."""

StageProgressCallback = Callable[[float, str], None]
"""progress(fraction 0..1, stage name), called by a backend from the worker thread."""


@dataclass
class BackendResult:
    """What a backend's infill returns: candidates (target track index -> notes in QN, one dict per
    candidate), timings in ms, and the seed each candidate was drawn with (that seed and one candidate
    give it again)."""

    candidates: list[dict[int, list[Note]]]
    timings_ms: dict[str, float] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)
    repeat: Optional[dict] = None
    """The song's repeat of the range that guided the candidates ({"offset_qn", "similarity"}), if any."""


class InfillBackend(Protocol):
    """What the server needs from an inference engine. Runs on the worker thread only."""

    def describe(self) -> dict:
        """Model information for `hello` and `status`: at least `name`, `path` and `device`."""

    def infill(self, request: InfillRequest, progress: StageProgressCallback,
               should_stop: Callable[[], bool]) -> BackendResult:
        """Infill one request; poll should_stop() often and raise errors.InfillCancelled when it is true."""


@dataclass(frozen=True)
class InteractionSignal:
    """One thing the musician told us: `accept` / `reject` a candidate, or `repeat` (asked again)."""

    kind: str
    profile: str
    session: str
    request: InfillRequest
    candidate: dict[int, list[Note]]
    time_s: float


class SignalSink(Protocol):
    """The DIL hook. on_signal runs on the socket loop: it must return at once (queue real work).
    A sink with a `store` (the learner's dil.store.ProfileStore) has `profiles` list what each
    profile's saved state has learned."""

    def on_signal(self, signal: InteractionSignal) -> None: ...

    def reset_profile(self, profile: str) -> None: ...


class NoLearning:
    """The signal sink used until a learner is plugged in: signals are only counted by the daemon."""

    def on_signal(self, signal: InteractionSignal) -> None:
        return None

    def reset_profile(self, profile: str) -> None:
        return None


@dataclass
class Job:
    """One infill from arrival to reply."""

    identity: list[bytes]
    request_id: str
    request: InfillRequest
    warnings: tuple[str, ...]
    received_s: float
    deadline_s: float
    stop: threading.Event = field(default_factory=threading.Event)
    started_s: Optional[float] = None
    replied: bool = False


@dataclass
class Session:
    """What a repeat or a feedback needs of an infill: its request with the song cut to what the
    model's window sees (session_song) and the candidates returned."""

    request: InfillRequest
    candidates: list[dict[int, list[Note]]]
    size_bytes: int = 0


def session_song(song: Song, start_qn: float, end_qn: float, target_tracks, window_tokens: int) -> Song:
    """The notes of song a piece of window_tokens tokens around [start_qn, end_qn) can hear, once the
    target tracks' notes in the range are replaced (dil.examples.piece): every token holds at most
    one note event, so on each side of the range (and in it, after its start) only the notes with
    an event among the window_tokens + 1 nearest ones (WINDOW_MARGIN_QN more) can reach the window.
    The target tracks' notes starting in the range are left out: a signal replaces them."""
    targets = set(target_tracks)
    before, inside, after = [], [], []
    for index, track in enumerate(song.tracks):
        for note in track.notes:
            end = note.start_qn + note.duration_qn
            if note.start_qn < start_qn:
                before += [note.start_qn, min(end, start_qn)]
            elif note.start_qn >= end_qn:
                after += [note.start_qn, end]
            elif index not in targets:
                inside += [note.start_qn, min(end, end_qn)]
    n_events = window_tokens + 1
    earliest_qn = sorted(before)[-n_events] - WINDOW_MARGIN_QN if len(before) > n_events else -math.inf
    inside_qn = sorted(inside)[n_events - 1] + WINDOW_MARGIN_QN if len(inside) > n_events else math.inf
    latest_qn = sorted(after)[n_events - 1] + WINDOW_MARGIN_QN if len(after) > n_events else math.inf

    def heard(index: int, note: Note) -> bool:
        if note.start_qn < start_qn:
            return min(note.start_qn + note.duration_qn, start_qn) >= earliest_qn
        if note.start_qn >= end_qn:
            return note.start_qn <= latest_qn
        return index not in targets and note.start_qn <= inside_qn
    return replace(song, tracks=[replace(track, notes=[n for n in track.notes if heard(index, n)])
                                 for index, track in enumerate(song.tracks)])


class Worker(threading.Thread):
    """Runs the backend on one job at a time; hands results to the loop through an outbox."""

    def __init__(self, backend: InfillBackend, context: zmq.Context, wake_endpoint: str):
        super().__init__(name="cmi-infill-worker", daemon=True)
        self.backend = backend
        self.context = context
        self.wake_endpoint = wake_endpoint
        self.inbox: queue.Queue = queue.Queue(maxsize=1)
        self.outbox: queue.Queue = queue.Queue()
        self._wake: Optional[zmq.Socket] = None

    def run(self) -> None:
        self._wake = self.context.socket(zmq.PUSH)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.connect(self.wake_endpoint)
        try:
            while True:
                job = self.inbox.get()
                if job is None:
                    return
                self._post(("done", job, self._run_job(job)))
        finally:
            self._wake.close()

    def _run_job(self, job: Job) -> Any:
        last_posted_s = [0.0]

        def progress(fraction: float, stage: str) -> None:
            now_s = time.monotonic()
            if now_s - last_posted_s[0] >= PROGRESS_INTERVAL_S:
                last_posted_s[0] = now_s
                self._post(("progress", job, (float(fraction), str(stage))))
        try:
            return self.backend.infill(job.request, progress, job.stop.is_set)
        except InfillCancelled as error:
            return error
        except Exception as error:  # a model fault must not end the daemon: report it as `internal`
            log.exception("infill %s failed", job.request_id)
            return error

    def _post(self, item: tuple) -> None:
        self.outbox.put(item)
        try:
            self._wake.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # the loop has wake-ups pending already and drains the whole outbox on each


class Daemon:
    """The server: binds the sockets, runs the socket loop until shutdown, answers every message."""

    def __init__(self, backend: InfillBackend, settings: Settings, key: Optional[str] = None,
                 sink: Optional[SignalSink] = None, profiles_path: Optional[Path] = None,
                 curve_secret_key: Optional[bytes] = None):
        self.settings = settings
        self.limits: Limits = settings.limits
        self.backend = backend
        self.model_info = dict(backend.describe())
        self.sink: SignalSink = sink or getattr(backend, "signal_sink", None) or NoLearning()
        self.profiles = ProfileBook(profiles_path)
        self.key = key or protocol.new_key()
        self.started_s = time.time()
        self.context = zmq.Context()
        self.curve_public_key: Optional[str] = None
        try:
            self.router, self.publisher = self._bind_sockets(curve_secret_key)
        except CMIError:
            self.context.term()
            raise
        self.wake = self.context.socket(zmq.PULL)
        wake_endpoint = f"inproc://cmi-worker-wake-{id(self)}"
        self.wake.bind(wake_endpoint)
        self.worker = Worker(backend, self.context, wake_endpoint)
        self.waiting: deque[Job] = deque()
        self.running: Optional[Job] = None
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.session_bytes = 0
        """What the remembered sessions hold, by SESSION_NOTE_BYTES and SESSION_FIXED_BYTES."""
        self.counters = {"requests_served": 0, "requests_failed": 0, "messages_rejected": 0}
        self._stop_requested = threading.Event()
        self._stopping_since_s: Optional[float] = None
        self._last_status: Optional[tuple] = None

    # ----- sockets -----

    def _bind_sockets(self, curve_secret_key: Optional[bytes]) -> tuple[zmq.Socket, zmq.Socket]:
        address = self.settings.bind_address
        if not self.settings.loopback and curve_secret_key is None:
            raise CMIError(f"refusing to bind {address}: only loopback addresses (127.0.0.1, ::1) are "
                           "allowed without CurveZMQ; set [curve] secret_key_file in the config file "
                           "to serve other machines")
        router = self.context.socket(zmq.ROUTER)
        publisher = self.context.socket(zmq.PUB)
        for socket in (router, publisher):
            socket.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
            if ":" in address:
                socket.setsockopt(zmq.IPV6, 1)
            if curve_secret_key is not None:
                socket.curve_secretkey = curve_secret_key
                socket.curve_server = True
        if curve_secret_key is not None:
            self.curve_public_key = zmq.curve_public(curve_secret_key).decode("ascii")
        router.setsockopt(zmq.MAXMSGSIZE, OVERSIZE_DROP_FACTOR * self.limits.max_message_bytes)
        port = self.settings.port
        host = f"[{address}]" if ":" in address else address
        try:
            _bind(router, host, port)
            _bind(publisher, host, port + 1 if port else 0)
        except CMIError:
            router.close(0)
            publisher.close(0)
            raise
        return router, publisher

    @property
    def request_endpoint(self) -> str:
        return self.router.getsockopt(zmq.LAST_ENDPOINT).decode("ascii")

    @property
    def event_endpoint(self) -> str:
        return self.publisher.getsockopt(zmq.LAST_ENDPOINT).decode("ascii")

    def connection_info(self) -> dict:
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "daemon_version": __version__,
            "pid": os.getpid(),
            "request_endpoint": self.request_endpoint,
            "event_endpoint": self.event_endpoint,
            "key": self.key,
            "signature_scheme": protocol.SIGNATURE_SCHEME,
            "curve_server_key": self.curve_public_key,
            "started_at": self.started_s,
        }

    # ----- the loop -----

    def request_stop(self) -> None:
        """Ask the loop to shut down gracefully; safe from signal handlers and other threads."""
        self._stop_requested.set()

    def serve(self) -> None:
        """Run until shutdown; then close the sockets. Every message gets its reply first."""
        self.worker.start()
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.wake, zmq.POLLIN)
        log.info("serving on %s (events on %s)", self.request_endpoint, self.event_endpoint)
        try:
            while not self._finished():
                ready = dict(poller.poll(POLL_INTERVAL_MS))
                if self.wake in ready:
                    self._drain_worker()
                if self.router in ready:
                    self._read_requests()
                self._expire_deadlines()
                if self._stop_requested.is_set() and self._stopping_since_s is None:
                    self._begin_stop()
                self._dispatch()
                self._publish_status()
        finally:
            self._close()

    def _finished(self) -> bool:
        if self._stopping_since_s is None:
            return False
        if self.running is None:
            return True
        waited_s = time.monotonic() - self._stopping_since_s
        grace_s = self.settings.shutdown_grace_ms / 1000.0
        if waited_s > grace_s and not self.running.stop.is_set():
            log.info("cancelling the running infill %s to shut down", self.running.request_id)
            self.running.stop.set()
        if waited_s > grace_s + WORKER_EXIT_WAIT_S:
            self._fail(self.running, ProtocolError("cancelled", "the daemon shut down"))
            return True
        return False

    def _begin_stop(self) -> None:
        log.info("shutting down")
        self._stopping_since_s = time.monotonic()
        while self.waiting:
            self._fail(self.waiting.popleft(), ProtocolError("cancelled", "the daemon is shutting down"))

    def _close(self) -> None:
        self.worker.inbox.put(None)
        self.worker.join(timeout=WORKER_EXIT_WAIT_S)
        close_sink = getattr(self.sink, "close", None)
        if close_sink is not None:
            close_sink()
        self.router.close(CLOSE_LINGER_MS)
        self.publisher.close(0)
        self.wake.close(0)
        self.context.term()

    def _read_requests(self) -> None:
        for _ in range(MAX_MESSAGES_PER_TURN):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handle(frames)

    def _handle(self, frames: list[bytes]) -> None:
        identity, payload = _split_routing(frames)
        envelope = body = None
        warnings: list[str] = []
        try:
            body = self._checked_body(payload)
            envelope = schema.parse_envelope(body)
            warnings.extend(envelope.warnings)
            content = self._answer(identity, envelope, warnings)
        except ProtocolError as caught:
            error = caught
        except Exception:  # never let one message end the daemon
            log.exception("fault while answering a message")
            error = ProtocolError("internal", "the daemon failed on this message; see its log")
        else:
            if content is not None:
                self._send(identity, protocol.reply_envelope(envelope.request_id, envelope.message_type,
                                                             content, warnings=tuple(warnings)))
            return
        if error.code in protocol.MALFORMED_CODES:
            self.counters["messages_rejected"] += 1
        if envelope is not None and envelope.message_type == "infill":
            self.counters["requests_failed"] += 1
        request_id = envelope.request_id if envelope else schema.peek_request_id(body)
        message_type = envelope.message_type if envelope else None
        self._send(identity, protocol.reply_envelope(request_id, message_type, error=error, warnings=tuple(warnings)))

    def _checked_body(self, payload: list[bytes]) -> Any:
        if len(payload) != 2:
            raise ProtocolError("bad_message", f"expected 2 frames [signature, body], got {len(payload)}")
        signature, body = payload
        size_bytes = len(signature) + len(body)
        if size_bytes > self.limits.max_message_bytes:
            raise ProtocolError("too_large", f"message of {size_bytes} bytes; the limit is "
                                f"{self.limits.max_message_bytes}")
        if not protocol.signature_matches(self.key, body, signature):
            raise ProtocolError("bad_signature", "signature does not match the body: sign with "
                                "HMAC-SHA256 and the key from the connection file")
        return protocol.unpack(body)

    def _answer(self, identity: list[bytes], envelope: schema.Envelope, warnings: list[str]) -> Optional[dict]:
        """The reply content, or None when the reply comes later (queued infill)."""
        if self._stopping_since_s is not None and envelope.message_type not in ("status", "hello"):
            raise ProtocolError("shutting_down", "the daemon is shutting down")
        handler = getattr(self, f"_on_{envelope.message_type}")
        return handler(identity, envelope, warnings)

    # ----- message handlers -----

    def _on_hello(self, identity, envelope, warnings) -> dict:
        client = schema.parse_empty(envelope.content, warnings, ("client",))["client"]
        if client:
            log.info("hello from %s", client)
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "daemon_version": __version__,
            "model": self.model_info,
            "device": str(self.model_info.get("device", "cpu")),
            "capabilities": list(protocol.MESSAGE_TYPES),
            "limits": {**self.limits.as_dict(), **schema.fixed_limits(), "queue_size": self.settings.queue_size,
                       "request_timeout_ms": self.settings.request_timeout_ms,
                       "context_bars": SEND_BARS},
        }

    def _on_status(self, identity, envelope, warnings) -> dict:
        schema.parse_empty(envelope.content, warnings)
        return self.status()

    def status(self) -> dict:
        return {
            "state": self._state(),
            "pid": os.getpid(),
            "protocol": protocol.PROTOCOL_VERSION,
            "daemon_version": __version__,
            "model": self.model_info,
            "device": str(self.model_info.get("device", "cpu")),
            "uptime_s": round(time.time() - self.started_s, 3),
            "queue_length": len(self.waiting),
            "queue_capacity": self.settings.queue_size,
            "running": self.running.request_id if self.running else None,
            **self.counters,
            "sessions": len(self.sessions),
            "session_bytes": self.session_bytes,
            "profiles": self.profile_listing(),
            "rss_bytes": resident_memory_bytes(),
        }

    def profile_listing(self) -> list[dict]:
        """The profiles' signal counts, each with what its saved DIL state holds (`learned`: signals
        and steps, saved in one write with the weights; None without a learner or a saved state)."""
        learned = getattr(getattr(self.sink, "store", None), "learned", lambda profile: None)
        return [{**entry, "learned": learned(entry["name"])} for entry in self.profiles.listing()]

    def _state(self) -> str:
        if self._stopping_since_s is not None:
            return "stopping"
        return "busy" if self.running else "idle"

    def _on_shutdown(self, identity, envelope, warnings) -> dict:
        schema.parse_empty(envelope.content, warnings)
        self._begin_stop()  # before the reply goes out: every request after it is refused
        return {"stopping": True}

    def _on_profiles(self, identity, envelope, warnings) -> dict:
        action, name = schema.parse_profiles(envelope.content, warnings)
        if action == "reset":
            if not self.profiles.reset(name):
                raise ProtocolError("not_found", f"no profile named {name!r}", "content.name")
            self._notify_sink(lambda: self.sink.reset_profile(name))
        return {"profiles": self.profile_listing(), "reset": name if action == "reset" else None}

    def _on_feedback(self, identity, envelope, warnings) -> dict:
        session_id, verdict, candidate = schema.parse_feedback(envelope.content, warnings)
        session = self.sessions.get(session_id)
        if session is None:
            raise ProtocolError("not_found", f"no infill reply on record for session {session_id[:80]!r}",
                                "content.session")
        if candidate >= len(session.candidates):
            raise ProtocolError("invalid_field", f"content.candidate {candidate} does not exist: the last "
                                f"reply had {len(session.candidates)}", "content.candidate")
        self._signal(verdict, session_id, session, candidate)
        return {"session": session_id, "verdict": verdict, "profile": session.request.options.profile}

    def _on_cancel(self, identity, envelope, warnings) -> dict:
        request_id = schema.parse_cancel(envelope.content, warnings)
        for job in self.waiting:
            if job.request_id == request_id and job.identity == identity:
                self.waiting.remove(job)
                self._fail(job, ProtocolError("cancelled", "cancelled by the client"))
                return {"request": request_id, "state": "queued"}
        job = self.running
        if job is not None and job.request_id == request_id and job.identity == identity and not job.replied:
            job.stop.set()
            self._fail(job, ProtocolError("cancelled", "cancelled by the client"))
            return {"request": request_id, "state": "running"}
        raise ProtocolError("not_found", f"no infill {request_id!r} of yours is queued or running",
                            "content.request")

    def _on_infill(self, identity, envelope, warnings) -> Optional[dict]:
        request = schema.parse_infill(envelope.content, self.limits, warnings)
        if self._in_flight(identity, envelope.request_id):
            raise ProtocolError("invalid_field", f"request id {envelope.request_id!r} is already in flight",
                                "message.id")
        if len(self.waiting) >= self.settings.queue_size:
            raise ProtocolError("busy", f"the infill queue is full ({self.settings.queue_size} waiting); "
                                "retry in a moment")
        self._note_repeat(request)
        now_s = time.monotonic()
        timeout_ms = request.timeout_ms or self.settings.request_timeout_ms
        job = Job(identity, envelope.request_id, request, tuple(warnings), now_s, now_s + timeout_ms / 1000.0)
        self.waiting.append(job)
        self._progress(job, 0.0, "queued")
        self._dispatch()
        return None

    def _in_flight(self, identity: list[bytes], request_id: str) -> bool:
        jobs = list(self.waiting) + ([self.running] if self.running and not self.running.replied else [])
        return any(job.identity == identity and job.request_id == request_id for job in jobs)

    # ----- infill lifecycle -----

    def _dispatch(self) -> None:
        if self.running is not None or not self.waiting or self._stopping_since_s is not None:
            return
        job = self.waiting.popleft()
        job.started_s = time.monotonic()
        self.running = job
        self.worker.inbox.put(job)
        self._progress(job, 0.0, "running")

    def _drain_worker(self) -> None:
        while True:
            try:
                self.wake.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        while True:
            try:
                kind, job, value = self.worker.outbox.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                if not job.replied:
                    self._progress(job, *value)
            else:
                self._finish(job, value)

    def _finish(self, job: Job, outcome: Any) -> None:
        if self.running is job:
            self.running = None
        if job.replied:
            log.info("dropping the late result of %s (already answered)", job.request_id)
            return
        if isinstance(outcome, InfillCancelled):
            self._fail(job, ProtocolError("cancelled", "the infill was cancelled"))
        elif isinstance(outcome, CMIError):
            self._fail(job, ProtocolError("invalid_field", str(outcome), "content"))
        elif isinstance(outcome, Exception):
            self._fail(job, ProtocolError("internal", f"the engine failed ({type(outcome).__name__}); "
                                          "see the daemon's log"))
        else:
            self._succeed(job, outcome)

    def _succeed(self, job: Job, result: BackendResult) -> None:
        request = job.request
        now_s = time.monotonic()
        candidates = [_clipped_candidate(c, request) for c in result.candidates]
        timings_ms = {str(k): float(v) for k, v in result.timings_ms.items()}
        timings_ms.update(queue=round(1000 * (job.started_s - job.received_s), 3),
                          infill=timings_ms.get("infill", round(1000 * (now_s - job.started_s), 3)),
                          total=round(1000 * (now_s - job.received_s), 3))
        reported = len(result.seeds) == len(candidates)
        seeds = [int(seed) for seed in result.seeds] if reported else [None] * len(candidates)
        content = {
            "session": request.session,
            "range": [request.start_qn, request.end_qn],
            "seed": seeds[0] if seeds else None,
            "candidates": [{"seed": seed, **_candidate_content(c, request.target_tracks)}
                           for c, seed in zip(candidates, seeds)],
            "timings_ms": timings_ms,
            "model": str(self.model_info.get("name", "")),
            "repeat": result.repeat,
        }
        self._remember(request, candidates)
        job.replied = True
        self.counters["requests_served"] += 1
        self._progress(job, 1.0, "done")
        self._send(job.identity, protocol.reply_envelope(job.request_id, "infill", content,
                                                         warnings=job.warnings))

    def _fail(self, job: Job, error: ProtocolError) -> None:
        if job.replied:
            return
        job.replied = True
        self.counters["requests_failed"] += 1
        self._progress(job, 1.0, error.code)
        self._send(job.identity, protocol.reply_envelope(job.request_id, "infill", error=error,
                                                         warnings=job.warnings))

    def _expire_deadlines(self) -> None:
        now_s = time.monotonic()
        expired = [job for job in self.waiting if job.deadline_s <= now_s]
        for job in expired:
            self.waiting.remove(job)
            self._fail(job, ProtocolError("timeout", "the infill waited in the queue past its timeout"))
        job = self.running
        if job is not None and not job.replied and job.deadline_s <= now_s:
            job.stop.set()
            self._fail(job, ProtocolError("timeout", "the infill did not finish within its timeout"))

    # ----- sessions and signals -----

    def _remember(self, request: InfillRequest, candidates: list) -> None:
        """Keep what a repeat or a feedback of the session needs; the oldest sessions are forgotten
        beyond SESSION_MEMORY of them or Settings.session_memory_mib in all."""
        window_tokens = self.model_info.get("context_tokens")
        if isinstance(window_tokens, int) and window_tokens > 0:
            request = replace(request, song=session_song(request.song, request.start_qn, request.end_qn,
                                                          request.target_tracks, window_tokens))
        n_notes = (sum(len(track.notes) for track in request.song.tracks)
                   + sum(len(notes) for candidate in candidates for notes in candidate.values()))
        self._forget_session(request.session)
        self.sessions[request.session] = Session(request, candidates,
                                                 SESSION_FIXED_BYTES + n_notes * SESSION_NOTE_BYTES)
        self.session_bytes += self.sessions[request.session].size_bytes
        budget_bytes = self.settings.session_memory_mib * 1024 * 1024
        while len(self.sessions) > SESSION_MEMORY or (self.session_bytes > budget_bytes and len(self.sessions) > 1):
            self._forget_session(next(iter(self.sessions)))

    def _forget_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.session_bytes -= session.size_bytes

    def _note_repeat(self, request: InfillRequest) -> None:
        session = self.sessions.get(request.session)
        if session is not None and session.candidates:
            self._signal("repeat", request.session, session, 0)

    def _signal(self, kind: str, session_id: str, session: Session, candidate: int) -> None:
        profile = session.request.options.profile
        now_s = time.time()
        self.profiles.record(profile, kind, now_s)
        signal = InteractionSignal(kind, profile, session_id, session.request, session.candidates[candidate], now_s)
        self._notify_sink(lambda: self.sink.on_signal(signal))
        self._publish(f"dil.{profile}", "dil", {"profile": profile, "signal": kind, "session": session_id})

    def _notify_sink(self, call: Callable[[], None]) -> None:
        try:
            call()
        except Exception:  # a learner fault must not cost the musician a reply
            log.exception("the signal sink failed")

    # ----- output -----

    def _send(self, identity: list[bytes], envelope: dict) -> None:
        try:
            self.router.send_multipart(identity + protocol.signed_frames(self.key, envelope), zmq.NOBLOCK)
        except zmq.ZMQError as error:
            log.warning("could not send a reply (%s); the client may have gone", error)

    def _publish(self, topic: str, message_type: str, content: dict) -> None:
        frames = protocol.signed_frames(self.key, protocol.event_envelope(message_type, content))
        try:
            self.publisher.send_multipart([topic.encode("utf-8")] + frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _progress(self, job: Job, fraction: float, stage: str) -> None:
        self._publish(f"progress.{job.request_id}", "progress",
                      {"request": job.request_id, "session": job.request.session,
                       "stage": stage, "fraction": min(1.0, max(0.0, fraction))})

    def _publish_status(self) -> None:
        current = (self._state(), len(self.waiting), self.running.request_id if self.running else None)
        if current != self._last_status:
            self._last_status = current
            self._publish("status", "status", {"state": current[0], "queue_length": current[1],
                                               "running": current[2]})


def _bind(socket: zmq.Socket, host: str, port: int) -> None:
    try:
        socket.bind(f"tcp://{host}:{port or '*'}")
    except zmq.ZMQError as error:
        if error.errno == zmq.EADDRINUSE:
            raise CMIError(f"port {port} on {host} is already in use (another program, or another CMI "
                           "daemon under a different user?); choose another with --port or [daemon] port "
                           "in the config file") from None
        raise CMIError(f"cannot listen on {host}:{port}: {error}") from None


def _split_routing(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(routing frames to echo, payload): the ROUTER identity, plus REQ's empty delimiter if present."""
    if len(frames) > 1 and frames[1] == b"":
        return frames[:2], frames[2:]
    return frames[:1], frames[1:]


def _clipped_candidate(candidate: dict[int, list[Note]], request: InfillRequest) -> dict[int, list[Note]]:
    """Enforce the reply contract: every note starts inside the range, ends by its end, is finite."""
    start_qn, end_qn = request.start_qn, request.end_qn
    clipped = {}
    for track in request.target_tracks:
        notes = []
        for note in candidate.get(track, []):
            if math.isfinite(note.start_qn) and start_qn <= note.start_qn < end_qn and 0 <= note.pitch <= 127:
                duration_qn = min(note.duration_qn, end_qn - note.start_qn)
                if duration_qn > 0:
                    notes.append(Note(float(note.start_qn), float(duration_qn), int(note.pitch),
                                      int(min(127, max(1, note.velocity)))))
        clipped[track] = notes
    return clipped


def _candidate_content(candidate: dict[int, list[Note]], targets: tuple[int, ...]) -> dict:
    return {"tracks": [{"track": track, "notes": [list(note) for note in candidate[track]]} for track in targets]}


def resident_memory_bytes() -> Optional[int]:
    """Current resident set size of this process (psutil); None where the platform will not tell."""
    try:
        return int(psutil.Process().memory_info().rss)
    except psutil.Error:
        return None
