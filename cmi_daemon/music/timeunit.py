"""What one wait step of the tokens means: 8 ms of real time, or a fixed fraction of a quarter note.

The paper and the public RWKV-4-MIDI checkpoints count time in 8 ms steps (`vocab.WAIT_STEP_MS`):
a 16th note is 15.6 steps at 120 BPM and 20.8 at 90, so a model must learn the beat grid anew at
every tempo. A tempo-relative unit counts waits in 1/steps_per_qn of a quarter note through the
song's tempo map, so a 16th note is always the same wait token.

Both units are one mechanism: the tokenizer reads a song's notes (in QN) through a tempo map into
token time, 8 ms a step. For real time that map is the song's own; for the tempo-relative unit it
is a constant tempo at which a step of 8 ms is exactly 1/steps_per_qn of a quarter note. So a
token view of a song (`TimeUnit.token_song`) is the song with that map, its notes unchanged in QN:
regions, sampling and decoding work on it unchanged, and the notes they return are in the song's
own QN, the time a DAW and a MIDI file keep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from . import vocab
from .tempo import DEFAULT_TEMPO_BPM, MAX_TEMPO_BPM, TempoMap
from .tokens import Song

MS_PER_MINUTE = 60_000.0


@dataclass(frozen=True)
class TimeUnit:
    """None: a step is 8 ms of real time (the paper's unit); n: a step is 1/n of a quarter note."""

    steps_per_qn: Optional[int] = None

    def __post_init__(self):
        if self.steps_per_qn is not None and not (
                isinstance(self.steps_per_qn, int) and MIN_STEPS_PER_QN <= self.steps_per_qn <= MAX_STEPS_PER_QN):
            raise ValueError(f"steps_per_qn must be a whole number in {MIN_STEPS_PER_QN}..{MAX_STEPS_PER_QN}, "
                             f"not {self.steps_per_qn!r}")

    @property
    def tempo_relative(self) -> bool:
        return self.steps_per_qn is not None

    def token_tempo_map(self, tempo_map: TempoMap) -> TempoMap:
        """The map from QN to token milliseconds (8 ms a step)."""
        if self.steps_per_qn is None:
            return tempo_map
        return TempoMap.constant(MS_PER_MINUTE / (self.steps_per_qn * vocab.WAIT_STEP_MS))

    def token_song(self, song: Song) -> Song:
        """The song as the tokenizer reads it in this unit: same notes in QN, token-time tempo map."""
        if self.steps_per_qn is None:
            return song
        return replace(song, tempo_map=self.token_tempo_map(song.tempo_map))

    @property
    def nominal_steps_per_qn(self) -> float:
        """Steps in a quarter note: exactly, or at 120 BPM for real time (to size blanks and windows)."""
        if self.steps_per_qn is not None:
            return float(self.steps_per_qn)
        return MS_PER_MINUTE / DEFAULT_TEMPO_BPM / vocab.WAIT_STEP_MS

    def describe(self) -> str:
        if self.steps_per_qn is None:
            return f"{vocab.WAIT_STEP_MS:g} ms of real time a step"
        return f"1/{self.steps_per_qn} quarter note a step"


MIN_STEPS_PER_QN = math.ceil(MS_PER_MINUTE / (MAX_TEMPO_BPM * vocab.WAIT_STEP_MS))
"""Fewer steps would need a token-time tempo above the tempo map's limit (8)."""
MAX_STEPS_PER_QN = vocab.MAX_WAIT_STEPS_PER_TOKEN
"""A quarter note of silence in one wait token (125)."""
REAL_TIME = TimeUnit()
"""The paper's unit, and the public checkpoints'."""
QUARTER_NOTE_24 = TimeUnit(24)
"""Tempo-relative: 32nd notes (3), 16th triplets (4), 16ths (6), 8th triplets (8), 8ths (12)."""
