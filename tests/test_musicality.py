"""The musicality measurements: grid detection on real quantized and human-played MIDI, polyphony
against a brute-force count, and the command end to end on the fixture songs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cmi_daemon.music.tokens import Note, read_midi
from training.eval import musicality
from conftest import FIXTURES, GROOVE_FIXTURES, POP909_FIXTURES


@pytest.mark.parametrize("path", POP909_FIXTURES, ids=lambda p: p.name)
def test_pop909_tracks_are_found_on_a_16th_note_grid_or_coarser(path):
    song = read_midi(path)
    for track in song.tracks:
        onsets = np.array([n.start_qn for n in track.notes])
        grid = musicality.context_grid(onsets)
        assert grid is not None and grid.step_qn >= 0.125, track.name
        assert musicality.on_grid(onsets, grid).mean() >= musicality.QUANTIZED_SHARE


@pytest.mark.parametrize("path", GROOVE_FIXTURES, ids=lambda p: p.name)
def test_human_drumming_has_no_grid(path):
    onsets = np.array([n.start_qn for n in read_midi(path).tracks[0].notes])
    assert musicality.context_grid(onsets) is None


def test_random_onsets_land_on_a_grid_a_quarter_of_the_time():
    onsets = np.random.default_rng(0).uniform(0, 400, 20_000)
    for step_qn in (0.25, 1 / 3):
        share = musicality.on_grid(onsets, musicality.Grid(step_qn, 0.07)).mean()
        assert share == pytest.approx(2 * musicality.GRID_TOLERANCE, abs=0.02)


def test_grid_phase_follows_an_offset_song():
    onsets = np.arange(64) * 0.25 + 0.1
    grid = musicality.context_grid(onsets)
    assert grid.step_qn == 0.25 and musicality.on_grid(onsets, grid).all()
    assert not musicality.on_grid(onsets + 0.125, grid).any()


def test_polyphony_matches_a_brute_force_count():
    song = read_midi(POP909_FIXTURES[0])
    for track in song.tracks:
        notes = [n for n in track.notes if n.start_qn < 40]
        ends = [n.start_qn + n.duration_qn for n in notes]
        probes = sorted({n.start_qn for n in notes})
        brute = max(sum(n.start_qn <= t < end for n, end in zip(notes, ends)) for t in probes)
        assert musicality.max_polyphony(notes) == brute
    assert musicality.max_polyphony([Note(0, 1, 60, 90), Note(1, 1, 62, 90)]) == 1


def test_notes_sounding_to_the_range_end_are_counted_as_held():
    context = [Note(float(q), 0.5, 60, 80) for q in range(16)]
    new = [Note(16.0, 1.0, 62, 80), Note(17.0, 3.0, 64, 80), Note(18.5, 2.5, 65, 80), Note(19.0, 0.25, 67, 80)]
    judged = musicality.judge_track(context, context[:4], new, end_qn=20.0)
    assert judged.n_held_to_end == 2  # ending at QN 20 and past it (the truth's notes may run on)
    assert musicality.judge_track(context, context[:4], new, end_qn=21.0).n_held_to_end == 1


def test_command_on_the_fixture_songs(tmp_path, capsys):
    out = tmp_path / "musicality.json"
    assert musicality.main(["--data", str(FIXTURES / "pop909"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["protocol"]["songs"] == len(POP909_FIXTURES)
    truth = result["summaries"][musicality.GROUND_TRUTH]
    model = result["summaries"][musicality.MODEL]
    for setting in musicality.SETTINGS:
        assert truth[setting]["median_count_ratio"] == 1.0
        assert truth[setting]["median_duration_ratio"] == 1.0
        assert model[setting]["tracks"] == truth[setting]["tracks"] > 0
    assert truth["melody alone"]["tracks"] == len(POP909_FIXTURES)
    assert truth["melody alone"]["on_context_grid"] >= 0.9
    table = capsys.readouterr().out
    assert "| model | melody alone |" in table and "| ground truth | all tracks |" in table
