"""`cmi-daemon install ableton` against a temporary User Library: install, npm, uninstall, refusals."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from cmi_daemon.cli import main as cli, install_ableton
from cmi_daemon.errors import CMIError

SOURCE = Path(__file__).resolve().parent.parent / "bridges" / "ableton"


@pytest.fixture
def user_library(tmp_path):
    library = tmp_path / "User Library"
    library.mkdir()
    return library


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """An `npm` first on PATH that records where and how it ran."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "npm.log"
    npm = bin_dir / "npm"
    npm.write_text(f'#!/bin/sh\necho "$PWD" >> "{log}"\necho "$*" >> "{log}"\nmkdir -p node_modules/zeromq\n')
    npm.chmod(npm.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.skipif(os.name == "nt", reason="the fake npm is a shell script")
def test_install_copies_the_device_runs_npm_and_uninstall_removes_it(user_library, fake_npm, capsys):
    assert cli.main(["install", "ableton", "--path", str(user_library), "--source", str(SOURCE)]) == 0
    target = user_library / "Presets" / "MIDI Effects" / "Max MIDI Effect" / "CMI"
    for name in install_ableton.DEVICE_FILES:
        assert (target / name).read_bytes() == (SOURCE / name).read_bytes(), name
    assert fake_npm.read_text().splitlines() == [str(target), "ci --omit=dev --no-audit --no-fund"]
    assert (target / "node_modules" / "zeromq").is_dir()
    assert "drag CMI.amxd onto a MIDI track" in capsys.readouterr().out

    assert cli.main(["install", "ableton", "--path", str(user_library), "--uninstall"]) == 0
    assert not target.exists()
    assert user_library.is_dir()
    assert "removed the CMI device" in capsys.readouterr().out


def test_uninstall_keeps_files_it_did_not_install(user_library, capsys):
    assert cli.main(["install", "ableton", "--path", str(user_library), "--source", str(SOURCE), "--no-npm"]) == 0
    assert "npm ci --omit=dev" in capsys.readouterr().out
    target = install_ableton.device_folder(user_library)
    (target / "my notes.txt").write_text("mine")
    assert cli.main(["install", "ableton", "--path", str(user_library), "--uninstall"]) == 0
    assert sorted(p.name for p in target.iterdir()) == ["my notes.txt"]
    assert cli.main(["install", "ableton", "--path", str(user_library), "--uninstall"]) == 0


def test_refusals(tmp_path, user_library, capsys):
    assert cli.main(["install", "ableton", "--path", str(tmp_path / "nowhere"), "--no-npm"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["install", "ableton", "--path", str(user_library), "--source", str(tmp_path), "--no-npm"]) == 2
    assert "files are missing" in capsys.readouterr().err
    if sys.platform not in ("darwin", "win32"):
        assert cli.main(["install", "ableton"]) == 2
        assert "pass --path" in capsys.readouterr().err


def test_default_source_is_the_clone_run_in(monkeypatch):
    monkeypatch.chdir(SOURCE.parent.parent)
    assert install_ableton.default_source().resolve() == SOURCE


def test_default_user_libraries(tmp_path, monkeypatch):
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "me"))
    assert install_ableton.default_user_library("darwin", tmp_path) == tmp_path / "Music" / "Ableton" / "User Library"
    assert (install_ableton.default_user_library("win32", tmp_path)
            == tmp_path / "me" / "Documents" / "Ableton" / "User Library")
    with pytest.raises(CMIError, match="pass --path"):
        install_ableton.default_user_library("linux", tmp_path)
