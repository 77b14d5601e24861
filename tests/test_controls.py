"""Each control changes the shipped model's infills of real songs the way it says, and defaults to
what the track does around the range. Notes are judged with training.musicality's own grid and
polyphony measures, which share no code with the engine's controls."""

from __future__ import annotations

import numpy as np
import pytest

from cmi_daemon.controls import ControlRequest, detect_grid, parse_grid, resolve_controls
from cmi_daemon.engine import Engine, InfillOptions
from cmi_daemon.errors import CMIError
from cmi_daemon.offline import default_model_dir
from cmi_daemon.tokens import read_midi
from conftest import GROOVE_FIXTURES, POP909_FIXTURES
from training import musicality

BARS = (17, 20)
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def engine():
    return Engine(default_model_dir())


@pytest.fixture(scope="module")
def song():
    return read_midi(POP909_FIXTURES[0])


def infills(engine, song, track, request=None, seeds=SEEDS):
    """New notes of `track` for bars BARS under the request, one list per seed."""
    start_qn, end_qn = song.meter.bar_range_qn(*BARS)
    controls = {} if request is None else {track: request}
    return [engine.infill(song, start_qn, end_qn, [track], InfillOptions(seed=seed, controls=controls))
            .candidates[0].notes[track] for seed in seeds]


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
