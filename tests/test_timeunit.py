"""Tempo-relative tokens: waits counted in quarter notes through the tempo map, end to end."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from cmi_daemon.inference.bundle import BundleError, load_bundle
from cmi_daemon.inference.engine import Engine, InfillOptions
from cmi_daemon.music import vocab
from cmi_daemon.music.tempo import TempoMap
from cmi_daemon.music.timeunit import QUARTER_NOTE_24, REAL_TIME, TimeUnit
from cmi_daemon.music.tokens import decode_ids, read_midi, tokenize
from tests.conftest import GROOVE_FIXTURES, POP909_FIXTURES
from tests.tiny_bundle import tiny_bundle_dir


def tokens(song, unit):
    return tokenize(unit.token_song(song)).ids


def test_tempo_relative_tokens_do_not_change_with_the_tempo():
    song = read_midi(POP909_FIXTURES[0])
    faster = replace(song, tempo_map=song.tempo_map.scaled(1.25))
    changing = replace(song, tempo_map=TempoMap.from_changes([(0.0, 80.0), (33.0, 133.0), (70.5, 97.0)]))
    assert tokens(faster, QUARTER_NOTE_24) == tokens(song, QUARTER_NOTE_24) == tokens(changing, QUARTER_NOTE_24)
    assert tokens(faster, REAL_TIME) != tokens(song, REAL_TIME)


@pytest.mark.parametrize("path", [POP909_FIXTURES[0], GROOVE_FIXTURES[0]], ids=lambda p: p.stem)
def test_tempo_relative_tokens_place_every_onset_within_half_a_step(path):
    song = read_midi(path)
    ids = tokens(song, QUARTER_NOTE_24)
    token_map = QUARTER_NOTE_24.token_tempo_map(song.tempo_map)
    first_qn = min(n.start_qn for t in song.tracks for n in t.notes)
    decoded_qn = token_map.qn_at([n.start_ms for n in decode_ids(ids)]) + round(first_qn * 24) / 24
    played_qn = np.array(sorted(n.start_qn for t in song.tracks for n in t.notes))
    nearest = played_qn[np.clip(np.searchsorted(played_qn, decoded_qn), 0, len(played_qn) - 1)]
    below = played_qn[np.clip(np.searchsorted(played_qn, decoded_qn) - 1, 0, len(played_qn) - 1)]
    error_qn = np.minimum(abs(nearest - decoded_qn), abs(below - decoded_qn))
    assert error_qn.max() <= 0.5 / 24 + 1e-9


def test_time_units_refuse_steps_the_tempo_map_cannot_hold():
    assert TimeUnit(8).token_tempo_map(TempoMap.constant()).bpm == (937.5,)
    for bad in (0, 7, 126, 24.0):
        with pytest.raises(ValueError, match="steps_per_qn"):
            TimeUnit(bad)


def tempo_relative_bundle(plain, folder, steps_per_qn):
    shutil.copytree(plain, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["tokenizer"]["steps_per_qn"] = steps_per_qn
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_bundle_names_its_time_unit_and_a_wrong_one_is_refused(tmp_path_factory, tmp_path):
    plain = tiny_bundle_dir(tmp_path_factory)
    assert load_bundle(plain).tokenizer.time_unit == REAL_TIME
    assert load_bundle(tempo_relative_bundle(plain, tmp_path / "qn", 24)).tokenizer.time_unit == QUARTER_NOTE_24
    with pytest.raises(BundleError, match="steps_per_qn"):
        load_bundle(tempo_relative_bundle(plain, tmp_path / "bad", 3))


def test_a_tempo_relative_model_writes_notes_on_its_steps_whatever_the_tempo(tmp_path_factory, tmp_path):
    bundle = tempo_relative_bundle(tiny_bundle_dir(tmp_path_factory), tmp_path / "qn", 24)
    song = read_midi(POP909_FIXTURES[0])
    song = replace(song, tempo_map=TempoMap.from_changes([(0.0, 71.0), (66.0, 113.0)]))
    start_qn, end_qn = song.meter.bar_range_qn(16, 18)
    result = Engine(bundle).infill(song, start_qn, end_qn, [0, 1, 2], InfillOptions(seed=5, n_candidates=2,
                                                                                    controls=None))
    notes = [n for c in result.candidates for track in c.notes.values() for n in track]
    assert notes
    for note in notes:
        assert start_qn <= note.start_qn < end_qn
        assert note.start_qn * 24 == pytest.approx(round(note.start_qn * 24), abs=1e-6)
        end_steps = (note.start_qn + note.duration_qn) * 24
        assert end_steps == pytest.approx(round(end_steps), abs=1e-6)
    # The region's clock is in steps of 1/24 QN: its length is the range's.
    region = Engine(bundle).region(song, start_qn, end_qn, [0])
    assert region.n_steps == round((end_qn - start_qn) * 24)
    assert all(vocab.is_wait(t) or vocab.is_note(t) for t in region.blank_ids)
