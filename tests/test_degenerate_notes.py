"""The one rule for degenerate notes (`notes.normalize_notes`) on real MIDI: the MIDI reader, the
daemon's request validation and the Python client apply it, so a song with doubled note-ons or
zero-length drum hits infills to the same notes offline and through a real daemon over ZeroMQ."""

from __future__ import annotations

import dataclasses
import io

import mido
import pytest

from cmi_daemon.client import DaemonClient, infill_content
from cmi_daemon.daemon import schema
from cmi_daemon.daemon.engine_backend import EngineBackend
from cmi_daemon.daemon.protocol import Limits
from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.music.notes import Note, normalize_notes
from cmi_daemon.music.tokens import read_midi
from conftest import FIXTURES, shared_data
from daemon_support import threaded_daemon
from tiny_bundle import tiny_bundle_dir

DRUM_HITS = FIXTURES / "groove" / "111_rock-prog_110_beat_5-4.mid"
"""Its drummer's hits are written with the note-off at the note-on's tick: zero-length notes."""
SONG = FIXTURES / "pop909" / "235" / "235.mid"
RESTRUCK_QN = (48.0, 64.0)
SEED = 11


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return tiny_bundle_dir(tmp_path_factory)


def restruck(path, start_qn: float, end_qn: float) -> tuple[bytes, int]:
    """The file with the note-on of every note starting in [start_qn, end_qn) sent twice at its tick, as
    POP909 files do (2,374 times in its train split); and how many were doubled."""
    midi = mido.MidiFile(path)
    doubled = 0
    for track in midi.tracks:
        tick, messages = 0, []
        for message in track:
            tick += message.time
            messages.append(message)
            if message.type == "note_on" and message.velocity > 0 and \
                    start_qn <= tick / midi.ticks_per_beat < end_qn:
                messages.append(message.copy(time=0))
                doubled += 1
        track[:] = messages
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue(), doubled


def note_ons(path) -> int:
    midi = mido.MidiFile(path)
    return sum(1 for track in midi.tracks for m in track if m.type == "note_on" and m.velocity > 0)


def test_doubled_note_ons_are_one_note_the_longer_and_louder():
    song = read_midi(SONG)
    for track in song.tracks:
        doubles = [Note(n.start_qn, n.duration_qn / 2, n.pitch, min(127, n.velocity + 10))
                   for n in track.notes[::7]]
        notes, merged = normalize_notes(doubles + track.notes)
        assert merged == len(doubles)
        louder = {(n.start_qn, n.pitch): n.velocity for n in doubles}
        assert notes == sorted(n._replace(velocity=louder.get((n.start_qn, n.pitch), n.velocity))
                               for n in track.notes)
    with pytest.raises(ValueError, match="negative length"):
        normalize_notes([Note(4.0, -0.5, 60, 90)])


def test_the_reader_reads_a_doubled_note_on_as_one_note():
    data, doubled = restruck(SONG, *RESTRUCK_QN)
    original, song = read_midi(SONG), read_midi(data)
    assert doubled > 20
    assert [t.notes for t in song.tracks] == [t.notes for t in original.tracks]
    assert song.drops["doubled (same track, pitch and start)"] == doubled


def test_zero_length_drum_hits_are_kept():
    song = read_midi(DRUM_HITS)
    notes = [n for t in song.tracks for n in t.notes]
    assert len(notes) == note_ons(DRUM_HITS), "every hit is a note"
    assert sum(n.duration_qn == 0 for n in notes) == 106


def test_the_daemon_and_the_client_apply_the_rule():
    song = read_midi(SONG)
    content = infill_content(song, 56.0, 64.0, [0], "take:56-64")
    raw = [list(note) for note in song.tracks[2].notes]
    content["tracks"][2]["notes"] = raw[::-1] + [[s, 0.0, p, v] for s, _, p, v in raw[::5]]
    request = schema.parse_infill(content, Limits(), [])
    assert [t.notes for t in request.song.tracks] == [t.notes for t in song.tracks]

    doubled = dataclasses.replace(song, tracks=[dataclasses.replace(
        t, notes=t.notes + [n._replace(duration_qn=0.0) for n in t.notes]) for t in song.tracks])
    sent = infill_content(doubled, 56.0, 64.0, [0], "take:56-64")
    assert [t["notes"] for t in sent["tracks"]] == [[list(n) for n in t.notes] for t in song.tracks]


def _offline_and_daemon(bundle, song, start_qn, end_qn, targets):
    offline = Engine(bundle).infill(song, start_qn, end_qn, targets, InfillOptions(n_candidates=2, seed=SEED))
    content = infill_content(song, start_qn, end_qn, targets, "take:degenerate",
                             {"candidates": 2, "seed": SEED})
    with threaded_daemon(EngineBackend(bundle, "cpu")) as daemon, \
            DaemonClient(connection=daemon.connection_info(), timeout_ms=60_000) as client:
        reply = client.infill(content)
    through_daemon = [{entry["track"]: [Note(*note) for note in entry["notes"]] for entry in candidate["tracks"]}
                      for candidate in reply["candidates"]]
    assert through_daemon == [candidate.notes for candidate in offline.candidates]
    assert any(candidate.notes[targets[0]] for candidate in offline.candidates), "the test infills notes"


def test_zero_length_drum_hits_infill_alike_offline_and_through_the_daemon(tiny_bundle):
    song = read_midi(DRUM_HITS)
    assert any(n.duration_qn == 0 and n.start_qn < 20.0 for n in song.tracks[0].notes)
    _offline_and_daemon(tiny_bundle, song, 10.0, 20.0, [0])


def test_doubled_note_ons_infill_alike_offline_and_through_the_daemon(tiny_bundle):
    data, _ = restruck(SONG, *RESTRUCK_QN)
    _offline_and_daemon(tiny_bundle, read_midi(data), 56.0, 64.0, [0])


def test_a_pop909_song_with_doubled_note_ons_infills_alike_offline_and_through_the_daemon(tiny_bundle):
    path = shared_data("pop909/dev") / "035" / "035.mid"
    song = read_midi(path)
    assert song.drops["doubled (same track, pitch and start)"] > 0
    _offline_and_daemon(tiny_bundle, song, 112.0, 120.0, [1])
