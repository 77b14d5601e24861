"""Each control changes the shipped model's infills of real songs the way it says, and defaults to
what the track does around the range. Notes are judged with training.eval.musicality's own grid and
polyphony measures, which share no code with the engine's controls."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cmi_daemon.errors import CMIError
from cmi_daemon.inference.controls import (ControlRequest, Grid, TrackControls, detect_grid,
                                           length_pattern, parse_grid, resolve_controls, snap_to_grid)
from cmi_daemon.inference import sampling
from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.music.tempo import Meter, TimeSignature
from cmi_daemon.music.tokens import Note, Song, read_midi
from cmi_daemon.paths import default_model_dir
from conftest import GROOVE_FIXTURES, POP909_FIXTURES
from training.eval import metrics, musicality

BARS = (17, 20)
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def engine():
    return Engine(default_model_dir())


@pytest.fixture(scope="module")
def song():
    return read_midi(POP909_FIXTURES[0])


def infills(engine, song, track, request=None, seeds=SEEDS, follow_repeat=1.0):
    """New notes of `track` for bars BARS under the request, one list per seed. A test of what one
    control does alone passes follow_repeat=0: the song's repeat of the bars would steer the same
    notes (tests/test_repeats.py)."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    controls = {} if request is None else {track: request}
    options = [InfillOptions(seed=seed, controls=controls, follow_repeat=follow_repeat) for seed in seeds]
    return [engine.infill(song, start_qn, end_qn, [track], o).candidates[0].notes[track] for o in options]


def context_onsets(song, track):
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    return np.array([n.start_qn for n in song.tracks[track].notes
                     if start_qn - 32 <= n.start_qn < end_qn + 32 and not start_qn <= n.start_qn < end_qn])


@pytest.mark.parametrize("track", [0, 2], ids=["melody", "piano"])
def test_new_onsets_fall_on_the_contexts_grid(engine, song, track):
    grid = musicality.context_grid(context_onsets(song, track))
    assert grid is not None
    onsets = np.array([n.start_qn for notes in infills(engine, song, track) for n in notes])
    assert len(onsets) > 0 and musicality.on_grid(onsets, grid).all()


def test_a_grid_the_musician_sets_has_its_lines_on_the_bar_lines(engine, song):
    onsets = np.array([n.start_qn for notes in infills(engine, song, 2, ControlRequest(grid=parse_grid("1/8")))
                       for n in notes])
    assert len(onsets) > 0
    assert np.allclose(onsets * 2, np.round(onsets * 2))


@pytest.mark.parametrize("path", GROOVE_FIXTURES, ids=lambda p: p.name)
def test_human_drumming_is_not_forced_onto_a_grid(engine, path):
    drums = read_midi(path)
    onsets = np.array([n.start_qn for n in drums.tracks[0].notes])
    assert detect_grid(onsets) is None
    start_qn, end_qn = drums.meter.bar_range_qn(5, 6)
    controls = resolve_controls(drums, 0, start_qn, end_qn)
    assert controls.grid is None
    new = engine.infill(drums, start_qn, end_qn, [0], InfillOptions(seed=1)).candidates[0].notes[0]
    sixteenths = musicality.Grid(0.25, 0.0)
    assert len(new) > 0 and not musicality.on_grid(np.array([n.start_qn for n in new]), sixteenths).all()


def test_polyphony_is_a_hard_limit(engine, song):
    free = infills(engine, song, 2, ControlRequest(max_polyphony=12))
    assert max(musicality.max_polyphony(notes) for notes in free) > 2
    for limit in (1, 2):
        for notes in infills(engine, song, 2, ControlRequest(max_polyphony=limit)):
            assert notes and musicality.max_polyphony(notes) <= limit


def test_the_melody_alone_keeps_to_its_context(engine, song):
    """Default controls: as many notes at once as the melody's context has, inside its pitch range."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    context = [n for n in song.tracks[0].notes
               if start_qn - 32 <= n.start_qn < end_qn + 32 and not start_qn <= n.start_qn < end_qn]
    low, high = min(n.pitch for n in context), max(n.pitch for n in context)
    for notes in infills(engine, song, 0):
        assert notes and musicality.max_polyphony(notes) <= musicality.max_polyphony(context)
        assert all(low <= n.pitch <= high for n in notes)


def test_pitch_and_velocity_ranges_are_hard_limits(engine, song):
    request = ControlRequest(pitch_range=(60, 64), velocity_range=(100, 127))
    notes = [n for notes in infills(engine, song, 2, request) for n in notes]
    assert notes and all(60 <= n.pitch <= 64 for n in notes)
    assert all(n.velocity >= 98 for n in notes)  # 98 is where the velocity bin of 100 starts


def test_density_steers_the_note_count(engine, song):
    sparse = sum(len(notes) for notes in infills(engine, song, 2, ControlRequest(density_per_qn=0.5)))
    dense = sum(len(notes) for notes in infills(engine, song, 2, ControlRequest(density_per_qn=4.0)))
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    assert sparse < dense
    assert sparse <= 2 * 0.5 * (end_qn - start_qn) * len(SEEDS)


def test_note_length_steers_durations(engine, song):
    short = [n.duration_qn for notes in infills(engine, song, 0, ControlRequest(note_length_qn=0.25)) for n in notes]
    long = [n.duration_qn for notes in infills(engine, song, 0, ControlRequest(note_length_qn=2.0)) for n in notes]
    assert np.median(short) < 0.5 < np.median(long)


@pytest.mark.parametrize("track", [0, 2], ids=["melody", "piano"])
def test_notes_are_as_long_as_the_tracks_context_by_default(engine, song, track):
    """A wait that jumps past an open note's length must not hold the note: a tempo-relative wait
    can span whole bars in one token, so the length control steers waits as well as note-offs."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    context = [n.duration_qn for n in song.tracks[track].notes
               if start_qn - 32 <= n.start_qn < end_qn + 32 and not start_qn <= n.start_qn < end_qn]
    new = [n.duration_qn for notes in infills(engine, song, track, follow_repeat=0.0) for n in notes]
    assert new and 0.75 <= np.median(new) / np.median(context) <= 1.33


@pytest.mark.parametrize("track", [0, 2], ids=["melody", "piano"])
def test_notes_keep_the_lengths_their_bar_positions_have_in_the_context(engine, song, track):
    """Long and short notes stay long and short: the durations' spread matches the context's better
    than when every note aims at one length (the context's median), and a note may end between
    grid lines (detached) while its onset stays on one."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    context = [n for n in song.tracks[track].notes
               if start_qn - 32 <= n.start_qn < end_qn + 32 and not start_qn <= n.start_qn < end_qn]
    one_length = ControlRequest(note_length_qn=float(np.median([n.duration_qn for n in context])))

    def overlaps(request):
        return [metrics.overlap(metrics.duration_histogram(notes), metrics.duration_histogram(context))
                for notes in infills(engine, song, track, request, follow_repeat=0.0)]

    assert np.mean(overlaps(None)) > np.mean(overlaps(one_length)) + 0.05
    grid = musicality.context_grid(context_onsets(song, track))
    new = [n for notes in infills(engine, song, track, follow_repeat=0.0) for n in notes]
    ends = np.array([n.start_qn + n.duration_qn for n in new if n.start_qn + n.duration_qn < end_qn])
    assert musicality.on_grid(np.array([n.start_qn for n in new]), grid).all()
    assert not musicality.on_grid(ends, grid).all()


@pytest.mark.parametrize("track", [0, 2], ids=["melody", "piano"])
def test_infills_keep_to_the_pitch_classes_their_context_sounds(engine, song, track, monkeypatch):
    """Measured on the song itself: the share of new notes whose pitch class sounds less than an
    even share (1/12) of the time in the context bars of all tracks, with and without the bias."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    sounding_qn = np.zeros(12)
    for other in song.tracks:
        for n in other.notes:
            if start_qn - 32 <= n.start_qn < end_qn + 32 and not start_qn <= n.start_qn < end_qn:
                sounding_qn[n.pitch % 12] += n.duration_qn
    rare = sounding_qn / sounding_qn.sum() < 1 / 12

    def rare_share():
        pitches = [n.pitch for notes in infills(engine, song, track, seeds=(1, 2, 3, 4), follow_repeat=0.0)
                   for n in notes]
        return np.mean(rare[np.array(pitches) % 12])

    biased = rare_share()
    monkeypatch.setattr(sampling, "HARMONY_GAIN", 0.0)
    assert biased < rare_share() - 0.03


def test_a_note_ended_at_a_lines_step_ends_on_the_line_and_one_between_lines_stays():
    """The sampler works in steps (here 1/24 QN); a grid offset from QN 0, as many POP909 files'
    are, has its lines between steps, so a note the sampler ended where the next starts must end
    exactly on the line the next one is moved to, or the two would overlap."""
    step_qn = 1 / 24
    controls = {0: TrackControls(None, None, None, None, None, Grid(0.25, 0.1))}  # lines 0.1, 0.35, 0.6, ...
    first = Note(8 * step_qn, 6 * step_qn, 71, 90)  # steps 8-14, the steps nearest the lines 0.35 and 0.6
    second = Note(14 * step_qn, 6 * step_qn, 71, 90)
    detached = Note(8 * step_qn, 4 * step_qn, 72, 90)  # ends at step 12 = 0.5, between the lines
    snapped = snap_to_grid({0: [first, second, detached]}, controls, 0.0, 4.0, step_qn)[0]
    assert snapped[0].start_qn == pytest.approx(0.35) and snapped[1].start_qn == pytest.approx(0.6)
    assert snapped[0].start_qn + snapped[0].duration_qn == snapped[1].start_qn
    assert musicality.max_polyphony(snapped[:2]) == 1
    assert snapped[2].start_qn == pytest.approx(0.35)
    assert snapped[2].start_qn + snapped[2].duration_qn == pytest.approx(0.5)


def test_a_bar_position_counts_from_the_bar_line_across_meter_changes():
    meter = Meter((TimeSignature(0.0, 3, 4), TimeSignature(6.0, 4, 4)))
    song = Song([], meter=meter)
    assert np.allclose(meter.position_in_bar_qn([0.0, 2.5, 3.0, 5.75, 6.0, 9.5, 10.0]),
                       [0.0, 2.5, 0.0, 2.75, 0.0, 3.5, 0.0])
    notes = [Note(qn, length, 60, 90) for qn, length in
             [(0.0, 2.0), (3.0, 2.5), (6.0, 3.0), (10.0, 3.0), (1.0, 0.5), (4.0, 0.5), (7.0, 0.25), (2.0, 1.0)]]
    # Downbeats held long, second beats short; the one note on a third beat has no length of its own.
    assert length_pattern(song, notes) == ((0.0, 2.75), (1.0, 0.5))


def test_a_track_silent_around_the_range_rests_unless_the_musician_sets_its_density(engine, song):
    """A part that plays elsewhere in the song but not in the 8 bars each side of the range (a
    bridge that enters later) stays silent when a musician infills every track there; it plays
    when they ask it to."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    first_qn, last_qn = song.meter.bar_range_qn(BARS[0] - 8, BARS[1] + 8)
    bridge = song.tracks[1]
    silent = replace(song, tracks=[song.tracks[0], replace(bridge, notes=[
        n for n in bridge.notes if not first_qn <= n.start_qn < last_qn]), song.tracks[2]])
    assert silent.tracks[1].notes and resolve_controls(silent, 1, start_qn, end_qn).rests
    for seed in SEEDS:
        result = engine.infill(silent, start_qn, end_qn, [0, 1, 2], InfillOptions(seed=seed))
        notes = result.candidates[0].notes
        assert notes[1] == [] and notes[0] and notes[2]
        assert result.controls[1].describe() == "rests (silent around the range)"
    asked = engine.infill(silent, start_qn, end_qn, [0, 1, 2],
                          InfillOptions(seed=1, controls={1: ControlRequest(density_per_qn=1.0)}))
    assert asked.candidates[0].notes[1]


def test_a_new_lead_part_is_one_line_in_the_treble_on_the_songs_grid(engine, song):
    """An empty track named Lead (a part the musician is starting) infilled over the song: the model
    alone wrote chords of up to 7 notes off the grid here; a new lead is one line, C4-C6."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    empty = replace(song, tracks=[replace(song.tracks[0], notes=[], name="Lead"), *song.tracks[1:]])
    others = np.array([n.start_qn for t in song.tracks[1:] for n in t.notes
                       if start_qn - 32 <= n.start_qn < end_qn + 32 and not start_qn <= n.start_qn < end_qn])
    grid = musicality.context_grid(others)
    for notes in infills(engine, empty, 0):
        assert notes and musicality.max_polyphony(notes) == 1
        assert all(60 <= n.pitch <= 84 for n in notes)
        assert musicality.on_grid(np.array([n.start_qn for n in notes]), grid).all()


def test_defaults_come_from_the_tracks_context(song):
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    melody, piano = (resolve_controls(song, t, start_qn, end_qn) for t in (0, 2))
    assert melody.max_polyphony < piano.max_polyphony
    assert melody.pitch_range[0] > piano.pitch_range[0]
    assert melody.grid is not None and melody.grid.step_qn in (0.25, 0.5)
    asked = resolve_controls(song, 2, start_qn, end_qn, ControlRequest(max_polyphony=3, grid="off"))
    assert asked.max_polyphony == 3 and asked.grid is None and asked.pitch_range == piano.pitch_range


@pytest.mark.parametrize("bad", [dict(max_polyphony=0), dict(pitch_range=(70, 60)), dict(density_per_qn=-1.0),
                                 dict(velocity_range=(0, 0)), dict(grid="1/7")])
def test_bad_controls_say_what_is_wrong(bad):
    with pytest.raises(CMIError):
        ControlRequest(**bad) if bad.get("grid") is None else parse_grid(bad["grid"])


def test_cli_flags_set_controls_per_track(tmp_path, capsys):
    from cmi_daemon.cli.main import main

    out = tmp_path / "out.mid"
    assert main(["infill", str(POP909_FIXTURES[0]), "--bars", "17-18", "--tracks", "1,3", "--seed", "4",
                 "--polyphony", "3=2", "--pitch-range", "1=70-76", "--grid", "1/8", "--json", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    melody, piano = (report["candidates"][0]["tracks"][t] for t in ("1", "3"))
    as_notes = [[Note(n["start_qn"], n["duration_qn"], n["pitch"], n["velocity"]) for n in notes]
                for notes in (melody, piano)]
    assert melody and piano and all(70 <= n.pitch <= 76 for n in as_notes[0])
    assert musicality.max_polyphony(as_notes[1]) <= 2
    assert all(n.start_qn * 2 == round(n.start_qn * 2) for notes in as_notes for n in notes)


@pytest.mark.parametrize("flags, words", [
    (["--polyphony", "0"], "--polyphony = 0 is outside 1..64"),
    (["--pitch-range", "72-60"], "--pitch-range: low 72 is above high 60"),
    (["--grid", "1/7"], "--grid: '1/7' is not a grid"),
    (["--density", "3=1"], "--density '3=1': track 3 is not being infilled (tracks 1)"),
    (["--note-length", "long"], "--note-length 'long': not a value it takes"),
])
def test_bad_control_flags_say_which_and_why(tmp_path, capsys, flags, words):
    from cmi_daemon.cli.main import main

    out = tmp_path / "out.mid"
    assert main(["infill", str(POP909_FIXTURES[0]), "--bars", "17", "--tracks", "1", *flags, "-o", str(out)]) == 2
    assert words in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("controls, field", [
    ([{"track": 1, "max_polyphony": 1}], "content.options.controls[0].track"),
    ([{"track": 0, "pitch_range": [60]}], "content.options.controls[0].pitch_range"),
    ([{"track": 0, "velocity_range": [0, 90]}], "content.options.controls[0].velocity_range[0]"),
    ([{"track": 0}, {"track": 0}], "content.options.controls[1].track"),
    ([{"track": 0, "grid": "1/5"}], "content.options.controls[0].grid"),
])
def test_the_daemon_refuses_bad_controls_naming_the_field(controls, field):
    from cmi_daemon.daemon import schema
    from cmi_daemon.daemon.protocol import Limits, ProtocolError
    from daemon_support import infill_request

    with pytest.raises(ProtocolError) as error:
        schema.parse_infill(infill_request(controls=controls), Limits(), [])
    assert (error.value.code, error.value.field) == ("invalid_field", field)


def test_the_daemon_reads_controls_into_the_engines_options():
    from cmi_daemon.daemon import schema
    from cmi_daemon.daemon.engine_backend import engine_options
    from cmi_daemon.daemon.protocol import Limits
    from daemon_support import infill_request

    request = schema.parse_infill(infill_request(controls=[{"track": 0, "max_polyphony": 2, "grid": "1/8T",
                                                            "pitch_range": [50, 70]}]), Limits(), [])
    asked = engine_options(request.options).controls[0]
    assert (asked.max_polyphony, asked.pitch_range, asked.grid) == (2, (50, 70), pytest.approx(1 / 3))


def test_density_follows_the_bars_being_rewritten_when_they_hold_notes(song):
    """Rewriting bars that hold notes keeps their pace; empty bars take the context's."""
    from training.eval.baselines import Blank
    from training.eval.blanks import masked_song

    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    in_range = [n for n in song.tracks[0].notes if start_qn <= n.start_qn < end_qn]
    assert resolve_controls(song, 0, start_qn, end_qn).density_per_qn == len(in_range) / (end_qn - start_qn)
    lines = tuple(song.meter.bar_start_qn(b) for b in range(BARS[0] - 8, BARS[1] + 10))
    blank = Blank("235", start_qn, end_qn, lines, 8, BARS[1] - BARS[0] + 1, 1.0)
    emptied = masked_song(song, blank, [0])
    context = [n for n in emptied.tracks[0].notes if lines[0] <= n.start_qn < lines[-1]]
    assert resolve_controls(emptied, 0, start_qn, end_qn).density_per_qn == pytest.approx(
        len(context) / (lines[-1] - lines[0] - (end_qn - start_qn)))
