"""Offline infilling of a MIDI file (`cmi-daemon infill`): bars and tracks as a musician names them.

Bars are counted from 1 with the file's own time signatures; tracks are numbered from 1 in the
order `cmi-daemon infill FILE --list-tracks` prints. With several candidates, candidate 1 goes
to the output path and candidate k to `<stem>-k<suffix>` next to it. Each is a copy of the input
file with only the replaced notes changed (`midi_edit`), written atomically; no existing file, the
input least of all, is overwritten without --force, and every output path is checked before the
model runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import mido

from ..errors import CMIError
from ..files import write_bytes_atomic
from ..music import midi_edit
from ..music.tokens import Note, Song, open_midi, read_midi

_BARS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def parse_bars(text: str, song: Song) -> tuple[int, int, float, float]:
    """"9-12" or "9" -> (first bar, last bar, start_qn, end_qn); bars must start before the song ends."""
    match = _BARS.match(text)
    if not match:
        raise CMIError(f"--bars {text!r}: write a bar or a range of bars, e.g. 9 or 9-12 (bar 1 is the first)")
    first = int(match.group(1))
    last = int(match.group(2) or first)
    if first < 1:
        raise CMIError(f"--bars {text}: bars are counted from 1")
    if last < first:
        raise CMIError(f"--bars {text}: the last bar comes before the first")
    start_qn, end_qn = song.meter.bar_range_qn(first, last)
    n_bars = int(song.meter.bar_at_qn(song.end_qn)) if song.end_qn > 0 else 0
    if start_qn >= song.end_qn:
        raise CMIError(f"--bars {text}: bar {first} starts after the song ends (it has {n_bars} bars)")
    return first, last, start_qn, end_qn


def parse_tracks(text: str | None, song: Song) -> tuple[int, ...]:
    """"1,3" (numbered from 1) -> track indices; None -> every track with notes."""
    if text is None:
        tracks = tuple(i for i, track in enumerate(song.tracks) if track.notes)
        if not tracks:
            raise CMIError("the file has no notes to infill around")
        return tracks
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise CMIError(f"--tracks {text!r}: write track numbers separated by commas, e.g. 1,3") from error
    if not numbers:
        raise CMIError(f"--tracks {text!r}: name at least one track")
    for number in numbers:
        if not 1 <= number <= len(song.tracks):
            raise CMIError(f"--tracks {text}: there is no track {number}; the file has tracks 1-{len(song.tracks)} "
                           "(see --list-tracks)")
    return tuple(sorted({number - 1 for number in numbers}))


def track_lines(song: Song) -> list[str]:
    lines = []
    for number, track in enumerate(song.tracks, start=1):
        kind = "drums" if track.is_drum else f"program {track.program}"
        lines.append(f"{number:>3}  {track.name}  ({kind}, {len(track.notes)} notes)")
    return lines


def read_input(path) -> tuple[mido.MidiFile, Song]:
    """The input file, parsed once: as MIDI messages (to write the infill into) and as a Song."""
    midi = open_midi(path, str(path))
    return midi, read_midi(midi, str(path))


def candidate_paths(out_path: Path, n_candidates: int) -> list[Path]:
    """out.mid, out-2.mid, out-3.mid ..."""
    return [out_path] + [out_path.with_name(f"{out_path.stem}-{k}{out_path.suffix}")
                         for k in range(2, n_candidates + 1)]


def output_paths(input_path, output, n_candidates: int, force: bool) -> list[Path]:
    """The candidates' paths (candidate_paths), checked before any work is done.

    Refused: a folder; a folder that does not exist or cannot be written to; anything but a
    regular file where one exists; and, unless force, the input file (through any link or
    spelling) or any other existing file. Paths are compared as the files they name.
    """
    paths = candidate_paths(Path(output), max(1, n_candidates))
    named: dict[Path, Path] = {}
    for number, path in enumerate(paths, start=1):
        what = f"-o {path}" if number == 1 else f"{path} (candidate {number})"
        target = Path(os.path.realpath(path))
        if target.is_dir():
            raise CMIError(f"{what} is a folder: name the .mid file to write")
        if not target.parent.is_dir():
            raise CMIError(f"{what}: {path.parent} is a file, not a folder" if target.parent.exists() else
                           f"{what}: the folder {path.parent} does not exist")
        if not os.access(target.parent, os.W_OK | os.X_OK):
            raise CMIError(f"{what}: no permission to write in the folder {path.parent}")
        if target in named:
            raise CMIError(f"{what} is the same file as {named[target]}")
        named[target] = path
        if target.exists():
            if not target.is_file():
                raise CMIError(f"{what} exists and is not a regular file")
            if not force:
                same = os.path.exists(input_path) and os.path.samefile(target, input_path)
                raise CMIError(f"{what} is the input file; pass --force to overwrite it" if same else
                               f"{what} exists; pass --force to overwrite it")
    return paths


def write_candidates(midi: mido.MidiFile, label: str, start_qn: float, end_qn: float,
                     candidates: Sequence[Mapping[int, Sequence[Note]]], paths: Sequence[Path]) -> None:
    """Each candidate's new notes (track index -> notes) written into a copy of midi at its path,
    atomically; a link at the path is followed and the file it names replaced. Every file is made
    before the first is written, so a candidate that cannot be made (MidiFileError) leaves none behind."""
    files = [midi_edit.replaced_midi_bytes(midi, start_qn, end_qn, notes, label) for notes in candidates]
    for data, path in zip(files, paths):
        try:
            write_bytes_atomic(os.path.realpath(path), data, make_folders=False)
        except OSError as error:
            raise CMIError(f"cannot write {path}: {error.strerror or error}") from error


def notes_json(notes: Sequence[Note]) -> list[dict]:
    return [{"start_qn": round(n.start_qn, 6), "duration_qn": round(n.duration_qn, 6), "pitch": n.pitch,
             "velocity": n.velocity} for n in notes]
