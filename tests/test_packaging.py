"""The wheel: what `pip install cmi-daemon` gets must run the daemon, benchmark the model and install
both DAW bridges without a clone of the repository next to it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cmi_daemon.cli import install_ableton, install_reaper
from cmi_daemon.inference import measure
from tiny_bundle import tiny_bundle_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "node_modules", "runs",
                                     "__pycache__", ".pytest_cache", ".hypothesis")
"""What a copy of the checkout leaves out: build outputs and local state (an old build/ folder in the
checkout could slip files that no longer exist into the wheel)."""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, unpacked into a folder of its own with pip."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (the test extra has it)")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(REPO, source, ignore=NOT_SOURCES)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(work / "dist"), str(source)], check=True, capture_output=True, timeout=600)
    wheel, = (work / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"cmi_daemon/bridges/reaper/{name}" for name in install_reaper.SCRIPT_FILES} <= names
    assert {f"cmi_daemon/bridges/ableton/{name}" for name in install_ableton.DEVICE_FILES} <= names
    assert "cmi_daemon/models/default/manifest.json" in names
    songs = REPO / "cmi_daemon" / "data" / "bench_songs"
    assert {f"cmi_daemon/data/bench_songs/{path.relative_to(songs).as_posix()}"
            for path in songs.rglob("*") if path.is_file()} <= names
    assert not any(name.startswith(("bridges/", "tests/", "training/")) for name in names)
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return target


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`cmi-daemon ARGS` from the installed wheel alone, in a folder with no checkout in it."""
    env = {**os.environ, "PYTHONPATH": str(site), "CMI_HOME": str(cwd / "cmi-home")}
    return subprocess.run([sys.executable, "-m", "cmi_daemon.cli.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_wheel_installs_the_reaper_actions_and_the_live_device(installed, tmp_path):
    resource, library = tmp_path / "REAPER", tmp_path / "User Library"
    resource.mkdir()
    (resource / "reaper.ini").write_text("[REAPER]\nreascript=1\n")
    library.mkdir()

    reaper = run_installed(installed, tmp_path, "install", "reaper", "--path", str(resource))
    assert reaper.returncode == 0, reaper.stderr
    for name in install_reaper.SCRIPT_FILES:
        copied = resource / "Scripts" / "CMI" / name
        assert copied.read_bytes() == (REPO / "bridges" / "reaper" / name).read_bytes()
    recorded = json.loads((resource / "Scripts" / "CMI" / "cmi_python.json").read_text())
    assert str(installed) in recorded["sys_path"], "the actions import CMI from where it is installed"

    ableton = run_installed(installed, tmp_path, "install", "ableton", "--path", str(library), "--no-npm")
    assert ableton.returncode == 0, ableton.stderr
    device = install_ableton.device_folder(library)
    for name in install_ableton.DEVICE_FILES:
        assert (device / name).read_bytes() == (REPO / "bridges" / "ableton" / name).read_bytes()


def test_the_wheel_benchmarks_the_songs_it_ships(installed, tmp_path, tmp_path_factory):
    found = subprocess.run([sys.executable, "-c", "from cmi_daemon.inference import measure; "
                            "print('\\n'.join(str(p) for p in measure.song_files(measure.BENCH_SONGS_DIR)))"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(installed)}, capture_output=True,
                           text=True, timeout=120)
    assert found.returncode == 0, found.stderr
    songs = [Path(line) for line in found.stdout.split()]
    assert [path.name for path in songs] == [path.name for path in measure.song_files(measure.BENCH_SONGS_DIR)]
    assert songs and all(path.is_relative_to(installed) for path in songs), "the songs come from the wheel"
    assert all((path.parent / "beat_midi.txt").is_file() for path in songs)
    assert {"LICENSE", "README.md"} <= {path.name for path in songs[0].parent.parent.iterdir()}

    measured = run_installed(installed, tmp_path, "bench", "--model", str(tiny_bundle_dir(tmp_path_factory)),
                             "--repeats", "1")
    assert measured.returncode == 0, measured.stderr
    assert "2-bar infill" in measured.stdout and f"on {len(songs)} songs: p50" in measured.stdout
