"""The song's own repeat of a range: found where the song plays the hidden bars again (judged against
the notes really hidden there, with the evaluation's onset F1), never the musician's own notes
offered back, absent from a song that never repeats, and followed by the engine's infills under
every control."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from cmi_daemon.daemon import schema
from cmi_daemon.daemon.protocol import Limits, ProtocolError
from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.regions import replace_notes_in_range
from cmi_daemon.music.repeats import SAME_CONTENT, find_repeat
from cmi_daemon.music.tokens import read_midi
from cmi_daemon.errors import CMIError
from cmi_daemon.paths import default_model_dir
from conftest import POP909_FIXTURES
from training.eval import metrics, musicality

TARGETS = (0, 1, 2)
"""POP909's MELODY, BRIDGE and PIANO: every track, as the evaluation infills them."""
WIDTH_BARS = 4


def ranges(path):
    """(song, start_qn, end_qn) of every fourth 4-bar range with 8 annotated bars each side."""
    song = read_midi(path)
    lines, _ = bar_lines_qn(song, path)
    return song, [(lines[first], lines[first + WIDTH_BARS]) for first in range(8, len(lines) - 8 - WIDTH_BARS - 1, 4)]


def hidden(song, start_qn, end_qn):
    """(the song with the targets' notes of the range removed, those notes)."""
    truth = [n for t in TARGETS for n in song.tracks[t].notes if start_qn <= n.start_qn < end_qn]
    return replace_notes_in_range(song, start_qn, end_qn, {t: [] for t in TARGETS}), truth


def all_notes(notes_by_track):
    return [n for notes in notes_by_track.values() for n in notes]


@pytest.mark.parametrize("path", POP909_FIXTURES, ids=lambda p: p.stem)
def test_the_repeat_of_hidden_bars_holds_what_was_hidden_far_better_than_the_previous_bars(path):
    song, spans = ranges(path)
    found, previous = [], []
    for start_qn, end_qn in spans:
        masked, truth = hidden(song, start_qn, end_qn)
        repeat = find_repeat(masked, start_qn, end_qn, TARGETS)
        assert repeat is not None and abs(repeat.offset_qn) >= end_qn - start_qn
        assert all(start_qn <= n.start_qn < end_qn and n.start_qn + n.duration_qn <= end_qn + 1e-9
                   for n in all_notes(repeat.notes))
        found.append(metrics.onset_f1(all_notes(repeat.notes), truth))
        width_qn = end_qn - start_qn
        before = [n for t in TARGETS for n in song.tracks[t].notes if start_qn - width_qn <= n.start_qn < start_qn]
        previous.append(metrics.onset_f1([n._replace(start_qn=n.start_qn + width_qn) for n in before], truth))
    assert np.mean(found) > np.mean(previous) + 0.2


@pytest.mark.parametrize("path", POP909_FIXTURES, ids=lambda p: p.stem)
def test_the_notes_a_range_already_holds_are_not_offered_back(path):
    """Rewriting the second chorus must not give back the first, which is what the range holds."""
    song, spans = ranges(path)
    for start_qn, end_qn in spans:
        own = [n for t in TARGETS for n in song.tracks[t].notes if start_qn <= n.start_qn < end_qn]
        repeat = find_repeat(song, start_qn, end_qn, TARGETS)
        if repeat is not None:
            assert metrics.onset_f1(all_notes(repeat.notes), own) < SAME_CONTENT + 0.05


def test_a_song_that_never_repeats_itself_has_no_repeat():
    """The same song with every note's pitch drawn at random: no section matches another."""
    song, spans = ranges(POP909_FIXTURES[1])
    rng = np.random.default_rng(0)
    shuffled = replace(song, tracks=[replace(t, notes=[n._replace(pitch=int(rng.integers(40, 90))) for n in t.notes])
                                     for t in song.tracks])
    for start_qn, end_qn in spans:
        masked, _ = hidden(shuffled, start_qn, end_qn)
        assert find_repeat(masked, start_qn, end_qn, TARGETS) is None


@pytest.fixture(scope="module")
def engine():
    return Engine(default_model_dir())


def test_infills_of_repeated_bars_follow_the_repeat_and_keep_every_control(engine):
    song, spans = ranges(POP909_FIXTURES[1])
    followed, alone = [], []
    for start_qn, end_qn in spans[:4]:
        masked, truth = hidden(song, start_qn, end_qn)
        guided = engine.infill(masked, start_qn, end_qn, TARGETS, InfillOptions(seed=1))
        free = engine.infill(masked, start_qn, end_qn, TARGETS, InfillOptions(seed=1, follow_repeat=0.0))
        assert guided.repeat is not None and free.repeat is None
        followed.append(metrics.onset_f1(all_notes(guided.candidates[0].notes), truth))
        alone.append(metrics.onset_f1(all_notes(free.candidates[0].notes), truth))
        for track, notes in guided.candidates[0].notes.items():
            controls = guided.controls[track]
            assert all(controls.pitch_range[0] <= n.pitch <= controls.pitch_range[1] for n in notes)
            assert musicality.max_polyphony(notes) <= controls.max_polyphony
            if controls.grid is not None and notes:
                assert musicality.on_grid(np.array([n.start_qn for n in notes]),
                                          musicality.Grid(controls.grid.step_qn, controls.grid.phase_qn)).all()
    assert np.mean(followed) > np.mean(alone) + 0.3


def test_follow_repeat_is_checked_on_the_wire_and_in_the_engine():
    assert schema.parse_options({"follow_repeat": 0.5}, Limits(), []).follow_repeat == 0.5
    with pytest.raises(ProtocolError, match="follow_repeat"):
        schema.parse_options({"follow_repeat": 1.5}, Limits(), [])
    with pytest.raises(CMIError, match="follow_repeat"):
        InfillOptions(follow_repeat=-0.1)


def test_the_infill_command_says_which_repeat_it_followed(tmp_path, capsys, monkeypatch):
    """`cmi-daemon infill --json` names the section it followed, and none with --follow-repeat 0."""
    from cmi_daemon.cli.main import main

    monkeypatch.setenv("CMI_HOME", str(tmp_path / "home"))
    path = POP909_FIXTURES[1]
    song = read_midi(path)
    start_qn, end_qn = song.meter.bar_range_qn(33, 36)
    expected = find_repeat(song, start_qn, end_qn, TARGETS)
    reports = []
    for index, follow in enumerate(("1", "0")):
        assert main(["infill", str(path), "--bars", "33-36", "--seed", "1", "--follow-repeat", follow,
                     "-o", str(tmp_path / f"out{index}.mid"), "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert expected is not None and reports[0]["repeat"]["offset_qn"] == expected.offset_qn
    assert reports[1]["repeat"] is None
