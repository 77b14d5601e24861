"""Memory bounded in bytes: what a remembered session keeps of a request is what DIL's piece of it can
see (the same piece, on real songs), within a byte budget; and a load test (`--run-load`): a daemon
with the default model, an infill of a real song with a full window of context, a long fuzz run and
the session memory filled with the largest requests, its resident memory under the documented budget."""

from __future__ import annotations

import random
import threading

import pytest

from cmi_daemon.daemon.server import SESSION_FIXED_BYTES, SESSION_NOTE_BYTES, session_song
from cmi_daemon.dil.examples import piece
from cmi_daemon.inference.bundle import load_bundle
from cmi_daemon.music.regions import region_in_window, replace_notes_in_range
from cmi_daemon.music.tokens import Note, read_midi
from cmi_daemon.paths import DEFAULT_MODEL_DIR
from conftest import ALL_FIXTURES, POP909_FIXTURES
from daemon_support import StandInBackend, infill_request, threaded_daemon
from cmi_daemon.client import DaemonClient, infill_content

RANGES_PER_SONG = 6


def _content(song, start_qn, end_qn, targets, seed):
    """A candidate for the range: the targets' notes there moved a semitone and a 16th, plus one more."""
    rng = random.Random(seed)
    content = {}
    for track in targets:
        notes = [Note(min(n.start_qn + 0.25, end_qn - 0.01), n.duration_qn, min(127, n.pitch + 1), n.velocity)
                 for n in song.tracks[track].notes if start_qn <= n.start_qn < end_qn]
        content[track] = notes + [Note(rng.uniform(start_qn, end_qn - 0.01), 0.5, rng.randrange(40, 90), 80)]
    return content


@pytest.mark.parametrize("window_tokens", [64, 256, load_bundle(DEFAULT_MODEL_DIR).tokenizer.context_tokens])
@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.name)
def test_the_piece_of_a_session_song_is_the_piece_of_the_request(path, window_tokens):
    """DIL learns from the session's song with a candidate in the range: cut to the window, it must
    give exactly the piece the whole song gives, for one target track and for all."""
    tokenizer = load_bundle(DEFAULT_MODEL_DIR).tokenizer
    song = read_midi(path)
    rng = random.Random(window_tokens)
    n_bars = int(song.meter.bar_at_qn(song.end_qn))
    trimmed_notes = []
    for index in range(RANGES_PER_SONG):
        first = rng.randrange(1, n_bars - 4)
        start_qn, end_qn = song.meter.bar_range_qn(first, first + rng.choice([0, 1, 3]))
        targets = (0,) if index % 2 else tuple(range(len(song.tracks)))
        content = _content(song, start_qn, end_qn, targets, index)
        kept = session_song(song, start_qn, end_qn, targets, window_tokens)
        expected = piece(tokenizer.model_song(replace_notes_in_range(song, start_qn, end_qn, content)),
                         start_qn, end_qn, targets, window_tokens)
        got = piece(tokenizer.model_song(replace_notes_in_range(kept, start_qn, end_qn, content)),
                    start_qn, end_qn, targets, window_tokens)
        assert got == expected, f"{path.name} [{start_qn:g}, {end_qn:g}) targets {targets}"
        trimmed_notes.append(sum(len(t.notes) for t in kept.tracks) / sum(len(t.notes) for t in song.tracks))
    if window_tokens <= 256:
        assert min(trimmed_notes) < 0.5, "a small window keeps a small part of a whole song"


def test_sessions_are_forgotten_oldest_first_beyond_the_byte_budget():
    notes_per_request = 3000
    per_session = SESSION_FIXED_BYTES + (notes_per_request + 2) * SESSION_NOTE_BYTES  # + one note per candidate
    backend = StandInBackend()
    with threaded_daemon(backend, session_memory_mib=1) as daemon:
        with DaemonClient(connection=daemon.connection_info(), timeout_ms=20_000) as client:
            request = infill_request(session="s0", start_qn=0.0, end_qn=256.0)
            request["tracks"][1]["notes"] = [[qn / 16, 0.05, 40 + qn % 30, 80] for qn in range(notes_per_request)]
            for index in range(6):
                client.infill({**request, "session": f"s{index}"})
            status = client.status()
            assert status["session_bytes"] <= 1024 * 1024
            assert status["sessions"] == (1024 * 1024) // per_session
            with pytest.raises(Exception, match="no infill reply on record"):
                client.feedback("s0", "accept")
            assert client.feedback("s5", "accept")["verdict"] == "accept"


DAEMON_MEMORY_BUDGET_MIB = 500
"""The target for the daemon's resident memory with the default model (docs/protocol.md 5.5)."""
FUZZ_MESSAGES = 5000
LARGEST_NOTES = 100_000
LARGEST_REQUESTS = 4
"""Sessions of the largest requests (12.8 MB each as counted) overflow the 32 MiB session budget."""
FULL_WINDOW_SONG = "235.mid"
FULL_WINDOW_BAR = 20
"""One bar of a dense real song: its context fills the model's window, the engine's largest working
set (the context encoder's and predictor's attention grows with the square of their input)."""
FULL_WINDOW_FRACTION = 0.95


def _full_window_request() -> dict:
    """An infill of one bar of a real song whose context fills at least FULL_WINDOW_FRACTION of the window."""
    song = read_midi(next(path for path in POP909_FIXTURES if path.name == FULL_WINDOW_SONG))
    start_qn, end_qn = song.meter.bar_range_qn(FULL_WINDOW_BAR, FULL_WINDOW_BAR)
    tokenizer = load_bundle(DEFAULT_MODEL_DIR).tokenizer
    region = region_in_window(tokenizer.model_song(song), start_qn, end_qn, [0], tokenizer.context_tokens)
    assert len(region.prefix_ids) + len(region.suffix_ids) >= FULL_WINDOW_FRACTION * tokenizer.context_tokens
    return {**infill_content(song, start_qn, end_qn, [0], "full-window", {"seed": 1}), "timeout_ms": 600_000}


def _largest_request(index: int) -> dict:
    """A request at the limits whose session keeps all of it: 100,000 notes (distinct onsets and
    pitches) in the last QN before the range, so all lie within WINDOW_MARGIN_QN of the window's edge."""
    rng = random.Random(index)
    request = infill_request(session=f"largest-{index}", start_qn=64.0, end_qn=68.0)
    request["tracks"] = [{"name": name, "program": program,
                          "notes": [[63.0 + k / LARGEST_NOTES, 0.5, rng.randrange(36, 96), 80]
                                    for k in range(offset, LARGEST_NOTES, 2)]}
                         for offset, (name, program) in enumerate((("Keys", 0), ("Bass", 33)))]
    request["timeout_ms"] = 600_000
    return request


@pytest.mark.load
@pytest.mark.slow
def test_default_model_daemon_stays_under_its_memory_budget(tmp_path):
    """Serving only: no session is infilled twice, so the DIL learner never starts torch's training
    (its first signals add about 250 MiB, which this budget does not cover yet)."""
    import msgpack
    import zmq

    from cmi_daemon.daemon import protocol
    from daemon_support import client_for, process_rss_bytes, start_daemon_process

    process = start_daemon_process(tmp_path, DEFAULT_MODEL_DIR)
    # Its console log goes to a pipe: read it, or the daemon blocks once the pipe is full.
    threading.Thread(target=process.stdout.read, daemon=True).start()
    mib = lambda: process_rss_bytes(process.pid) / 2 ** 20  # noqa: E731
    figures = {"start": mib()}
    try:
        with client_for(tmp_path, timeout_ms=600_000) as client:
            client.infill(_full_window_request())
            figures["a full-window infill"] = mib()
            client.infill(infill_request(session="far", start_qn=100_000.0, end_qn=100_004.0))
            figures["far past the end"] = mib()
            rng = random.Random(0)
            socket = zmq.Context.instance().socket(zmq.DEALER)
            socket.connect(client.connection["request_endpoint"])
            key = client.connection["key"]
            for index in range(FUZZ_MESSAGES):
                content = infill_request(session=f"fuzz-{index}")  # no repeats: DIL stays idle (see the docstring)
                choice = index % 4
                if choice == 0:
                    content["tracks"][0]["notes"][rng.randrange(16)][rng.randrange(4)] = rng.choice(
                        [None, -1, 1e300, "x", [], {}, 5e-324])
                elif choice == 1:
                    content["range"] = [rng.uniform(0, 1e6), rng.uniform(0, 1e6)]
                elif choice == 2:
                    content = {"session": "\x00" * rng.randrange(300), "tracks": rng.randrange(10)}
                body = msgpack.packb(protocol.request_envelope(f"f{index}", "infill" if choice < 3 else "hello",
                                                               content if choice < 3 else {"client": "\n" * 64}))
                socket.send_multipart([protocol.sign(key, body) if index % 7 else b"0" * 64, body])
                socket.recv_multipart()
            socket.close(0)
            figures["after the fuzz"] = mib()
            for index in range(LARGEST_REQUESTS):
                client.infill(_largest_request(index))
            status = client.status()
            figures["after the largest requests"] = mib()
    finally:
        process.terminate()
        process.wait(60)
    print("\nRSS MiB: " + ", ".join(f"{name} {value:.0f}" for name, value in figures.items())
          + f"; {status['sessions']} sessions holding {status['session_bytes'] / 2 ** 20:.1f} MiB")
    assert status["session_bytes"] <= 32 * 2 ** 20
    assert max(figures.values()) < DAEMON_MEMORY_BUDGET_MIB, figures
