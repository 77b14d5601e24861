"""The range sweep: every bar range of real songs builds a region, a sample infills, failures are
summarised by cause with a nonzero exit code."""

import re
import shutil

import pytest

from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.tokens import read_midi
from conftest import ALL_FIXTURES, FIXTURES, POP909_FIXTURES, shared_data
from training.eval import sweep_infills


def expected_regions(paths, widths):
    """Ranges of whole bars times target sets (all tracks, then each track when there are several)."""
    total = 0
    for path in paths:
        song = read_midi(path)
        n_lines = len(bar_lines_qn(song, path)[0])
        n_sets = 1 + len(song.tracks) if len(song.tracks) > 1 else 1
        total += sum(max(0, n_lines - width) for width in widths) * n_sets
    return total


def test_every_bar_range_of_the_fixtures_builds_and_a_sample_infills(capsys):
    assert sweep_infills.main(["--data", str(FIXTURES), "--sample-infills", "3", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"5 of 5 files read; {expected_regions(ALL_FIXTURES, (1, 2, 4, 8))} regions built" in out
    assert "3 of 3 sampled infills done" in out and "no failures" in out


def test_failures_are_counted_by_cause_with_an_example_and_exit_code_1(tmp_path, capsys):
    shutil.copy(POP909_FIXTURES[0], tmp_path / "song.mid")
    for name in ("broken-1.mid", "broken-22.mid"):
        (tmp_path / name).write_bytes(b"MThd\x00\x00\x00\x06\x00\x01")
    assert sweep_infills.main(["--data", str(tmp_path), "--widths", "2", "--sample-infills", "0",
                               "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert f"1 of 3 files read; {expected_regions([tmp_path / 'song.mid'], (2,))} regions built" in out
    assert re.search(r"\n +2  read: MidiFileError: .*\n +first: .*broken-1\.mid", out), out


@pytest.mark.parametrize("arguments", [["--widths", "0"], ["--widths", "two"], ["--sample-infills", "-1"]])
def test_bad_arguments_exit_with_code_2(arguments, capsys):
    with pytest.raises(SystemExit) as stop:
        sweep_infills.main(["--data", str(FIXTURES), *arguments])
    assert stop.value.code == 2
    assert arguments[0] in capsys.readouterr().err


@pytest.mark.slow
def test_first_pop909_train_songs_build_every_range():
    """A few songs only (train/008 among them, whose bar 24 raised), so that it stays quick."""
    data = shared_data("pop909/train")
    assert sweep_infills.main(["--data", str(data), "--glob", "*/*.mid", "--songs", "8", "--widths", "1,2",
                               "--sample-infills", "0", "--no-progress"]) == 0
