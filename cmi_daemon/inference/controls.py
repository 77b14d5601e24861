"""What a target track's infill may and should do: its controls, and their defaults from its context.

Per target track a musician can set note density, polyphony (most notes at once), pitch range,
note length, velocity range and the rhythmic grid; whatever they leave unset (None, or grid
"auto") is what the track does in its context: CONTEXT_BARS bars each side of the range (the
density: in the range itself, when the bars being rewritten hold notes of the track). The
sampler (`sampling.TrackConstraints`) enforces the hard limits (polyphony, pitch and velocity
range, onsets on the grid) while it samples and steers density, note length and pitch class
with logit biases (pitch classes the context's pitched tracks seldom sound are held back, so an
infill stays in its song's key and chords); a note's length aims at what the track's notes at
its position in the bar last in the context (the track's length pattern), so a rhythm's long and
short notes stay long and short.

The grid of a track is the coarsest of GRID_STEPS_QN, at the phase of the context's onsets,
that holds at least QUANTIZED_SHARE of them to within GRID_TOLERANCE of a step; a track played
by hand (Groove's drummers) has none, and nothing is forced onto one.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from ..errors import CMIError
from ..music.roles import ACCOMPANIMENT, BASS, MELODY, part_role
from ..music.tokens import Note, Song

CONTEXT_BARS = 8
"""Bars of context each side of a range: their notes set a track's default controls, and the
evaluation and benchmarks give their blanks this much (a bridge sends more,
`repeats.SEND_BARS`, for the song's repeats)."""
GRID_STEPS_QN = (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8, 1 / 12, 1 / 16)
"""Quarter, 8th, 8th triplet, 16th, 16th triplet, 32nd, 16th + 8th-triplet union, 64th; coarsest first."""
GRID_NAMES = {"1/4": 1.0, "1/8": 1 / 2, "1/8T": 1 / 3, "1/16": 1 / 4, "1/16T": 1 / 6, "1/32": 1 / 8,
              "1/32T": 1 / 12, "1/64": 1 / 16}
"""Grid names a musician writes (note values of a 4/4 bar) -> step in quarter notes."""
GRID_TOLERANCE = 1 / 8
"""An onset is on a grid when it lies within this fraction of a step of one of its lines."""
QUANTIZED_SHARE = 0.9
MIN_GRID_ONSETS = 8
"""A context with fewer onsets has too little evidence of a grid: none is forced."""
MAX_POLYPHONY = 64
MAX_DENSITY_PER_QN = 64.0
MAX_NOTE_LENGTH_QN = 64.0
LENGTH_POSITION_TOLERANCE_QN = 1 / 24
"""Onsets this near one another's bar position share a length in the track's length pattern."""
NEW_PART_DEFAULTS = {MELODY: (1, (60, 84)), BASS: (1, (28, 55)), ACCOMPANIMENT: (4, (45, 79))}
"""Role -> (polyphony, pitch range) of a track with no notes yet: a new lead is one line in the
treble (C4-C6), a bass one line below G3, an accompaniment chords of up to four notes around
middle C; each at the model's own pace."""
MIN_NOTES_PER_LENGTH_POSITION = 3
"""Context notes a bar position needs for its own length (fewer: a phrase's last note, say, and
notes there aim at the track's median length)."""
MIN_PITCH_SPAN = 12
"""The pitch range of a context with fewer than MIN_GRID_ONSETS notes is widened to this many
semitones around its middle: a few notes are weak evidence of where a part may go."""


class Grid(NamedTuple):
    """Lines at phase_qn + k * step_qn."""

    step_qn: float
    phase_qn: float = 0.0

    def lines_qn(self, start_qn: float, end_qn: float) -> np.ndarray:
        """Grid lines in [start_qn, end_qn]."""
        first = np.ceil((start_qn - self.phase_qn) / self.step_qn - 1e-9)
        last = np.floor((end_qn - self.phase_qn) / self.step_qn + 1e-9)
        return self.phase_qn + np.arange(first, last + 1) * self.step_qn

    def name(self) -> str:
        names = {round(step, 9): name for name, step in GRID_NAMES.items()}
        return names.get(round(self.step_qn, 9), f"{Fraction(self.step_qn).limit_denominator(96)} QN")


def grid_phase_qn(onsets_qn: np.ndarray, step_qn: float) -> float:
    """The onsets' circular mean position inside a step_qn grid, in [0, step_qn)."""
    angle = np.angle(np.exp(2j * np.pi * np.asarray(onsets_qn) / step_qn).mean())
    return float(np.mod(angle / (2 * np.pi) * step_qn, step_qn))


def grid_share(onsets_qn: np.ndarray, grid: Grid) -> float:
    offset = np.mod((np.asarray(onsets_qn) - grid.phase_qn) / grid.step_qn + 0.5, 1.0) - 0.5
    return float(np.mean(np.abs(offset) <= GRID_TOLERANCE + 1e-9))


def detect_grid(onsets_qn: Sequence[float], song_onsets_qn: Optional[Sequence[float]] = None) -> Optional[Grid]:
    """The coarsest grid of GRID_STEPS_QN holding QUANTIZED_SHARE of the onsets, or None; its phase
    is that of song_onsets_qn (every track's, so that the tracks of a song share one grid) if given."""
    onsets = np.asarray(onsets_qn, dtype=np.float64)
    phase_onsets = onsets if song_onsets_qn is None else np.asarray(song_onsets_qn, dtype=np.float64)
    if len(onsets) < MIN_GRID_ONSETS:
        return None
    for step_qn in GRID_STEPS_QN:
        grid = Grid(step_qn, grid_phase_qn(phase_onsets, step_qn))
        if grid_share(onsets, grid) >= QUANTIZED_SHARE:
            return grid
    return None


def parse_grid(text: str) -> Union[str, float]:
    """"auto", "off" or a grid name ("1/16", "1/8T", ...) -> "auto", "off" or the step in QN."""
    value = text.strip()
    if value.lower() in ("auto", "off"):
        return value.lower()
    for name, step_qn in GRID_NAMES.items():
        if value.upper() == name.upper():
            return step_qn
    raise CMIError(f"{text!r} is not a grid: write auto, off or one of " + ", ".join(GRID_NAMES))


def max_polyphony(notes: Sequence[Note]) -> int:
    """Most notes sounding at once (a note that ends where another starts does not overlap it)."""
    events = sorted([(n.start_qn, 1) for n in notes] + [(n.start_qn + n.duration_qn, -1) for n in notes])
    sounding = most = 0
    for _, change in events:
        sounding += change
        most = max(most, sounding)
    return most


@dataclass(frozen=True)
class ControlRequest:
    """What a musician asks of one target track; None (grid "auto") takes the track's context."""

    density_per_qn: Optional[float] = None
    """Note onsets per quarter note."""
    max_polyphony: Optional[int] = None
    pitch_range: Optional[tuple[int, int]] = None
    """Lowest and highest MIDI pitch, inclusive."""
    note_length_qn: Optional[float] = None
    """Typical (median) note length."""
    velocity_range: Optional[tuple[int, int]] = None
    grid: Union[str, float] = "auto"
    """"auto" (the context's), "off", or a step in QN (phase 0: a DAW's grid starts at its bar lines)."""

    def __post_init__(self):
        if self.density_per_qn is not None and not 0 < self.density_per_qn <= MAX_DENSITY_PER_QN:
            raise CMIError(f"density {self.density_per_qn:g} notes per quarter note: choose a value in "
                           f"(0, {MAX_DENSITY_PER_QN:g}]")
        if self.max_polyphony is not None and not 1 <= self.max_polyphony <= MAX_POLYPHONY:
            raise CMIError(f"polyphony {self.max_polyphony}: choose 1..{MAX_POLYPHONY} notes at once")
        for name, bounds, top in (("pitch range", self.pitch_range, 127), ("velocity range", self.velocity_range, 127)):
            if bounds is not None and not (len(bounds) == 2 and 0 <= bounds[0] <= bounds[1] <= top):
                raise CMIError(f"{name} {bounds}: write LOW-HIGH with 0 <= LOW <= HIGH <= {top}")
        if self.velocity_range is not None and self.velocity_range[1] < 1:
            raise CMIError(f"velocity range {self.velocity_range}: the highest velocity must be at least 1")
        if self.note_length_qn is not None and not 0 < self.note_length_qn <= MAX_NOTE_LENGTH_QN:
            raise CMIError(f"note length {self.note_length_qn:g} QN: choose a value in (0, {MAX_NOTE_LENGTH_QN:g}]")
        if not (self.grid in ("auto", "off") or (isinstance(self.grid, float) and 0 < self.grid <= 4)):
            raise CMIError(f"grid {self.grid!r}: auto, off or a step in quarter notes in (0, 4]")


@dataclass(frozen=True)
class TrackControls:
    """One target track's resolved controls; None: the context says nothing, so nothing is imposed."""

    density_per_qn: Optional[float]
    max_polyphony: Optional[int]
    pitch_range: Optional[tuple[int, int]]
    note_length_qn: Optional[float]
    velocity_range: Optional[tuple[int, int]]
    grid: Optional[Grid]
    pitch_class_shares: Optional[tuple[float, ...]] = None
    """Share of the sounding time each pitch class (C first) has in the context of the song's pitched
    tracks, the harmony the track plays in; None for drums and a silent context."""
    length_pattern: tuple[tuple[float, float], ...] = ()
    """(position in the bar in QN, median length in QN) of the context's notes at each bar position
    (`length_pattern`): a new note aims at the length its position has there, else at
    note_length_qn (`lengths_at_qn`). Empty when the musician set the note length."""

    def lengths_at_qn(self, song: Song, onsets_qn: np.ndarray) -> Optional[np.ndarray]:
        """The lengths in QN notes of this track starting at onsets_qn aim at; None without a length."""
        if self.note_length_qn is None:
            return None
        lengths_qn = np.full(len(onsets_qn), self.note_length_qn)
        if self.length_pattern:
            positions, pattern_lengths = np.array(self.length_pattern).T
            position = song.meter.position_in_bar_qn(onsets_qn)
            nearest = np.abs(position[:, None] - positions[None, :]).argmin(axis=1)
            found = np.abs(positions[nearest] - position) <= LENGTH_POSITION_TOLERANCE_QN
            lengths_qn[found] = pattern_lengths[nearest[found]]
        return lengths_qn

    @property
    def rests(self) -> bool:
        """Silent around the range and in it while it plays elsewhere: the infill gives it no notes
        unless the musician sets its density."""
        return self.density_per_qn == 0

    def describe(self) -> str:
        if self.rests:
            return "rests (silent around the range)"
        parts = []
        if self.density_per_qn is not None:
            parts.append(f"density {self.density_per_qn:.2f}/QN")
        if self.max_polyphony is not None:
            parts.append(f"polyphony {self.max_polyphony}")
        if self.pitch_range is not None:
            parts.append(f"pitch {self.pitch_range[0]}-{self.pitch_range[1]}")
        if self.note_length_qn is not None:
            parts.append(f"length {self.note_length_qn:.2f} QN" + (" (by bar position)" if self.length_pattern else ""))
        if self.velocity_range is not None:
            parts.append(f"velocity {self.velocity_range[0]}-{self.velocity_range[1]}")
        parts.append(f"grid {self.grid.name() if self.grid else 'off'}")
        if self.pitch_class_shares is not None:
            parts.append("pitch classes of the context")
        return ", ".join(parts)


def context_notes(song: Song, track_indices: Sequence[int], start_qn: float,
                  end_qn: float) -> tuple[list[Note], float]:
    """(notes of the tracks starting in the CONTEXT_BARS bars each side of the range, outside it;
    the QN those bars span)."""
    first_bar = max(1.0, np.floor(song.meter.bar_at_qn(start_qn) + 1e-9) - CONTEXT_BARS)
    context_start_qn = song.meter.bar_start_qn(first_bar)
    context_end_qn = song.meter.bar_start_qn(np.ceil(song.meter.bar_at_qn(end_qn) - 1e-9) + CONTEXT_BARS)
    notes = [n for t in track_indices for n in song.tracks[t].notes
             if context_start_qn <= n.start_qn < context_end_qn and not start_qn <= n.start_qn < end_qn]
    song_end_qn = max(end_qn, song.end_qn)
    span_qn = (start_qn - context_start_qn) + max(0.0, min(context_end_qn, song_end_qn) - end_qn)
    return notes, span_qn


def pitch_class_shares(notes: Sequence[Note]) -> Optional[tuple[float, ...]]:
    """Share of the notes' summed duration in each pitch class; None without notes."""
    sounding_qn = np.zeros(12)
    for note in notes:
        sounding_qn[note.pitch % 12] += note.duration_qn
    total_qn = sounding_qn.sum()
    return None if total_qn <= 0 else tuple(float(x) for x in sounding_qn / total_qn)


def length_pattern(song: Song, notes: Sequence[Note]) -> tuple[tuple[float, float], ...]:
    """(bar position in QN, median length in QN) of the notes starting at each bar position (to
    LENGTH_POSITION_TOLERANCE_QN) where MIN_NOTES_PER_LENGTH_POSITION notes or more start, in
    position order: a track's rhythm holds its notes' lengths by where they fall in the bar (a
    bass's downbeat held for two beats, its off-beats short)."""
    by_position: dict[float, list[float]] = {}
    positions = song.meter.position_in_bar_qn([n.start_qn for n in notes])
    for note, position in zip(notes, positions):
        snapped = round(float(position) / LENGTH_POSITION_TOLERANCE_QN) * LENGTH_POSITION_TOLERANCE_QN
        by_position.setdefault(snapped, []).append(note.duration_qn)
    return tuple((position, float(np.median(lengths))) for position, lengths in sorted(by_position.items())
                 if len(lengths) >= MIN_NOTES_PER_LENGTH_POSITION)


def widened(low: int, high: int) -> tuple[int, int]:
    """The pitch range low..high, at least MIN_PITCH_SPAN wide, inside 0..127."""
    missing = max(0, MIN_PITCH_SPAN - (high - low))
    low, high = low - missing // 2, high + missing - missing // 2
    shift = max(0, -low) - max(0, high - 127)
    return low + shift, high + shift


def resolve_controls(song: Song, track_index: int, start_qn: float, end_qn: float,
                     request: ControlRequest = ControlRequest(),
                     repeat_notes: Optional[Sequence[Note]] = None) -> TrackControls:
    """The track's controls: the musician's values, the rest from its context bars. The density
    comes from the notes the infill replaces when the range holds some of the track's (bars being
    rewritten keep their pace), else, where the song repeats the range (`repeats.find_repeat`),
    from the repeat's notes of the track (repeat_notes, moved into the range), else from the
    context: 0 for a track that plays elsewhere in the song but neither in the range nor around
    it, which therefore rests (`TrackControls.rests`). The hard limits (grid, polyphony, ranges)
    are the context's alone: a repeat's note beyond them is not played. A track with no notes at
    all (a new part) takes the polyphony and register of its role (`roles.part_role`: its name or
    instrument; NEW_PART_DEFAULTS), and the song's grid and pitch classes."""
    notes, span_qn = context_notes(song, [track_index], start_qn, end_qn)
    replaced = sum(start_qn <= n.start_qn < end_qn for n in song.tracks[track_index].notes)
    plays_elsewhere = bool(song.tracks[track_index].notes)
    density_per_qn = (request.density_per_qn if request.density_per_qn is not None
                      else replaced / (end_qn - start_qn) if replaced
                      else len(repeat_notes) / (end_qn - start_qn) if repeat_notes is not None and plays_elsewhere
                      else len(notes) / span_qn if (notes or plays_elsewhere) and span_qn > 0
                      else None)
    pitches = [n.pitch for n in notes]
    velocities = [n.velocity for n in notes]
    drums = song.tracks[track_index].is_drum
    pitched = [i for i, t in enumerate(song.tracks) if not t.is_drum]
    song_notes, _ = context_notes(song, pitched if not drums else [track_index], start_qn, end_qn)
    if request.grid == "auto":
        own_onsets = notes if plays_elsewhere else song_notes  # a new part plays on the song's grid
        grid = detect_grid([n.start_qn for n in own_onsets], [n.start_qn for n in song_notes])
    else:
        grid = None if request.grid == "off" else Grid(float(request.grid))
    new_polyphony, new_pitch_range = ((None, None) if plays_elsewhere
                                      else NEW_PART_DEFAULTS.get(part_role(song, track_index), (None, None)))
    return TrackControls(
        density_per_qn=density_per_qn,
        max_polyphony=request.max_polyphony or (max_polyphony(notes) if notes else new_polyphony),
        pitch_range=request.pitch_range or (new_pitch_range if not notes else (min(pitches), max(pitches))
                                            if len(notes) >= MIN_GRID_ONSETS else widened(min(pitches), max(pitches))),
        note_length_qn=request.note_length_qn or (float(np.median([n.duration_qn for n in notes])) if notes else None),
        velocity_range=request.velocity_range or ((min(velocities), max(velocities)) if notes else None),
        grid=grid,
        pitch_class_shares=None if drums else pitch_class_shares(song_notes),
        length_pattern=() if request.note_length_qn else length_pattern(song, notes))


SNAP_SHARE = 1 / 4
"""An onset within this fraction of a grid step of a line is put exactly on it."""


def snap_to_grid(notes_by_track: dict[int, list[Note]], controls: dict[int, TrackControls], start_qn: float,
                 end_qn: float, step_qn: float) -> dict[int, list[Note]]:
    """Answer notes in [start_qn, end_qn] with their onsets (and the ends that fall on a line) moved
    exactly onto their track's grid lines.

    The sampler already placed onsets on the steps nearest the lines (step_qn: its step in QN, at
    most): this removes the rounding of lines to steps, so a DAW shows them quantised. A note may
    end between the lines (a detached note ends before the next onset), so an end moves only when
    it is within half a step of a line, where the sampler ended it at the line. The range's edges
    count as lines; edges far from every line stay as they are."""
    result = {}
    for track, notes in notes_by_track.items():
        grid = controls[track].grid if track in controls else None
        if grid is None:
            result[track] = notes
            continue
        snapped = []
        for note in notes:
            end = note.start_qn + note.duration_qn
            on = _snap(note.start_qn, grid, start_qn, end_qn, SNAP_SHARE * grid.step_qn)
            off = _snap(end, grid, start_qn, end_qn, step_qn / 2)
            if off <= on:  # a note shorter than the snap: its onset goes on the line, its end stays
                off = end
            snapped.append(note._replace(start_qn=on, duration_qn=off - on) if off > on else note)
        result[track] = snapped
    return result


def _snap(qn: float, grid: Grid, start_qn: float, end_qn: float, tolerance_qn: float) -> float:
    """The nearest of the grid lines and the range's edges, if within tolerance_qn."""
    line = grid.phase_qn + round((qn - grid.phase_qn) / grid.step_qn) * grid.step_qn
    nearest = min((line, start_qn, end_qn) if start_qn <= line <= end_qn else (start_qn, end_qn),
                  key=lambda edge: abs(edge - qn))
    return float(nearest) if abs(nearest - qn) <= tolerance_qn + 1e-9 else qn
