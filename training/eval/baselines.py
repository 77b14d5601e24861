"""Infilling systems under evaluation: the interface every system implements, and three baselines.

A system gets the song with the blank's ground truth removed (the target tracks' notes that start
inside [start_qn, end_qn) are gone), the blank, the target tracks and a seeded random generator,
and returns new notes per target track, all starting inside the range and ending by its end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from cmi_daemon.music.repeats import find_repeat
from cmi_daemon.music.tokens import Note, Song


@dataclass(frozen=True)
class Blank:
    """Bars to infill, with the whole bars of context on each side that the metrics look at."""

    song_id: str
    start_qn: float
    end_qn: float
    bar_lines_qn: tuple[float, ...]
    """Every bar line from the start of the past context to the end of the future context."""
    context_bars: int
    width_bars: int
    beat_qn: float
    """Length of one beat in QN: durations in beats are duration_qn / beat_qn."""

    def __post_init__(self):
        if len(self.bar_lines_qn) != 2 * self.context_bars + self.width_bars + 1:
            raise ValueError(f"a blank of {self.width_bars} bars with {self.context_bars} bars of context each side "
                             f"needs {2 * self.context_bars + self.width_bars + 1} bar lines, "
                             f"not {len(self.bar_lines_qn)}")
        if self.width_bars > self.context_bars:
            raise ValueError(f"a blank of {self.width_bars} bars is wider than its {self.context_bars} bars of context")

    @property
    def past_bar_lines_qn(self) -> tuple[float, ...]:
        return self.bar_lines_qn[:self.context_bars + 1]

    @property
    def blank_bar_lines_qn(self) -> tuple[float, ...]:
        return self.bar_lines_qn[self.context_bars:self.context_bars + self.width_bars + 1]

    @property
    def future_bar_lines_qn(self) -> tuple[float, ...]:
        return self.bar_lines_qn[self.context_bars + self.width_bars:]

    @property
    def past_start_qn(self) -> float:
        return self.bar_lines_qn[0]

    @property
    def future_end_qn(self) -> float:
        return self.bar_lines_qn[-1]


class InfillSystem(Protocol):
    """What the evaluation runs: baselines here, the model through `training.eval.evaluate.load_model_system`."""

    name: str

    def infill(self, song: Song, blank: Blank, target_tracks: Sequence[int],
               rng: np.random.Generator) -> dict[int, list[Note]]:
        """New notes for each target track, inside [blank.start_qn, blank.end_qn)."""


def notes_in_range(notes: Sequence[Note], start_qn: float, end_qn: float) -> list[Note]:
    """The notes that start inside [start_qn, end_qn), each cut to end by end_qn."""
    return [n._replace(duration_qn=min(n.duration_qn, end_qn - n.start_qn))
            for n in notes if start_qn <= n.start_qn < end_qn]


def context_notes(notes: Sequence[Note], blank: Blank) -> list[Note]:
    """The notes that start in the past or the future context of the blank."""
    return (notes_in_range(notes, blank.past_start_qn, blank.start_qn)
            + [n for n in notes if blank.end_qn <= n.start_qn < blank.future_end_qn])


@dataclass(frozen=True)
class RandomNotes:
    """Random notes shaped like each track's context: its density in notes per beat (a Poisson
    count over the blank), its pitch range (uniform; drum tracks draw the context's drum keys),
    its durations and velocities (drawn from the context's), onsets uniform over the range."""

    name: str = "random notes"

    def infill(self, song: Song, blank: Blank, target_tracks: Sequence[int],
               rng: np.random.Generator) -> dict[int, list[Note]]:
        context_beats = ((blank.start_qn - blank.past_start_qn) + (blank.future_end_qn - blank.end_qn)) / blank.beat_qn
        blank_beats = (blank.end_qn - blank.start_qn) / blank.beat_qn
        result = {}
        for track_index in target_tracks:
            track = song.tracks[track_index]
            context = context_notes(track.notes, blank)
            if not context:
                result[track_index] = []
                continue
            n_notes = int(rng.poisson(len(context) / context_beats * blank_beats))
            pitches = np.array([n.pitch for n in context])
            onset_qn = np.sort(rng.uniform(blank.start_qn, blank.end_qn, n_notes))
            if track.is_drum:
                pitch = rng.choice(pitches, n_notes)
            else:
                pitch = rng.integers(pitches.min(), pitches.max() + 1, n_notes)
            duration_qn = rng.choice([n.duration_qn for n in context], n_notes)
            velocity = rng.choice([n.velocity for n in context], n_notes)
            result[track_index] = [
                Note(float(start), float(min(duration, blank.end_qn - start)), int(p), int(v))
                for start, duration, p, v in zip(onset_qn, duration_qn, pitch, velocity)]
        return result


@dataclass(frozen=True)
class RepeatPreviousBars:
    """The bars just before the blank, as many as the blank is wide, tiled over it: onsets shifted
    by whole copies of their span, notes starting past the range dropped, the rest cut at its end."""

    name: str = "repeat previous bars"

    def infill(self, song: Song, blank: Blank, target_tracks: Sequence[int],
               rng: np.random.Generator) -> dict[int, list[Note]]:
        source_start_qn = blank.bar_lines_qn[blank.context_bars - blank.width_bars]
        span_qn = blank.start_qn - source_start_qn
        n_copies = int(np.ceil((blank.end_qn - blank.start_qn) / span_qn))
        result = {}
        for track_index in target_tracks:
            source = [n for n in song.tracks[track_index].notes if source_start_qn <= n.start_qn < blank.start_qn]
            shifted = [n._replace(start_qn=n.start_qn + copy * span_qn)
                       for copy in range(1, n_copies + 1) for n in source]
            result[track_index] = notes_in_range(shifted, blank.start_qn, blank.end_qn)
        return result


@dataclass(frozen=True)
class CopyOfTheRepeat:
    """The song's repeat of the blank as the engine finds it (`repeats.find_repeat`), copied as it
    is, no model: how much of an engine's infill the search alone gives. Nothing where the song
    has no repeat."""

    name: str = "copy of the song's repeat"

    def infill(self, song: Song, blank: Blank, target_tracks: Sequence[int],
               rng: np.random.Generator) -> dict[int, list[Note]]:
        repeat = find_repeat(song, blank.start_qn, blank.end_qn, target_tracks)
        return {t: list(repeat.notes[t]) if repeat is not None else [] for t in target_tracks}


BASELINES: tuple[InfillSystem, ...] = (RandomNotes(), RepeatPreviousBars(), CopyOfTheRepeat())
