"""Notes as a DAW holds them (position and length in quarter notes) and the one rule for degenerate notes.

The MIDI reader (`tokens.read_midi`), the daemon's request validation (`schema`) and the Python
client (`client.infill_content`) all apply `normalize_notes`, so a song infilled offline and the
same song sent to the daemon are the same notes. Standard library only: the client runs inside a
DAW's Python.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence


class Note(NamedTuple):
    """A note as a DAW holds it: position and length in quarter notes."""

    start_qn: float
    duration_qn: float
    pitch: int
    velocity: int


def normalize_notes(notes: Iterable[Sequence]) -> tuple[list[Note], int]:
    """One track's notes (start_qn, duration_qn, pitch, velocity) under the rule of docs/protocol.md
    ("Degenerate notes"), sorted; and how many notes were merged into others.

    Notes of the same pitch starting at the same position are one note, with the longest of their
    lengths and the loudest of their velocities (a doubled note-on plays one note). A note of length
    zero (note-on and note-off at one tick, as drum files write hits) is kept as it is. A negative
    length is a ValueError: no file or DAW holds one.
    """
    merged: dict[tuple[float, int], Note] = {}
    n_notes = 0
    for values in notes:
        note = Note(*values)
        n_notes += 1
        if note.duration_qn < 0:
            raise ValueError(f"the note of pitch {note.pitch} at {note.start_qn:g} QN has a negative length "
                             f"({note.duration_qn:g} QN)")
        key = (note.start_qn, note.pitch)
        kept = merged.get(key)
        if kept is not None:
            note = kept._replace(duration_qn=max(kept.duration_qn, note.duration_qn),
                                 velocity=max(kept.velocity, note.velocity))
        merged[key] = note
    return sorted(merged.values()), n_notes - len(merged)
