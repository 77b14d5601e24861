"""Tokenizer: real MIDI round trips without drift, the reference's musical rules, bad input."""

import io
import random
from collections import Counter

import mido
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmi_daemon.errors import MidiFileError
from cmi_daemon.music import vocab
from cmi_daemon.music.tempo import TempoMap
from cmi_daemon.music.tokens import (
    Note, Song, TimedNote, Track, decode_ids, events_to_ids, midi_bytes, ms_to_step, note_events,
    read_midi, song_from_timed_notes, tokenize, write_midi)
from conftest import ALL_FIXTURES, shared_data

MAX_ONSET_ERROR_MS = vocab.WAIT_STEP_MS / 2


def round_trip_report(song: Song):
    """Tokenize, decode, and line each decoded note up with the note it came from."""
    encoding = tokenize(song)
    first_step = encoding.events[0].step if encoding.events else 0
    decoded = decode_ids(encoding.ids, start_step=first_step)
    # Merged doubles keep the loudest velocity: compare against that.
    loudest = Counter()
    for note in encoding.notes:
        key = (int(ms_to_step(note.start_ms)), note.instrument_bin, note.pitch)
        loudest[key] = max(loudest[key], vocab.velocity_to_bin(note.velocity))
    originals = sorted({(int(ms_to_step(n.start_ms)), n.instrument_bin, n.pitch): n
                        for n in reversed(encoding.notes)}.values(),
                       key=lambda n: (int(ms_to_step(n.start_ms)), n.instrument_bin, n.pitch))
    decoded.sort(key=lambda n: (round(n.start_ms / vocab.WAIT_STEP_MS), n.instrument_bin, n.pitch))
    return encoding, originals, decoded, loudest


def assert_round_trip(song: Song, label: str):
    encoding, originals, decoded, loudest = round_trip_report(song)
    n_doubled = encoding.drops.get("doubled (same bin, pitch and onset step)", 0)
    assert len(decoded) == len(encoding.notes) - n_doubled == len(originals), label
    errors_ms = []
    for original, note in zip(originals, decoded):
        assert (note.pitch, note.instrument_bin) == (original.pitch, original.instrument_bin), label
        key = (int(ms_to_step(original.start_ms)), original.instrument_bin, original.pitch)
        assert vocab.velocity_to_bin(note.velocity) == loudest[key], label
        errors_ms.append(abs(note.start_ms - original.start_ms))
    assert max(errors_ms) <= MAX_ONSET_ERROR_MS + 1e-6, label
    # No drift: the last tenth of the song is as exact as the first.
    tenth = max(1, len(errors_ms) // 10)
    assert max(errors_ms[-tenth:]) <= MAX_ONSET_ERROR_MS + 1e-6, label
    return encoding


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.name)
def test_fixture_round_trip(path):
    song = read_midi(path)
    encoding = assert_round_trip(song, str(path))
    assert len(encoding.notes) > 100
    assert set(encoding.drops) <= {"doubled (same bin, pitch and onset step)"}


@pytest.mark.slow
def test_pop909_dev_round_trip_every_file():
    files = sorted(shared_data("pop909/dev").glob("*/*.mid"))
    assert len(files) == 91
    drops = Counter()
    for path in files:
        drops += assert_round_trip(read_midi(path), str(path)).drops
    print(f"pop909/dev: {len(files)} files, drops {dict(drops)}")


def test_groove_sample_round_trip():
    files = sorted(shared_data("groove").glob("drummer*/*/*.mid"))
    for path in random.Random(0).sample(files, 200):
        assert_round_trip(read_midi(path), str(path))


def test_reference_style_rounding_drifts_where_ours_does_not():
    """Rounding each gap on its own (the reference) moves late onsets far from their source."""
    song = read_midi(ALL_FIXTURES[0])
    encoding = tokenize(song)
    onsets_ms = sorted({n.start_ms for n in encoding.notes})
    clock_ms, worst_reference_ms = onsets_ms[0], 0.0
    for previous, current in zip(onsets_ms, onsets_ms[1:]):
        gap_steps = round((current - previous) / vocab.WAIT_STEP_MS - 1e-9)  # each gap alone
        clock_ms += gap_steps * vocab.WAIT_STEP_MS
        worst_reference_ms = max(worst_reference_ms, abs(clock_ms - current))
    _, originals, decoded, _ = round_trip_report(song)
    ours_ms = max(abs(a.start_ms - b.start_ms) for a, b in zip(originals, decoded))
    assert ours_ms <= MAX_ONSET_ERROR_MS + 1e-6 < worst_reference_ms


def midi_file(*tracks, ticks_per_beat=480, midi_type=1) -> mido.MidiFile:
    """A MidiFile from tracks given as lists of (delta ticks, message) pairs."""
    midi = mido.MidiFile(type=midi_type, ticks_per_beat=ticks_per_beat)
    for events in tracks:
        track = mido.MidiTrack()
        for delta, message in events:
            track.append(message.copy(time=delta))
        midi.tracks.append(track)
    return midi


def on(pitch, velocity=100, channel=0):
    return mido.Message("note_on", note=pitch, velocity=velocity, channel=channel)


def off(pitch, channel=0):
    return mido.Message("note_off", note=pitch, velocity=0, channel=channel)


def cc(control, value, channel=0):
    return mido.Message("control_change", control=control, value=value, channel=channel)


def test_sustain_pedal_holds_released_notes_until_it_lifts():
    song = read_midi(midi_file([(0, cc(64, 127)), (0, on(60)), (480, off(60)), (480, cc(64, 0)),
                                (0, on(62)), (480, off(62))]))
    assert [(n.start_qn, n.duration_qn, n.pitch) for n in song.tracks[0].notes] == [(0.0, 2.0, 60), (2.0, 1.0, 62)]


def test_note_struck_again_under_the_pedal_ends_the_first():
    song = read_midi(midi_file([(0, cc(64, 127)), (0, on(60)), (240, off(60)), (240, on(60)),
                                (240, off(60)), (240, cc(64, 0))]))
    assert [(n.start_qn, n.duration_qn) for n in song.tracks[0].notes] == [(0.0, 1.0), (1.0, 1.0)]


def test_volume_and_expression_scale_velocity_and_silence_drops():
    song = read_midi(midi_file([(0, cc(7, 64)), (0, cc(11, 127)), (0, on(60, 100)), (480, off(60)),
                                (0, cc(7, 0)), (0, on(62, 100)), (480, off(62))]))
    assert [n.velocity for n in song.tracks[0].notes] == [51]  # ceil(100 * 64 / 127)
    assert song.drops["silenced by CC7 volume / CC11 expression"] == 1


def test_channel_ten_is_percussion_with_key_as_pitch():
    song = read_midi(midi_file([(0, mido.Message("program_change", program=30, channel=9)),
                                (0, on(36, channel=9)), (120, off(36, channel=9))]))
    encoding = tokenize(song)
    assert song.tracks[0].is_drum
    assert vocab.ids_to_text(encoding.ids) == "p:24:a t16 p:24:0"


def test_program_change_mid_track_switches_bins():
    song = read_midi(midi_file([(0, mido.Message("program_change", program=0)), (0, on(60)), (480, off(60)),
                                (0, mido.Message("program_change", program=33)), (0, on(40)), (480, off(40))]))
    assert [(t.program, t.instrument_bin, len(t.notes)) for t in song.tracks] == [(0, 8, 1), (33, 4, 1)]
    assert vocab.ids_to_text(tokenize(song).ids) == "pi:3c:a t63 b:28:a pi:3c:0 t62 b:28:0"


def test_unmapped_programs_are_dropped_and_counted():
    song = read_midi(midi_file([(0, mido.Message("program_change", program=100)), (0, on(60)), (480, off(60))]))
    encoding = tokenize(song)
    assert encoding.ids == [] and encoding.drops == {"program 100 has no instrument bin": 1}


def test_simultaneous_events_percussion_first_then_bin_then_pitch():
    song = read_midi(midi_file([(0, mido.Message("program_change", program=33, channel=1)),
                                (0, on(67)), (0, on(40, channel=1)), (0, on(60)), (0, on(42, channel=9)),
                                (480, off(67)), (0, off(40, channel=1)), (0, off(60)), (0, off(42, channel=9))]))
    text = vocab.ids_to_text(tokenize(song).ids)
    assert text == "p:2a:a b:28:a pi:3c:a pi:43:a t63 p:2a:0 b:28:0 pi:3c:0 pi:43:0"


def test_an_off_before_an_on_of_the_same_note_stays_first():
    song = read_midi(midi_file([(0, on(60)), (480, off(60)), (0, on(60)), (480, off(60))]))
    assert vocab.ids_to_text(tokenize(song).ids) == "pi:3c:a t63 pi:3c:0 pi:3c:a t62 pi:3c:0"


def test_type_0_and_type_1_files_give_the_same_tokens():
    tempo = mido.MetaMessage("set_tempo", tempo=400_000)
    type1 = midi_file([(0, tempo)], [(0, on(60)), (480, off(60))],
                      [(0, mido.Message("program_change", program=24, channel=1)), (240, on(50, channel=1)),
                       (480, off(50, channel=1))])
    type0 = midi_file([(0, tempo), (0, mido.Message("program_change", program=24, channel=1)), (0, on(60)),
                       (240, on(50, channel=1)), (240, off(60)), (240, off(50, channel=1))], midi_type=0)
    assert tokenize(read_midi(type0)).ids == tokenize(read_midi(type1)).ids


def test_tempo_map_sets_absolute_time():
    song = read_midi(midi_file([(0, mido.MetaMessage("set_tempo", tempo=500_000)),
                                (960, mido.MetaMessage("set_tempo", tempo=1_000_000))],
                               [(960, on(60)), (960, off(60))]))
    assert vocab.ids_to_text(tokenize(song).ids) == "pi:3c:a t125 t125 pi:3c:0"  # 2 QN at 60 BPM


def test_text_form_round_trips():
    ids = tokenize(read_midi(ALL_FIXTURES[0])).ids
    assert vocab.text_to_ids(vocab.ids_to_text(ids)) == ids


def test_decoding_writes_a_valid_midi_file(tmp_path):
    encoding = tokenize(read_midi(ALL_FIXTURES[0]))
    notes = decode_ids(encoding.ids)
    path = tmp_path / "decoded.mid"
    write_midi(song_from_timed_notes(notes), path)
    reread = tokenize(read_midi(path))
    assert reread.ids == encoding.ids
    assert all(isinstance(n, TimedNote) for n in notes)


def test_decoder_follows_the_reference_on_odd_streams():
    notes = decode_ids(vocab.text_to_ids("pi:3c:0 pi:3c:a t10 pi:3c:5 t5 <end>"))
    # the stray off is ignored, the re-strike ends the first note, the last is closed at the end
    assert [(n.start_ms, n.duration_ms, n.velocity) for n in notes] == [(0.0, 80.0, 111), (80.0, 40.0, 47)]
    with pytest.raises(ValueError, match="<mask>"):
        decode_ids([vocab.MASK_ID])


timed_note_lists = st.lists(
    st.tuples(st.integers(0, 12), st.integers(0, 127), st.floats(16, 3000, allow_subnormal=False),
              st.floats(0, 2000, allow_subnormal=False), st.integers(1, 127)),
    min_size=0, max_size=60)


@settings(max_examples=200, deadline=None)
@given(timed_note_lists, st.floats(0, 100_000, allow_subnormal=False))
def test_random_notes_round_trip(raw_notes, offset_ms):
    """Notes with distinct onsets per key come back with pitch, bin, velocity bin, onset +-4 ms."""
    clock: dict = {}
    notes = []
    for instrument_bin, pitch, gap_ms, duration_ms, velocity in raw_notes:
        start = clock.get((instrument_bin, pitch), offset_ms) + gap_ms
        duration_ms = min(duration_ms, gap_ms)
        clock[(instrument_bin, pitch)] = start + duration_ms
        notes.append(TimedNote(start, duration_ms, pitch, velocity, instrument_bin))
    events, drops = note_events(notes)
    assert not drops
    decoded = decode_ids(events_to_ids(events, clock_step=0))
    assert len(decoded) == len(notes)
    key = lambda n: (n.instrument_bin, n.pitch, n.start_ms)
    for original, note in zip(sorted(notes, key=key), sorted(decoded, key=key)):
        assert (note.instrument_bin, note.pitch) == (original.instrument_bin, original.pitch)
        assert abs(note.start_ms - original.start_ms) <= MAX_ONSET_ERROR_MS + 1e-6
        assert vocab.velocity_to_bin(note.velocity) == vocab.velocity_to_bin(original.velocity)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 400), st.integers(1, 8), st.integers(21, 108)), max_size=40),
       st.lists(st.tuples(st.integers(0, 100), st.floats(30, 240, allow_subnormal=False)), max_size=6))
def test_random_songs_survive_midi_files_and_tempo_maps(raw_notes, tempo_changes):
    tempo_map = TempoMap.from_changes([(qn * 1.0, bpm) for qn, bpm in tempo_changes])
    notes = sorted({(start / 4, pitch): (start / 4, length / 4, pitch) for start, length, pitch in raw_notes}.values())
    song = Song([Track("lead", 80, False, [Note(s, d, p, 90) for s, d, p in notes])], tempo_map)
    reread = read_midi(midi_bytes(song))
    original, tokens_after = tokenize(song), tokenize(reread)
    assert len(tokens_after.notes) == len(original.notes)
    # tempo written as whole microseconds per QN: onsets may move by a hair, never by a step
    for a, b in zip(sorted(original.notes), sorted(tokens_after.notes)):
        assert a.pitch == b.pitch and abs(a.start_ms - b.start_ms) < 0.5


def test_truncated_file_is_reported(tmp_path):
    data = ALL_FIXTURES[0].read_bytes()
    path = tmp_path / "truncated.mid"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(MidiFileError, match="truncated"):
        read_midi(path)


def test_non_midi_file_is_reported(tmp_path):
    path = tmp_path / "notes.mid"
    path.write_text("these are not notes")
    with pytest.raises(MidiFileError, match=r"notes\.mid: not a standard MIDI file"):
        read_midi(path)


def test_corrupt_track_data_is_reported(tmp_path):
    data = bytearray(ALL_FIXTURES[0].read_bytes())
    track_start = data.index(b"MTrk", 20) + 8
    data[track_start: track_start + 40] = bytes([0xF4] * 40)  # undefined status bytes
    path = tmp_path / "corrupt.mid"
    path.write_bytes(bytes(data))
    with pytest.raises(MidiFileError, match="corrupt.mid"):
        read_midi(path)


def test_absurd_tempo_is_reported():
    midi = midi_file([(0, mido.MetaMessage("set_tempo", tempo=1)), (0, on(60)), (480, off(60))])
    with pytest.raises(MidiFileError, match="absurd tempo"):
        read_midi(midi, label="fast.mid")


def test_negative_time_is_reported():
    midi = midi_file([(0, on(60)), (480, off(60))])
    midi.tracks[0][1].time = -5
    with pytest.raises(MidiFileError, match="negative delta time"):
        read_midi(midi, label="negative.mid")


def test_type_2_files_are_refused():
    midi = midi_file([(0, on(60)), (480, off(60))], midi_type=2)
    buffer = io.BytesIO()
    midi.save(file=buffer)
    with pytest.raises(MidiFileError, match="type 2"):
        read_midi(buffer.getvalue())
