"""Offline infilling of a MIDI file (`cmi-daemon infill`): bars and tracks as a musician names them.

Bars are counted from 1 with the file's own time signatures; tracks are numbered from 1 in the
order `cmi-daemon infill FILE --list-tracks` prints. With several candidates, candidate 1 goes
to the output path and candidate k to `<stem>-k<suffix>` next to it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from .errors import CMIError
from .tokens import Note, Song

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"
_BARS = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def default_model_dir() -> Path:
    """The bundle shipped inside the package; a clear error while none is installed."""
    if not (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        raise CMIError(f"no default model is installed ({DEFAULT_MODEL_DIR} holds no bundle): pass --model DIR, "
                       "a bundle folder made with `python -m export CHECKPOINT --out DIR`")
    return DEFAULT_MODEL_DIR


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


def song_with_notes(song: Song, start_qn: float, end_qn: float, new_notes: dict[int, list[Note]]) -> Song:
    """The song with each named track's notes that start in [start_qn, end_qn) replaced by new_notes."""
    tracks = []
    for index, track in enumerate(song.tracks):
        if index in new_notes:
            kept = [n for n in track.notes if not start_qn <= n.start_qn < end_qn]
            track = replace(track, notes=sorted(kept + list(new_notes[index])))
        tracks.append(track)
    return replace(song, tracks=tracks)


def candidate_paths(out_path: Path, n_candidates: int) -> list[Path]:
    """out.mid, out-2.mid, out-3.mid ..."""
    return [out_path] + [out_path.with_name(f"{out_path.stem}-{k}{out_path.suffix}") for k in range(2, n_candidates + 1)]


def notes_json(notes: Sequence[Note]) -> list[dict]:
    return [{"start_qn": round(n.start_qn, 6), "duration_qn": round(n.duration_qn, 6), "pitch": n.pitch,
             "velocity": n.velocity} for n in notes]
