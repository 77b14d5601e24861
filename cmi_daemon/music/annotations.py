"""Dataset annotations: POP909 beat files -> downbeat times, the bar lines of songs whose MIDI meter is unreliable."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .tokens import Song

BEAT_FILE_NAME = "beat_midi.txt"


def pop909_downbeats_s(beat_file) -> list[float]:
    """Downbeat times in seconds from a POP909 `beat_midi.txt` (third column: quadruple-meter downbeat)."""
    downbeats = []
    for number, line in enumerate(Path(beat_file).read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise ValueError(f"{beat_file}:{number}: expected 'time duple_flag quadruple_flag', got {line!r}")
        if float(fields[2]) == 1.0:
            downbeats.append(float(fields[0]))
    return downbeats


def bar_lines_qn(song: Song, midi_path: Path) -> tuple[list[float], str]:
    """Bar lines in QN and where they come from: the POP909 beat file beside the MIDI file when
    there is one (bars run between consecutive annotated downbeats; POP909's MIDI time signatures
    do not match its bars), else the song's meter, closed by the end of its last bar."""
    beat_file = Path(midi_path).parent / BEAT_FILE_NAME
    if beat_file.exists():
        downbeats_ms = np.asarray(pop909_downbeats_s(beat_file)) * 1000.0
        return [float(q) for q in np.atleast_1d(song.tempo_map.qn_at(downbeats_ms))], BEAT_FILE_NAME
    downbeats = song.meter.downbeats_qn(song.end_qn)
    return downbeats + [song.meter.bar_start_qn(len(downbeats) + 1)], "meter"
