"""Dataset annotations: POP909 beat files -> downbeat times, the bar lines of songs whose MIDI meter is unreliable."""

from __future__ import annotations

from pathlib import Path


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
