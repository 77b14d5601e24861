"""`cmi-daemon infill` end to end: the input file with only the infilled notes changed, the user's
files never overwritten unasked, clear errors."""

from __future__ import annotations

import json
import os
import signal

import mido
import pytest

from cmi_daemon import paths
from cmi_daemon.cli import offline
from cmi_daemon.cli.main import main
from cmi_daemon.music.tokens import read_midi
from conftest import POP909_FIXTURES
from daemon_support import start_daemon_process
from midi_events import assert_only_replaced
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
    song = read_midi(SONG)
    start_qn, end_qn = song.meter.bar_range_qn(9, 12)
    assert (report["start_qn"], report["end_qn"], report["seed"]) == (start_qn, end_qn, 5)
    new_notes = report["candidates"][0]["tracks"]
    assert set(new_notes) == {"1", "3"}
    original = mido.MidiFile(SONG)
    tpq = original.ticks_per_beat
    # MELODY and PIANO: MIDI tracks 1 and 3 after the tempo track, channels 0 and 2 (checked on the file)
    assert [(original.tracks[i].name, {m.channel for m in original.tracks[i] if m.type == "note_on"})
            for i in (1, 3)] == [("MELODY", {0}), ("PIANO", {2})]
    sources = {(midi_track, channel): [(round(n["start_qn"] * tpq), round((n["start_qn"] + n["duration_qn"]) * tpq),
                                        n["pitch"], n["velocity"]) for n in new_notes[number]]
               for number, midi_track, channel in (("1", 1, 0), ("3", 3, 2))}
    assert all(notes for notes in sources.values())
    assert_only_replaced(original, mido.MidiFile(out), round(start_qn * tpq), round(end_qn * tpq), sources)


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
    monkeypatch.setattr(paths, "DEFAULT_MODEL_DIR", tmp_path / "none")
    assert main(["infill", str(SONG), "--bars", "9", "-o", str(tmp_path / "o.mid")]) == 2
    assert "pass --model DIR" in capsys.readouterr().err


def _refused(capsys, arguments, *words):
    assert main(["infill", str(SONG), "--bars", "9", *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("cmi-daemon: error:") and error.count("\n") == 1, error
    for word in words:
        assert word in error, error


def test_the_input_file_is_never_the_output_without_force(tmp_path, capsys):
    song = tmp_path / "songs" / "song.mid"
    song.parent.mkdir()
    song.write_bytes(SONG.read_bytes())
    (tmp_path / "link.mid").symlink_to(song)
    os.link(song, tmp_path / "hard.mid")
    spellings = [song, tmp_path / "songs" / ".." / "songs" / "song.mid", tmp_path / "link.mid", tmp_path / "hard.mid"]
    for output in spellings:  # no model is loaded: the paths are checked first
        assert main(["infill", str(song), "--bars", "9", "--model", str(tmp_path / "none"), "-o", str(output)]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "is the input file; pass --force" in error, error
    assert song.read_bytes() == SONG.read_bytes()


def test_existing_outputs_are_refused_before_the_model_runs(tmp_path, capsys):
    out = tmp_path / "take.mid"
    (tmp_path / "take-2.mid").write_bytes(b"mine")
    _refused(capsys, ["--candidates", "2", "--model", str(tmp_path / "none"), "-o", str(out)],
             "take-2.mid (candidate 2) exists; pass --force")
    assert not out.exists() and (tmp_path / "take-2.mid").read_bytes() == b"mine"
    out.write_bytes(b"mine too")
    _refused(capsys, ["--model", str(tmp_path / "none"), "-o", str(out)], f"-o {out} exists; pass --force")
    assert out.read_bytes() == b"mine too"


def test_force_overwrites_and_a_link_keeps_pointing_at_the_new_file(model, tmp_path, capsys):
    song = tmp_path / "song.mid"
    song.write_bytes(SONG.read_bytes())
    target = tmp_path / "kept.mid"
    target.write_bytes(b"old")
    (tmp_path / "out.mid").symlink_to(target)
    assert main(["infill", str(song), "--bars", "9", "--seed", "1", "--model", model, "-o", str(tmp_path / "out.mid"),
                 "--force"]) == 0
    assert (tmp_path / "out.mid").is_symlink() and read_midi(target).tracks
    assert main(["infill", str(song), "--bars", "9", "--seed", "1", "--model", model, "-o", str(song), "--force"]) == 0
    assert song.read_bytes() == target.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_unwritable_outputs_get_one_line(tmp_path, capsys):
    (tmp_path / "file.mid").write_bytes(b"x")
    for output, words in [(tmp_path, "is a folder"), (tmp_path / "no" / "out.mid", "folder " + str(tmp_path / "no")),
                          (tmp_path / "file.mid" / "out.mid", "is a file, not a folder"),
                          ("/dev/null", "not a regular file")]:
        _refused(capsys, ["--model", str(tmp_path / "none"), "-o", str(output), "--force"], words)
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a user whom folder permissions bind "
                    "(root writes anywhere)")
def test_a_folder_without_write_permission_is_refused(tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    _refused(capsys, ["--model", str(tmp_path / "none"), "-o", str(folder / "out.mid")], "no permission")


@pytest.mark.slow
def test_the_daemon_path_writes_the_same_way(model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.mid"
    out.write_bytes(b"mine")
    monkeypatch.setenv("CMI_HOME", str(tmp_path / "home"))
    _refused(capsys, ["--daemon", "-o", str(out)], "exists; pass --force")  # before asking any daemon
    process = start_daemon_process(tmp_path / "home", model)
    try:
        assert main(["infill", str(SONG), "--daemon", "--bars", "9-10", "--tracks", "3", "--seed", "2",
                     "-o", str(out), "--force"]) == 0, capsys.readouterr().err
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(30)
    original = mido.MidiFile(SONG)
    start_qn, end_qn = read_midi(SONG).meter.bar_range_qn(9, 10)
    assert_only_replaced(original, mido.MidiFile(out), round(start_qn * 480), round(end_qn * 480), {(3, 2): None})
