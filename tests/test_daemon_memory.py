"""Memory bounded in bytes: what a remembered session keeps of a request is what DIL's piece of it can
see (the same piece, on real songs), within a byte budget; and a load test (`--run-slow`): a daemon
with the default model, a long fuzz run and the session memory filled with the largest requests,
its resident memory under the documented budget."""

from __future__ import annotations

import random

import pytest

from cmi_daemon.bundle import load_bundle
from cmi_daemon.dil.examples import piece, song_with_content
from cmi_daemon.server import SESSION_FIXED_BYTES, SESSION_NOTE_BYTES, session_song
from cmi_daemon.service import DEFAULT_MODEL_DIR
from cmi_daemon.tokens import Note, read_midi
from conftest import ALL_FIXTURES
from daemon_support import StandInBackend, infill_request, threaded_daemon
from cmi_daemon.client import DaemonClient

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
        expected = piece(tokenizer.model_song(song_with_content(song, start_qn, end_qn, content)),
                         start_qn, end_qn, targets, window_tokens)
        got = piece(tokenizer.model_song(song_with_content(kept, start_qn, end_qn, content)),
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
