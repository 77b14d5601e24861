"""Writing new notes into the MIDI file they were made for: on real files, every event but the
replaced notes comes back as it was, and the new notes are where a reader of the file finds them."""

from __future__ import annotations

import io

import mido
import pytest

from cmi_daemon.cli import offline
from cmi_daemon.errors import MidiFileError
from cmi_daemon.music.midi_edit import replaced_midi_bytes
from cmi_daemon.music.tokens import Note, read_midi
from conftest import ALL_FIXTURES, POP909_FIXTURES, shared_data
from midi_events import assert_only_replaced, events

MELODY = 0  # the first track of a POP909 song


def _edit(midi: mido.MidiFile, start_qn: float, end_qn: float, new_notes) -> mido.MidiFile:
    return mido.MidiFile(file=io.BytesIO(replaced_midi_bytes(midi, start_qn, end_qn, new_notes)))


def _ticks(notes, ticks_per_qn):
    return [(round(n.start_qn * ticks_per_qn), round((n.start_qn + n.duration_qn) * ticks_per_qn), n.pitch, n.velocity)
            for n in notes]


def _previous_bars_moved_in(song, index, start_qn, end_qn):
    """Real notes for the range: the track's notes of the span before it, moved forward one span."""
    span = end_qn - start_qn
    return [n._replace(start_qn=n.start_qn + span) for n in song.tracks[index].notes
            if start_qn - span <= n.start_qn < start_qn]


def _check_replacing_every_track(path, first_bar, last_bar):
    midi = mido.MidiFile(path)
    song = read_midi(path)
    start_qn, end_qn = song.meter.bar_range_qn(first_bar, last_bar)
    new_notes = {i: _previous_bars_moved_in(song, i, start_qn, end_qn) for i in range(len(song.tracks))}
    edited = _edit(midi, start_qn, end_qn, new_notes)

    tpq = midi.ticks_per_beat
    assert start_qn * tpq == round(start_qn * tpq) and end_qn * tpq == round(end_qn * tpq)
    sources = {(t.midi_track, t.channel): _ticks(new_notes[i], tpq) for i, t in enumerate(song.tracks)}
    assert len(sources) == len(song.tracks)  # one program per channel in these files
    assert_only_replaced(midi, edited, round(start_qn * tpq), round(end_qn * tpq), sources)

    infilled = read_midi(edited)
    assert [(t.name, t.program, t.channel) for t in infilled.tracks] == [
        (t.name, t.program, t.channel) for t in song.tracks]
    for track, notes in zip(infilled.tracks, new_notes.values()):
        found = [(round(n.start_qn * tpq), n.pitch, n.velocity) for n in track.notes if start_qn <= n.start_qn < end_qn]
        assert sorted(found) == sorted((on, pitch, velocity) for on, _, pitch, velocity in _ticks(notes, tpq))
    return midi, song


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.name)
def test_only_the_notes_in_the_range_change(path):
    midi, song = _check_replacing_every_track(path, 5, 8)
    for track in song.tracks:  # the mapping of tracks to their source, seen in the file itself
        channels = {m.channel for _, m in events(midi.tracks[track.midi_track]) if m.type == "note_on"}
        assert channels == {track.channel}
        if midi.tracks[track.midi_track].name:
            assert midi.tracks[track.midi_track].name == track.name


@pytest.mark.slow
def test_pop909_songs_keep_their_pedal_key_signatures_and_tempo_track():
    songs = shared_data("pop909/train")
    paths = sorted(songs.glob("*/*.mid"))[:24] + sorted(songs.glob("*/versions/*.mid"))[:8]
    kinds = set()
    for path in paths:
        midi, _ = _check_replacing_every_track(path, 9, 12)
        kinds |= {m.type for track in midi.tracks for _, m in events(track)}
    assert {"control_change", "key_signature", "set_tempo", "pitchwheel", "polytouch"} <= kinds


def test_notes_meeting_at_one_tick_keep_their_lengths():
    """A new note starting where a kept one of its pitch ends, one ending where a kept one starts,
    two new ones meeting, and one of length 0: read back, every note is as written."""
    path = POP909_FIXTURES[0]
    midi, song = mido.MidiFile(path), read_midi(path)
    start_qn, end_qn = song.meter.bar_range_qn(9, 12)
    melody = song.tracks[MELODY].notes
    across = next(n for n in melody if n.start_qn < start_qn < n.start_qn + n.duration_qn)
    after = next(n for n in melody if n.start_qn >= end_qn)
    assert after.start_qn - 1 < end_qn
    new = [Note(across.start_qn + across.duration_qn, 1.0, across.pitch, 70),
           Note(start_qn + 4.0, 1.0, 72, 80), Note(start_qn + 5.0, 0.5, 72, 90),
           Note(start_qn + 6.0, 0.0, 74, 60),
           Note(end_qn - 1.0, after.start_qn - end_qn + 1.0, after.pitch, 100)]
    edited = _edit(midi, start_qn, end_qn, {MELODY: new})
    kept = [n for n in melody if not start_qn <= n.start_qn < end_qn]
    tpq = midi.ticks_per_beat
    assert _ticks(read_midi(edited).tracks[MELODY].notes, tpq) == _ticks(sorted(kept + new), tpq)


def test_the_track_ends_after_its_last_new_note():
    path = POP909_FIXTURES[0]
    midi, song = mido.MidiFile(path), read_midi(path)
    first, last = song.meter.bar_range_qn(9, 9)
    end_qn = song.end_qn + 8.0
    edited = _edit(midi, first, last, {MELODY: [Note(first, end_qn - first, 60, 90)]})
    track = edited.tracks[song.tracks[MELODY].midi_track]
    assert track[-1].type == "end_of_track"
    assert sum(m.time for m in track) == round(end_qn * midi.ticks_per_beat)


def test_new_notes_sound_as_loud_as_asked_under_the_channel_volume():
    """With CC7 volume and CC11 expression set (as many files do at their start), the new notes are
    written louder so that they read back, as the model heard the kept ones, at their velocity."""
    path = POP909_FIXTURES[0]
    midi = mido.MidiFile(path)
    melody = midi.tracks[1]
    assert melody.name == "MELODY"
    melody.insert(1, mido.Message("control_change", channel=0, control=7, value=90, time=0))
    melody.insert(2, mido.Message("control_change", channel=0, control=11, value=100, time=0))
    song = read_midi(midi)
    start_qn, end_qn = song.meter.bar_range_qn(9, 12)
    new = _previous_bars_moved_in(song, MELODY, start_qn, end_qn)
    edited = _edit(midi, start_qn, end_qn, {MELODY: new})

    tpq = midi.ticks_per_beat
    start_tick, end_tick = round(start_qn * tpq), round(end_qn * tpq)
    read_back = [n for n in read_midi(edited).tracks[MELODY].notes if start_qn <= n.start_qn < end_qn]
    assert sorted((on, p, v) for on, _, p, v in _ticks(read_back, tpq)) == sorted(
        (on, p, v) for on, _, p, v in _ticks(new, tpq))
    written = [m.velocity for tick, m in events(edited.tracks[1])
               if m.type == "note_on" and m.velocity and start_tick <= tick < end_tick]
    assert len(written) == len(new) and max(written) > max(n.velocity for n in new)


def test_a_program_change_inside_the_range_is_refused(tmp_path):
    path = POP909_FIXTURES[0]
    midi = mido.MidiFile(path)
    song = read_midi(midi)
    start_qn, end_qn = song.meter.bar_range_qn(9, 12)
    new = {MELODY: _previous_bars_moved_in(song, MELODY, start_qn, end_qn)}
    replaced_midi_bytes(midi, start_qn, end_qn, new)  # the song itself has one program per channel
    melody = midi.tracks[1]
    tick, position = 0, 0
    while tick < (start_qn + 4) * midi.ticks_per_beat:  # a change to strings one bar into the range
        tick += melody[position].time
        position += 1
    melody.insert(position, mido.Message("program_change", channel=0, program=48, time=0))
    with pytest.raises(MidiFileError, match=r"track 1 \(MELODY\) is program 0 on channel 1, which plays program 48"):
        replaced_midi_bytes(midi, start_qn, end_qn, new)
    assert replaced_midi_bytes(midi, start_qn, end_qn, {MELODY: []})  # nothing new: nothing misplaced
    paths = offline.candidate_paths(tmp_path / "out.mid", 2)
    with pytest.raises(MidiFileError):
        offline.write_candidates(midi, "song.mid", start_qn, end_qn, [{MELODY: []}, new], paths)
    assert not list(tmp_path.iterdir())  # the first candidate, which could be made, is not left alone
