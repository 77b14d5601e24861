"""Regions: prefix / blank / suffix on real POP909 bars, ILM sequences, answers never leave the range."""

import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmi_daemon.dil.examples import piece
from cmi_daemon.errors import RegionError
from cmi_daemon.inference.engine import blank_positions
from cmi_daemon.music import vocab
from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.regions import (MAX_CONTEXT_GAP_STEPS, SongCutter, answer_notes, apply_answer, build_region,
                                      ilm_parts, jepa_sequence, replace_notes_in_range)
from cmi_daemon.music.tempo import TempoMap
from cmi_daemon.music.tokens import Note, Song, Track, ms_to_step, read_midi, tokenize
from conftest import ALL_FIXTURES, POP909_FIXTURES, shared_data
from training.data import batches


ONSET_TOLERANCE_MS = vocab.WAIT_STEP_MS / 2 + 1e-6
"""Half a wait step: how far a re-read onset may move. Measured in time, not QN: an onset on a
tempo change can round to the other side of it, where a millisecond is another fraction of a QN."""


def assert_blank_reproduced(song: Song, start_qn: float, end_qn: float, targets, context_tokens=4096):
    """Rebuild the song from its region with the original blank as the answer.

    Tracks of one instrument bin cannot be told apart in tokens, so the blank's notes are
    compared over all target tracks together, one note per bin, pitch and 8 ms step; a target
    note doubling another track's note there is heard once, as the other track's.
    """
    region = build_region(song, start_qn, end_qn, targets, context_tokens)
    rebuilt = apply_answer(song, region, region.blank_ids)
    inside = lambda notes: [n for n in notes if start_qn <= n.start_qn < end_qn]
    expected, got = {}, []
    for index, (before, after) in enumerate(zip(song.tracks, rebuilt.tracks)):
        if index not in targets:
            assert after.notes == before.notes, f"track {index} is not a target but changed"
            continue
        outside = lambda notes: [n for n in notes if not start_qn <= n.start_qn < end_qn]
        assert outside(after.notes) == outside(before.notes), f"track {index}: notes outside the range changed"
        instrument_bin = song.tracks[index].instrument_bin
        for n in inside(before.notes):
            step = round(song.tempo_map.ms_at(n.start_qn) / vocab.WAIT_STEP_MS)
            if (step, instrument_bin, n.pitch) not in region.fixed_notes:
                key = (instrument_bin, n.pitch, step)  # doubles merge into the louder
                first = expected.setdefault(key, n)
                expected[key] = first._replace(velocity=max(first.velocity, n.velocity))
        got += [(instrument_bin, n) for n in inside(after.notes)]
    expected_notes = sorted(((b, n) for (b, _, _), n in expected.items()),
                            key=lambda x: (x[1].start_qn, x[0], x[1].pitch))
    got.sort(key=lambda x: (x[1].start_qn, x[0], x[1].pitch))
    assert len(got) == len(expected_notes)
    for (bin_before, original), (bin_after, new) in zip(expected_notes, got):
        assert (bin_after, new.pitch) == (bin_before, original.pitch)
        tempo = song.tempo_map
        assert abs(tempo.ms_at(new.start_qn) - tempo.ms_at(original.start_qn)) <= ONSET_TOLERANCE_MS
        assert vocab.velocity_to_bin(new.velocity) == vocab.velocity_to_bin(original.velocity)
        assert start_qn <= new.start_qn and new.start_qn + new.duration_qn <= end_qn + 1e-9
    return region


@pytest.mark.parametrize("path", POP909_FIXTURES, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("bars", [2, 4])
def test_pop909_bars_reproduce_with_original_blank(path, bars):
    song = read_midi(path)
    downbeats = bar_lines_qn(song, path)[0]
    rng = random.Random(bars)
    for _ in range(6):
        first = rng.randrange(8, len(downbeats) - bars - 8)
        targets = rng.choice([[2], [0], [0, 2], [0, 1, 2]])
        region = assert_blank_reproduced(song, downbeats[first], downbeats[first + bars], targets)
        assert region.prefix_ids and region.suffix_ids
        assert sum(vocab.wait_steps(t) for t in region.blank_ids) == region.n_steps


def test_pop909_dev_bars_reproduce():
    folders = sorted(shared_data("pop909/dev").iterdir())
    for folder in folders[::9]:
        path = folder / f"{folder.name}.mid"
        song = read_midi(path)
        downbeats = bar_lines_qn(song, path)[0]
        first = len(downbeats) // 2
        assert_blank_reproduced(song, downbeats[first], downbeats[first + 4], [0, 1, 2])


def test_ilm_sequence_layout():
    song = read_midi(POP909_FIXTURES[0])
    region = build_region(song, 40.0, 48.0, [2])
    ids = region.ilm_ids(region.blank_ids)
    mask, sep = ids.index(vocab.MASK_ID), ids.index(vocab.SEP_ID)
    assert ids[:mask] == region.prefix_ids
    assert ids[mask + 1:sep] == region.suffix_ids
    assert ids[sep + 1:-1] == region.blank_ids and ids[-1] == vocab.ANS_ID
    assert region.ilm_ids()[-1] == vocab.SEP_ID
    assert region.expected_answer_tokens() == len(region.blank_ids)


@pytest.mark.parametrize("path", ALL_FIXTURES, ids=lambda p: p.name)
def test_a_training_example_of_a_song_is_the_region_the_engine_builds(path):
    """Training cuts the song's token stream at a range's steps; the engine cuts the song. Both
    give the same prefix, blank and suffix, ILM sequence and JEPA sequence (as the engine's graphs,
    the evaluation's conditioning and DIL read it), except where a note starts within half a wait
    step before a boundary: the token stream has it at the boundary, the song before it."""
    song = read_midi(path)
    assert all(track.instrument_bin is not None for track in song.tracks), "tokens would drop a track"
    encoding = tokenize(song)
    first_step = encoding.events[0].step
    onsets_ms = np.array([note.start_ms for note in encoding.notes])
    lines_qn = bar_lines_qn(song, path)[0]
    everything = list(range(len(song.tracks)))
    ranges = [(lines_qn[first], lines_qn[first + bars]) for bars in (1, 2, 4)
              for first in range(0, len(lines_qn) - bars, 4)]
    compared = 0
    for start_qn, end_qn in ranges:
        region = build_region(song, start_qn, end_qn, everything, context_tokens=10 ** 6)
        if any(np.any((onsets_ms < song.tempo_map.ms_at(qn)) & (ms_to_step(onsets_ms) >= step))
               for qn, step in ((start_qn, region.start_step), (end_qn, region.end_step))):
            continue
        split = batches.cut_at_steps(encoding.ids, region.start_step - first_step, region.end_step - first_step)
        assert (split.prefix, split.blank, split.suffix) == (region.prefix_ids, region.blank_ids, region.suffix_ids)
        assert batches.ilm_example(split).ids == region.ilm_ids(region.blank_ids)
        jepa = batches.jepa_example(split)
        target_mask = np.array(jepa.target_mask)
        context_ids, context_positions, target_positions = blank_positions(region, len(region.blank_ids))
        assert context_ids.tolist() == np.array(jepa.ids)[~target_mask].tolist()
        assert context_positions.tolist() == np.flatnonzero(~target_mask).tolist()
        assert target_positions.tolist() == np.flatnonzero(target_mask).tolist()
        prefix, suffix, answer = ilm_parts(region.ilm_ids(region.blank_ids))  # the evaluation's conditioning
        conditioned = jepa_sequence(prefix, answer, suffix)
        rejected = piece(song, start_qn, end_qn, everything, 10 ** 6)
        for sequence in (conditioned, rejected):
            assert list(sequence.token_ids) == jepa.ids and sequence.blank.tolist() == jepa.target_mask
        compared += 1
    assert compared >= 0.8 * len(ranges)


def test_context_budget_bounds_prefix_and_suffix():
    song = read_midi(POP909_FIXTURES[0])
    full = build_region(song, 40.0, 48.0, [2], context_tokens=100_000)
    for budget in (0, 64, 257, 1000):
        region = build_region(song, 40.0, 48.0, [2], context_tokens=budget)
        assert len(region.prefix_ids) + len(region.suffix_ids) <= budget
        assert region.prefix_ids == full.prefix_ids[len(full.prefix_ids) - len(region.prefix_ids):]
        assert region.suffix_ids == full.suffix_ids[:len(region.suffix_ids)]
        assert not region.prefix_ids or not vocab.is_wait(region.prefix_ids[0]) or budget < 2
        assert region.blank_ids == full.blank_ids
    near_start = build_region(song, 1.0, 5.0, [2], context_tokens=400)
    assert len(near_start.suffix_ids) > 200  # the short prefix leaves its share to the suffix


def test_notes_sounding_into_the_range_are_seen_ending_at_its_start():
    song = Song([Track("keys", 0, False, [Note(0.0, 8.0, 60, 100), Note(4.0, 1.0, 64, 100)])],
                TempoMap.constant(120))
    region = build_region(song, 2.0, 6.0, [0])
    # the long note ends at the range start (1 s = t125) in the prefix, and is kept whole
    assert vocab.ids_to_text(region.prefix_ids) == "pi:3c:a t125 pi:3c:0"
    assert vocab.ids_to_text(region.blank_ids) == "t125 pi:40:a t63 pi:40:0 t62"
    assert apply_answer(song, region, []).tracks[0].notes == [Note(0.0, 8.0, 60, 100)]


@pytest.mark.parametrize("boundary_qn", [8.0, 12.0], ids=["range start", "range end"])
def test_notes_of_one_key_in_one_step_across_a_boundary_stay_on_their_sides(boundary_qn):
    """POP909 train/008 bar 24: the melody plays a note 3.5 ms before the bar line, the bridge the
    same pitch 0.3 ms after it. Both start in one 8 ms step; merged into one note, the earlier
    side carried the later note's end past the boundary ("a gap cannot be negative")."""
    song = Song([Track("melody", 0, False, [Note(2.0, 1.0, 72, 90), Note(boundary_qn - 0.007, 0.25, 77, 100)]),
                 Track("bridge", 0, False, [Note(boundary_qn + 0.0006, 1.5, 77, 90), Note(14.0, 1.0, 67, 90)])],
                TempoMap.constant(120))
    for targets in ([0], [0, 1]):
        build_region(song, 8.0, 12.0, targets)
    region = assert_blank_reproduced(song, 8.0, 12.0, [1])
    after = region.blank_ids if boundary_qn == 8.0 else region.suffix_ids
    before = region.prefix_ids if boundary_qn == 8.0 else region.blank_ids
    assert vocab.ids_to_text(after).startswith("pi:4d:9 t94 pi:4d:0")  # the later note starts its side, whole
    assert vocab.ids_to_text(before).endswith("pi:4d:a pi:4d:0")  # the earlier one ends at the boundary


def test_pop909_song_that_crossed_a_boundary_builds_every_range():
    path = shared_data("pop909/train") / "008" / "008.mid"
    song = read_midi(path)
    downbeats = bar_lines_qn(song, path)[0]
    for first, bars in ((23, 1), (22, 2), (20, 4), (16, 8)):  # each raised before
        for region in SongCutter(song).regions(downbeats[first], downbeats[first + bars], [[0, 1, 2], [0], [1], [2]]):
            assert sum(vocab.wait_steps(t) for t in region.blank_ids) == region.n_steps
            assert sum(vocab.wait_steps(t) for t in region.prefix_ids) <= region.start_step


def test_other_tracks_inside_the_range_are_context_not_answer():
    song = Song([Track("keys", 0, False, [Note(4.0, 1.0, 64, 100)]),
                 Track("more keys", 1, False, [Note(4.0, 1.0, 67, 100)])], TempoMap.constant(120))
    region = build_region(song, 2.0, 6.0, [0])
    assert "pi:43:a" in vocab.ids_to_text(region.blank_ids)
    notes = answer_notes(song, region, region.blank_ids)
    assert [n.pitch for n in notes[0]] == [64]


def test_tracks_sharing_a_bin_get_the_notes_nearest_their_register():
    song = Song([Track("melody", 0, False, [Note(0.0, 1.0, 76, 90), Note(12.0, 1.0, 79, 90)]),
                 Track("left hand", 0, False, [Note(0.0, 1.0, 40, 90), Note(12.0, 1.0, 43, 90)])])
    region = build_region(song, 4.0, 8.0, [0, 1])
    answer = vocab.text_to_ids("pi:48:a pi:2d:a t50 pi:48:0 pi:2d:0 <ans>")
    notes = answer_notes(song, region, answer)
    assert [n.pitch for n in notes[0]] == [72] and [n.pitch for n in notes[1]] == [45]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(vocab.FIRST_WAIT_ID, vocab.LAST_NOTE_ID), max_size=200),
       st.floats(0, 30, allow_subnormal=False), st.floats(0.25, 16, allow_subnormal=False))
def test_any_answer_stays_inside_the_range_and_target_tracks(answer, start_qn, length_qn):
    song = Song([Track("drums", 0, True, [Note(1.0, 0.5, 36, 100)]),
                 Track("bass", 33, False, [Note(2.0, 1.0, 40, 100)]),
                 Track("keys", 0, False, [Note(0.0, 2.0, 60, 100)])],
                TempoMap.from_changes([(0, 90), (8, 140)]))
    region = build_region(song, start_qn, start_qn + length_qn, [0, 2])
    notes = answer_notes(song, region, answer)
    assert set(notes) == {0, 2}
    for track, track_notes in notes.items():
        for note in track_notes:
            assert region.start_qn <= note.start_qn < region.end_qn
            assert note.duration_qn > 0 and note.start_qn + note.duration_qn <= region.end_qn + 1e-9
    allowed = {vocab.PERCUSSION_BIN, 8}
    decoded_bins = {vocab.note_bin(t) for t in answer if vocab.is_note(t)}
    if not decoded_bins & allowed:
        assert not any(notes.values())


songs = st.lists(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 16), st.integers(30, 90),
                                    st.integers(1, 127)), max_size=25), min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(songs, st.lists(st.tuples(st.integers(0, 50), st.floats(40, 200, allow_subnormal=False)), max_size=4),
       st.integers(0, 150), st.integers(1, 40), st.data())
def test_random_songs_reproduce_with_original_blank(tracks, tempo_changes, start, length, data):
    programs = [0, 33, 24]
    song = Song([Track(f"t{i}", programs[i], False,
                       sorted({Note(s / 4, d / 4, p, v) for s, d, p, v in notes}))
                 for i, notes in enumerate(tracks)],
                TempoMap.from_changes([(qn * 1.0, bpm) for qn, bpm in tempo_changes]))
    targets = data.draw(st.lists(st.integers(0, len(tracks) - 1), min_size=1, unique=True))
    assert_blank_reproduced(song, start / 4, (start + length) / 4, targets)


def test_an_onset_on_a_tempo_change_stays_within_half_a_wait_step():
    """A note at 42 QN, where 84.875 BPM slows to 40: its 8 ms step lies just before the change."""
    song = Song([Track("t0", 0, False, [Note(42.0, 0.25, 30, 1)])],
                TempoMap.from_changes([(0.0, 84.875), (42.0, 40.0)]))
    assert_blank_reproduced(song, 129 / 4, 169 / 4, [0])


def test_bad_requests_are_refused_with_the_reason():
    song = read_midi(POP909_FIXTURES[0])
    with pytest.raises(RegionError, match="empty"):
        build_region(song, 8.0, 8.0, [0])
    with pytest.raises(RegionError, match="before the start"):
        build_region(song, -4.0, 8.0, [0])
    with pytest.raises(RegionError, match="track 7 does not exist"):
        build_region(song, 0.0, 8.0, [7])
    with pytest.raises(RegionError, match="no target track"):
        build_region(song, 0.0, 8.0, [])
    with pytest.raises(RegionError, match="not finite"):
        build_region(song, 0.0, float("nan"), [0])


def test_a_range_far_past_the_songs_end_costs_ten_waits_not_one_per_second(tmp_path):
    import tracemalloc

    song = read_midi(POP909_FIXTURES[0])
    slow = replace(song, tempo_map=TempoMap.constant(1.0))  # a quarter note is a minute
    tracemalloc.start()
    region = build_region(slow, 99_990.0, 99_994.0, [0], context_tokens=958)
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    trailing_waits = len(region.prefix_ids) - max(i for i, t in enumerate(region.prefix_ids) if vocab.is_note(t)) - 1
    assert trailing_waits == len(vocab.wait_ids(MAX_CONTEXT_GAP_STEPS)) == 10
    assert region.n_steps == round(4 * 60_000 / vocab.WAIT_STEP_MS)  # the blank itself keeps its length
    assert peak_bytes < 64 * 2 ** 20  # the silence was never written out (it would be 7.5e8 steps)


def test_replacing_a_ranges_notes_changes_only_the_named_tracks_notes_that_start_in_it():
    """Bars 9-12 of a POP909 song: the melody's notes starting there become two new notes, the
    piano's are removed, the bridge is not named; everything else is as it was, the song untouched."""
    song = read_midi(POP909_FIXTURES[0])
    before = [list(track.notes) for track in song.tracks]
    start_qn, end_qn = song.meter.bar_range_qn(9, 12)
    new = [Note(start_qn + 0.5, 1.0, 72, 90), (start_qn, 30.0, 60, 64)]  # any 4-sequence; may sound past the end
    melody, bridge, piano = 0, 1, 2
    assert [t.name for t in song.tracks] == ["MELODY", "BRIDGE", "PIANO"]
    replaced = replace_notes_in_range(song, start_qn, end_qn, {melody: new, piano: []})
    inside = lambda n: start_qn <= n.start_qn < end_qn
    assert [list(track.notes) for track in song.tracks] == before
    assert all(any(inside(n) for n in notes) for notes in before), "every track plays in the range"
    assert replaced.tracks[bridge] is song.tracks[bridge]
    for index in (melody, piano):
        assert [n for n in replaced.tracks[index].notes if not inside(n)] == [n for n in before[index] if not inside(n)]
    assert [n for n in replaced.tracks[melody].notes if inside(n)] == [Note(start_qn, 30.0, 60, 64), new[0]]
    assert not [n for n in replaced.tracks[piano].notes if inside(n)]
    assert all(type(n) is Note for n in replaced.tracks[melody].notes)
    assert replaced.tracks[melody].notes == sorted(replaced.tracks[melody].notes)
    assert (replaced.tempo_map, replaced.meter, replaced.ticks_per_qn) == \
        (song.tempo_map, song.meter, song.ticks_per_qn)
