"""The `cmi-daemon` command as a user runs it: help, tokens, and clear errors without tracebacks."""

import subprocess
import sys

import pytest

from cmi_daemon.music import vocab
from conftest import POP909_FIXTURES, REPO

pytestmark = pytest.mark.slow


def run(*args):
    return subprocess.run([sys.executable, "-m", "cmi_daemon.cli.main", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_help_lists_the_commands():
    result = run("--help")
    assert result.returncode == 0
    assert "tokens" in result.stdout


def test_tokens_prints_text_counts_and_duration():
    result = run("tokens", POP909_FIXTURES[0])
    assert result.returncode == 0, result.stderr
    ids = vocab.text_to_ids(result.stdout)
    assert len(ids) > 1000
    assert f"tokens: {len(ids)}" in result.stderr
    assert "duration:" in result.stderr and "notes:" in result.stderr


def test_tokens_ids_and_limit():
    result = run("tokens", POP909_FIXTURES[0], "--ids", "--limit", "5")
    assert len(result.stdout.split()) == 5
    assert all(0 <= int(t) < vocab.VOCAB_SIZE for t in result.stdout.split())


@pytest.mark.parametrize("content, message", [
    (b"not a midi file at all", "not a standard MIDI file"),
    (POP909_FIXTURES[0].read_bytes()[:200], "truncated"),
])
def test_bad_files_exit_2_with_one_line_and_no_traceback(tmp_path, content, message):
    path = tmp_path / "bad.mid"
    path.write_bytes(content)
    result = run("tokens", path)
    assert result.returncode == 2
    assert message in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_file_exits_2():
    result = run("tokens", "no-such-song.mid")
    assert result.returncode == 2 and "no such file" in result.stderr
