"""`cmi-daemon infill` end to end: a valid MIDI file out, the rest of the song untouched, clear errors."""

from __future__ import annotations

import json

import pytest

from cmi_daemon import offline
from cmi_daemon.cli import main
from cmi_daemon.tokens import read_midi
from conftest import POP909_FIXTURES
from tiny_bundle import tiny_bundle_dir

SONG = POP909_FIXTURES[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(tiny_bundle_dir(tmp_path_factory))


def test_infill_writes_the_song_with_only_the_range_of_the_targets_changed(model, tmp_path, capsys):
    out = tmp_path / "out.mid"
    before = SONG.read_bytes()
    assert main(["infill", str(SONG), "--bars", "9-12", "--tracks", "1,3", "--seed", "5", "--model", model,
                 "-o", str(out), "--json"]) == 0
    assert SONG.read_bytes() == before
    report = json.loads(capsys.readouterr().out)
    original, infilled = read_midi(SONG), read_midi(out)
    start_qn, end_qn = original.meter.bar_range_qn(9, 12)
    assert (report["start_qn"], report["end_qn"], report["seed"]) == (start_qn, end_qn, 5)
    assert len(infilled.tracks) == len(original.tracks)
    for index, (old, new) in enumerate(zip(original.tracks, infilled.tracks)):
        outside = [n for n in new.notes if not start_qn <= n.start_qn < end_qn]
        assert outside == [n for n in old.notes if not start_qn <= n.start_qn < end_qn]
        if index not in (0, 2):
            assert new.notes == old.notes
    new_notes = report["candidates"][0]["tracks"]
    assert set(new_notes) == {"1", "3"}
    for notes in new_notes.values():
        assert all(start_qn <= n["start_qn"] < end_qn for n in notes)
    inside = [n for i in (0, 2) for n in infilled.tracks[i].notes if start_qn <= n.start_qn < end_qn]
    assert len(inside) == sum(len(notes) for notes in new_notes.values())


def test_several_candidates_go_to_numbered_files(model, tmp_path, capsys):
    out = tmp_path / "take.mid"
    assert main(["infill", str(SONG), "--bars", "5", "--candidates", "3", "--model", model, "-o", str(out)]) == 0
    summary = capsys.readouterr().out
    for path in offline.candidate_paths(out, 3):
        assert path.exists() and str(path) in summary
        read_midi(path)
    assert (tmp_path / "take-3.mid").exists()


def test_list_tracks_numbers_them_from_one(capsys):
    assert main(["infill", str(SONG), "--list-tracks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["1", read_midi(SONG).tracks[0].name]


@pytest.mark.parametrize("arguments, message", [
    (["--bars", "0-2"], "counted from 1"),
    (["--bars", "12-9"], "last bar comes before the first"),
    (["--bars", "nine"], "write a bar or a range"),
    (["--bars", "900"], "starts after the song ends"),
    (["--bars", "9", "--tracks", "7"], "there is no track 7"),
    (["--bars", "9", "--tracks", "a,b"], "track numbers separated by commas"),
    (["--bars", "9", "--candidates", "0"], "candidates"),
])
def test_bad_requests_exit_2_with_a_clear_message(model, tmp_path, capsys, arguments, message):
    out = tmp_path / "out.mid"
    assert main(["infill", str(SONG), *arguments, "--model", model, "-o", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("cmi-daemon: error:") and not out.exists()


def test_a_bad_model_folder_exits_2(tmp_path, capsys):
    assert main(["infill", str(SONG), "--bars", "9", "--model", str(tmp_path), "-o", str(tmp_path / "o.mid")]) == 2
    assert "missing file manifest.json" in capsys.readouterr().err


def test_without_a_default_model_the_error_says_to_pass_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(offline, "DEFAULT_MODEL_DIR", tmp_path / "none")
    assert main(["infill", str(SONG), "--bars", "9", "-o", str(tmp_path / "o.mid")]) == 2
    assert "pass --model DIR" in capsys.readouterr().err
