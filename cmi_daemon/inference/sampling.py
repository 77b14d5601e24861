"""Constrained sampling of an infill answer: which tokens may come next, and drawing one.

The decoder only ever scores a small set of rows of the head (`AnswerRows`): `<ans>`, the 125
waits and every note token of the target tracks' bins. Per candidate, `AnswerState` follows the
answer as it grows and says what is allowed next:
- waits never pass the blank's end, nor the next note of another track inside the range
  (`Region.fixed_notes`: those are forced in at their steps, with their note-offs);
- a note-on only for a key that is silent, counting the target tracks' notes that start before
  the range and sound into it (a new note would cut them short in a MIDI channel); a note-off only
  for a key the answer opened at an earlier step (no zero-length notes);
- `<ans>` never sampled: when the clock reaches the blank's end, the open notes are closed
  and `<ans>` follows, all forced;
- where the context is dense (the target bins play at least MIN_EXPECTED_NOTES notes per blank
  length on average), waits stop short of the last step a note may start at until the answer has
  a note, and the last token before max_sampled_tokens is a note-on if one may start then;
- after max_sampled_tokens sampled tokens the answer is finished by force: open notes closed,
  waits to the end (through any fixed notes), `<ans>`;
- per target track, its controls (`controls.TrackControls`, as `TrackConstraints`), over the
  pitches it owns in its bin (`pitch_owners`: tracks of one bin share it by pitch range and
  register): note-ons only inside its pitch and velocity range and while fewer of its notes than
  its polyphony sound; on its grid, its note-ons only on the lines, and waits only to a line of
  some track or to where an open answer note reaches the length it aims at (the model's timing
  renormalised over the allowed steps, not snapped afterwards; so a note may end between the
  lines, as a detached note does); a logit
  bias on its note-ons pulls its note count toward its density, one on each open note's
  note-off pulls its length toward the length its onset's bar position has in the track's
  context (`TrackControls.lengths_at_qn`), and one on each wait that would
  carry an open note past its note length holds the clock back (a tempo-relative wait can span
  bars in one token, and a note-off is only ever drawn between tokens).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Collection, Optional, Sequence

import numpy as np

from ..music import vocab
from ..music.regions import Region, track_bin
from ..music.repeats import Repeat
from ..music.tokens import Song, ms_to_step
from .controls import TrackControls

MAX_SEED = 2 ** 32 - 1
"""Seeds of the random draws are 0..MAX_SEED (docs/protocol.md `options.seed`): the engine's and the wire's range."""
MIN_EXPECTED_NOTES = 1.0
"""A context whose target-bin note rate predicts at least this many notes in the blank forbids an empty answer."""
REPETITION_DECAY = 0.95
"""Per sampled token, earlier uses of a note-on count this much less toward the repetition penalty."""
DENSITY_GAIN = 16.0
"""Note-on logit push per unit of log(expected notes so far / notes so far), each side + 1, while
a track is behind its density's pace."""
DENSITY_PULL_PER_NOTE = 8.0
"""Note-on logit pull per note at or over the pace: strong, because the model's own preference is:
after a note-off the shipped model puts the next note-on at the same step with probability 0.999
(a logit margin of about 7). A log-ratio pull (16 x log) let melodies run 1.5x over their count."""
DENSITY_LEAD_NOTES = 2
"""Notes the answer may run ahead of the density's pace before it is held back (a two-note chord)."""
MAX_DENSITY_PUSH = 4.0
MAX_DENSITY_PULL = 16.0
"""Bounds of the density bias: toward more notes (gently) and toward fewer."""
LENGTH_GAIN = 8.0
"""Note-off logit bias per unit of log(a note's age / the note length)."""
MAX_LENGTH_BIAS = 8.0
HARMONY_GAIN = 1.0
"""Note-on logit bias per unit of log(a pitch class's share of the context's sounding time / 1/12),
for pitch classes below an even share; those at or above it are not biased."""
HARMONY_FLOOR = 0.01
"""Added to each share: a pitch class the context never sounds is held back by HARMONY_GAIN x
log(HARMONY_FLOOR / (1/12 + HARMONY_FLOOR)), about 2.2, not forbidden (a passing note stays possible)."""
GUIDE_GAIN = 8.0
"""Logit bias toward the repeat guide's notes at full strength (`RepeatGuide`): on a guide note's
note-on at its step and its note-off at its length, on the wait that lands on the guide's next
onset or note end, and against waits past it."""
GUIDE_STRAY_SHARE = 1.0
"""Of GUIDE_GAIN, the bias against a note-on the guide does not have at the clock, and against
waiting on while guide notes of the clock are still to play."""
NOTE_TOKENS_PER_BIN = vocab.N_PITCHES * vocab.N_VELOCITY_BINS
ANS_ROW = 0
FIRST_WAIT_ROW = 1
FIRST_NOTE_ROW = FIRST_WAIT_ROW + vocab.MAX_WAIT_STEPS_PER_TOKEN
WAIT_LENGTHS_STEPS = np.arange(1, vocab.MAX_WAIT_STEPS_PER_TOKEN + 1)
"""The steps each wait row moves the clock by, in row order."""


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    """0 picks the most likely allowed token."""
    top_p: float = 0.9
    top_k: int = 0
    """0: no top-k cut."""
    repetition_penalty: float = 0.0
    """Subtracted from a note-on's logit per (decayed) earlier use in the answer."""

    def __post_init__(self):
        if not (self.temperature >= 0 and 0 < self.top_p <= 1 and self.top_k >= 0 and self.repetition_penalty >= 0):
            raise ValueError(f"sampling options out of range: {self} (temperature >= 0, 0 < top_p <= 1, "
                             "top_k >= 0, repetition_penalty >= 0)")


class AnswerRows:
    """The head rows an answer may use, in order: `<ans>`, waits t1..t125, the target bins' notes."""

    def __init__(self, target_bins: Sequence[int]):
        self.bins = tuple(sorted(set(target_bins)))
        note_ids = [np.arange(vocab.note_id(b, 0, 0), vocab.note_id(b, 0, 0) + NOTE_TOKENS_PER_BIN) for b in self.bins]
        self.token_ids = np.concatenate([[vocab.ANS_ID], np.arange(vocab.FIRST_WAIT_ID, vocab.LAST_WAIT_ID + 1),
                                         *note_ids]).astype(np.int64)
        self._bin_block = {b: FIRST_NOTE_ROW + i * NOTE_TOKENS_PER_BIN for i, b in enumerate(self.bins)}
        velocity = (np.arange(len(self.token_ids)) - FIRST_NOTE_ROW) % vocab.N_VELOCITY_BINS
        self.note_on_rows = (np.arange(len(self.token_ids)) >= FIRST_NOTE_ROW) & (velocity > 0)

    def __len__(self) -> int:
        return len(self.token_ids)

    def key_rows(self, instrument_bin: int, pitch: int) -> Optional[int]:
        """Row of the key's note-off (its note-ons follow it); None for a bin outside the rows."""
        block = self._bin_block.get(instrument_bin)
        return None if block is None else block + pitch * vocab.N_VELOCITY_BINS

    def bin_rows(self, instrument_bin: int) -> slice:
        block = self._bin_block[instrument_bin]
        return slice(block, block + NOTE_TOKENS_PER_BIN)


@dataclass(frozen=True)
class TrackConstraints:
    """What one target track's controls allow and ask, in the region's steps."""

    pitch_range: Optional[tuple[int, int]] = None
    velocity_bins: Optional[tuple[int, int]] = None
    """Lowest and highest note-on velocity bin allowed (1..11)."""
    max_polyphony: Optional[int] = None
    grid_steps: Optional[np.ndarray] = None
    """Sorted steps (relative to the range start) of the grid's lines inside the range, or None."""
    expected_notes: Optional[float] = None
    """Notes the density asks for over the whole range."""
    note_length_steps: Optional[np.ndarray] = None
    """(n_steps + 1,) the length in steps a note opened at each step aims at, or None."""
    pitch_class_bias: Optional[np.ndarray] = None
    """(12,) note-on logit bias per pitch class from the context's harmony (`harmony_bias`), or None."""

    @classmethod
    def from_controls(cls, controls: TrackControls, song: Song, region: Region) -> "TrackConstraints":
        tempo_map = song.tempo_map
        grid_steps = length_steps = None
        if controls.grid is not None:
            lines_qn = controls.grid.lines_qn(region.start_qn, region.end_qn)
            steps = ms_to_step(tempo_map.ms_at(lines_qn)).astype(np.int64) - region.start_step
            grid_steps = np.unique(steps[(steps >= 0) & (steps <= region.n_steps)])
        if controls.note_length_qn is not None:
            onsets_ms = (region.start_step + np.arange(region.n_steps + 1)) * vocab.WAIT_STEP_MS
            onsets_qn = tempo_map.qn_at(onsets_ms)
            lengths_qn = controls.lengths_at_qn(song, onsets_qn)
            length_steps = np.maximum(1.0, (tempo_map.ms_at(onsets_qn + lengths_qn) - onsets_ms) / vocab.WAIT_STEP_MS)
        velocities = controls.velocity_range
        return cls(
            pitch_range=controls.pitch_range,
            velocity_bins=None if velocities is None else
            (max(1, vocab.velocity_to_bin(velocities[0])), max(1, vocab.velocity_to_bin(velocities[1]))),
            max_polyphony=controls.max_polyphony, grid_steps=grid_steps,
            expected_notes=None if controls.density_per_qn is None
            else controls.density_per_qn * (region.end_qn - region.start_qn),
            note_length_steps=length_steps,
            pitch_class_bias=None if controls.pitch_class_shares is None else harmony_bias(controls.pitch_class_shares))


@dataclass(frozen=True)
class RepeatGuide:
    """The notes of the song's repeat of the range (`repeats.Repeat`) in the region's steps: the
    sampler leans toward playing them where they fall (the model still chooses, and every control
    still holds), so an infill of a repeated section keeps the song's figure."""

    onsets: dict[int, frozenset[tuple[int, int]]]
    """Step (relative to the range start) -> the (bin, pitch) keys that start there."""
    length_steps: dict[tuple[int, int, int], float]
    """(step, bin, pitch) -> the length in steps of the guide note starting there."""
    gain: float
    """Logit bias at this strength: GUIDE_GAIN x strength."""
    tracks: frozenset[int]
    """The target tracks it guides: those the repeat speaks for (they play in the song) and whose
    density the musician left to it. Other tracks' note-ons are not held back by it."""
    track_onsets: dict[int, np.ndarray]
    """Guided track -> the sorted steps of its guide notes' onsets, one per note: where its density
    expects its notes (`AnswerState._density_push`)."""

    @classmethod
    def from_repeat(cls, repeat: Repeat, song: Song, region: Region, constraints: dict[int, "TrackConstraints"],
                    strength: float, lengths_set: Collection[int] = (),
                    densities_set: Collection[int] = ()) -> "RepeatGuide":
        """Onsets go to the step of their track's nearest grid line, where it has a grid: the sampler
        starts notes there only. The tracks of lengths_set keep the note length the musician set;
        the others' notes aim at the lengths of the guide's. The tracks of densities_set, and those
        with no notes in the song (a new part), are not guided."""
        guided = frozenset(t for t in repeat.notes if song.tracks[t].notes and t not in densities_set)
        onsets: dict[int, set[tuple[int, int]]] = {}
        length_steps = {}
        track_onsets: dict[int, list[int]] = {}
        tempo_map = song.tempo_map
        # In the repeat's track order: where two tracks' notes share a key, the last one's length holds.
        for track in (t for t in repeat.notes if t in guided):
            grid = constraints[track].grid_steps if track in constraints else None
            instrument_bin = track_bin(song, track)
            for note in repeat.notes[track]:
                on, off = (int(s) - region.start_step for s in ms_to_step(
                    tempo_map.ms_at(np.array([note.start_qn, note.start_qn + note.duration_qn]))))
                if grid is not None and len(grid):
                    on = int(grid[np.abs(grid - on).argmin()])
                if not 0 <= on < region.n_steps:
                    continue
                onsets.setdefault(on, set()).add((instrument_bin, note.pitch))
                track_onsets.setdefault(track, []).append(on)
                if track not in lengths_set:
                    length_steps[(on, instrument_bin, note.pitch)] = float(max(1, off - on))
        return cls({step: frozenset(keys) for step, keys in onsets.items()}, length_steps, GUIDE_GAIN * strength,
                   guided, {t: np.sort(steps) for t, steps in track_onsets.items()})


def harmony_bias(shares: Sequence[float]) -> np.ndarray:
    """(12,) note-on bias of each pitch class from its share of the context's sounding time: the
    infill keeps to the pitch classes its context sounds (its key and chords), without a pull
    toward the commonest of them."""
    shares = np.asarray(shares, dtype=np.float64)
    return np.minimum(0.0, HARMONY_GAIN * np.log((shares + HARMONY_FLOOR) / (1 / 12 + HARMONY_FLOOR)))


def pitch_owners(region: Region, controls: dict[int, TrackControls]) -> dict[int, np.ndarray]:
    """Target bin -> (128,) the target track each pitch of that bin belongs to, -1 where no track's
    pitch range holds it: of the bin's tracks whose range holds the pitch (a resting track's holds
    none), the one whose notes around the range are nearest it on average. The sampler keeps each
    track to its own controls through this, and `regions.answer_notes` gives each answer note to
    that track."""
    owners = {}
    pitches = np.arange(vocab.N_PITCHES)
    for instrument_bin, tracks in region.target_bins.items():
        distance = np.full((len(tracks), vocab.N_PITCHES), np.inf)
        for row, track in enumerate(tracks):
            if controls[track].rests:
                continue
            low, high = controls[track].pitch_range or (0, vocab.N_PITCHES - 1)
            holds = (pitches >= low) & (pitches <= high)
            distance[row, holds] = np.abs(pitches[holds] - region.pitch_centre[track])
        nearest = np.argmin(distance, axis=0)
        owners[instrument_bin] = np.where(np.isfinite(distance.min(axis=0)), np.asarray(tracks)[nearest], -1)
    return owners


def fixed_events(region: Region) -> list[tuple[int, int]]:
    """(step relative to the range start, token id) of the other tracks' note-ons and note-offs
    inside the range, in the order the blank holds them."""
    events, clock, held = [], 0, set()
    for token_id in region.blank_ids:
        if vocab.is_wait(token_id):
            clock += vocab.wait_steps(token_id)
            continue
        instrument_bin, pitch, velocity_bin = vocab.note_fields(token_id)
        key = (instrument_bin, pitch)
        if velocity_bin and (region.start_step + clock, instrument_bin, pitch) in region.fixed_notes:
            held.add(key)
            events.append((clock, token_id))
        elif velocity_bin == 0 and key in held:
            held.discard(key)
            events.append((clock, token_id))
    return events


def held_keys(song: Song, region: Region) -> dict[tuple[int, int], int]:
    """(bin, pitch) of the target tracks' notes that start before the range and sound into it ->
    the step (relative to the range start) they end at, at most the range's length."""
    held: dict[tuple[int, int], int] = {}
    for track_index in region.target_tracks:
        instrument_bin = track_bin(song, track_index)
        for note in song.tracks[track_index].notes:
            end_qn = note.start_qn + note.duration_qn
            if note.start_qn < region.start_qn < end_qn:
                end_step = int(ms_to_step(song.tempo_map.ms_at(end_qn))) - region.start_step
                key = (instrument_bin, note.pitch)
                held[key] = max(held.get(key, 0), min(end_step, region.n_steps))
    return held


def requires_note(region: Region, constraints: Optional[dict[int, TrackConstraints]] = None) -> bool:
    """Whether the context's target-bin note rate predicts at least MIN_EXPECTED_NOTES in the blank,
    and so do the target tracks' densities where the constraints know them all."""
    expected = [c.expected_notes for c in (constraints or {}).values()]
    if expected and None not in expected and sum(expected) < MIN_EXPECTED_NOTES:
        return False
    context = region.prefix_ids + region.suffix_ids
    context_steps = vocab.total_steps(context)
    if context_steps == 0 or region.n_steps < 1:
        return False
    n_notes = vocab.note_on_count(context, region.target_bins)
    return n_notes * region.n_steps / context_steps >= MIN_EXPECTED_NOTES


class AnswerState:
    """One candidate's answer so far, and what may follow it."""

    def __init__(self, rows: AnswerRows, n_steps: int, events: Sequence[tuple[int, int]], need_note: bool,
                 max_sampled_tokens: int, held: Optional[dict[tuple[int, int], int]] = None,
                 constraints: Optional[dict[int, TrackConstraints]] = None,
                 owners: Optional[dict[int, np.ndarray]] = None, guide: Optional[RepeatGuide] = None):
        self.rows = rows
        self.n_steps = n_steps
        self.events = deque(events)
        self.need_note = need_note
        self.max_sampled_tokens = max_sampled_tokens
        self.clock = 0
        self.answer_ids: list[int] = []
        self.n_sampled = 0
        self.n_notes = 0
        self.open_keys: dict[tuple[int, int], int] = {}
        """Keys the answer holds -> the step each was opened at."""
        self.fixed_keys: set[tuple[int, int]] = set()
        self.forced: deque[tuple[int, bool]] = deque()
        """(token id, is another track's event) still to emit."""
        self.note_allowed = rows.note_on_rows.copy()
        self.presence = np.zeros(len(rows), dtype=np.float64)
        self.held = {key: step for key, step in (held or {}).items() if rows.key_rows(*key) is not None}
        """Keys still sounding from before the range -> the step they stop at."""
        self.done = False
        self.constraints = dict(constraints or {})
        """Target track -> its constraints (none: the bins play freely)."""
        self.owners = {b: o for b, o in (owners or {}).items() if b in rows.bins}
        self.notes_per_track = dict.fromkeys(self.constraints, 0)
        velocity_bin = (np.arange(len(rows)) - FIRST_NOTE_ROW) % vocab.N_VELOCITY_BINS
        pitch = (np.arange(len(rows)) - FIRST_NOTE_ROW) // vocab.N_VELOCITY_BINS % vocab.N_PITCHES
        self.track_rows: dict[int, np.ndarray] = {}
        """Track -> its note-on rows: the pitches it owns at the velocities it allows."""
        for track, constraint in self.constraints.items():
            mask = np.zeros(len(rows), dtype=bool)
            for instrument_bin, owner in self.owners.items():
                block = rows.bin_rows(instrument_bin)
                mask[block] = (owner[pitch[block]] == track) & rows.note_on_rows[block]
            if constraint.velocity_bins is not None:
                low, high = constraint.velocity_bins
                mask &= (velocity_bin >= low) & (velocity_bin <= high)
            self.track_rows[track] = mask
        self.harmony_rows = np.zeros(len(rows), dtype=np.float64)
        """Each track's harmony bias on its note-on rows (constant over the answer)."""
        for track, constraint in self.constraints.items():
            if constraint.pitch_class_bias is not None:
                rows_of_track = self.track_rows[track]
                self.harmony_rows[rows_of_track] = constraint.pitch_class_bias[pitch[rows_of_track] % 12]
        self.on_permitted = np.ones(len(rows), dtype=bool)
        """Note-on rows some track's pitch and velocity range allow."""
        for instrument_bin in self.owners:
            self.on_permitted[rows.bin_rows(instrument_bin)] = False
        for mask in self.track_rows.values():
            self.on_permitted |= mask
        gridded = [c.grid_steps for track, c in self.constraints.items() if self.track_rows[track].any()]
        self.landing_steps = (np.unique(np.concatenate(gridded))
                              if gridded and all(g is not None for g in gridded) else None)
        """Where waits may end when every track that can play has a grid (besides the next fixed event
        and the end)."""
        self.guide = guide if guide is not None and guide.gain > 0 else None
        self.guide_steps = np.array(sorted(self.guide.onsets) if self.guide else [], dtype=np.int64)
        self.guide_played: set[tuple[int, int]] = set()
        """Keys of the guide's notes at the clock that the answer has played."""
        self.guided_rows = np.zeros(len(rows), dtype=bool)
        """Note-on rows of the tracks the guide guides (every note-on row without controls)."""
        if self.guide is not None:
            for track in self.guide.tracks:
                self.guided_rows |= self.track_rows.get(track, rows.note_on_rows)

    @property
    def finishing(self) -> bool:
        return self.n_sampled >= self.max_sampled_tokens

    def _wait_limit_step(self) -> int:
        next_event = self.events[0][0] if self.events else self.n_steps
        return min(next_event, self.n_steps)

    def _owner(self, key: tuple[int, int]) -> Optional[int]:
        """The target track a key's notes belong to, None in a bin without controls."""
        owner = self.owners.get(key[0])
        return None if owner is None or owner[key[1]] < 0 else int(owner[key[1]])

    def _on_grid(self, track: Optional[int]) -> bool:
        """Whether the track's notes may start at the clock (they may end anywhere)."""
        constraint = self.constraints.get(track)
        if constraint is None or constraint.grid_steps is None:
            return True
        steps = constraint.grid_steps
        index = np.searchsorted(steps, self.clock)
        return bool(index < len(steps) and steps[index] == self.clock)

    def _sounding(self, track: int) -> int:
        """Notes of the track sounding now: opened by the answer or held from before the range."""
        return (sum(1 for key in self.open_keys if self._owner(key) == track)
                + sum(1 for key, until in self.held.items() if self._owner(key) == track and self.clock < until))

    def _allowed_waits(self, limit: int) -> np.ndarray:
        """Wait lengths (1..) the clock may move by, up to limit: onto a grid line or the limit itself
        when every bin has a grid (a whole second when no line is that near), any length otherwise."""
        max_wait = min(limit - self.clock, vocab.MAX_WAIT_STEPS_PER_TOKEN)
        if max_wait <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.landing_steps is None:
            return np.arange(1, max_wait + 1)
        landing = np.union1d(self.landing_steps, self._aimed_ends())
        ahead = landing[(landing > self.clock) & (landing <= self.clock + max_wait)]
        if limit - self.clock <= max_wait:
            ahead = np.append(ahead, limit)
        elif not len(ahead):
            ahead = np.array([self.clock + max_wait])
        return np.unique(ahead - self.clock)

    def _aimed_ends(self) -> np.ndarray:
        """Steps where the open answer notes reach the lengths they aim at: the clock may stop there
        between grid lines, to end a note (a detached note ends before the next line)."""
        ends = [open_step + round(length) for key, open_step in self.open_keys.items()
                if (length := self._aimed_length_steps(key, open_step)) is not None]
        return np.array(ends, dtype=np.int64)

    def _aimed_length_steps(self, key: tuple[int, int], open_step: int) -> Optional[float]:
        """The length in steps the key's note opened at open_step aims at: the guide's note's where it
        has that note, else the length control's; None without either."""
        if self.guide is not None and (open_step, *key) in self.guide.length_steps:
            return self.guide.length_steps[(open_step, *key)]
        constraint = self.constraints.get(self._owner(key))
        if constraint is None or constraint.note_length_steps is None:
            return None
        return float(constraint.note_length_steps[min(max(open_step, 0), self.n_steps)])

    def _last_onset_step(self) -> int:
        """The last step before the end where a note may start."""
        if self.landing_steps is None:
            return self.n_steps - 1
        before = self.landing_steps[self.landing_steps < self.n_steps]
        return int(before[-1]) if len(before) else self.n_steps - 1

    def _close_open_notes(self) -> None:
        """Queue note-offs for the keys opened before now (a key opened now must wait a step)."""
        for instrument_bin, pitch in sorted(k for k, step in self.open_keys.items() if step < self.clock):
            self.forced.append((vocab.note_id(instrument_bin, pitch, 0), False))

    def forced_token(self) -> Optional[int]:
        """The next token if the constraints decide it, else None (sample with `allowed_rows`)."""
        if not self.forced:
            while self.events and self.events[0][0] == self.clock:
                _, token_id = self.events.popleft()
                key = vocab.note_fields(token_id)[:2]
                if vocab.is_note_on(token_id) and key in self.open_keys:
                    self.forced.append((vocab.note_id(*key, 0), False))
                self.forced.append((token_id, True))
        if not self.forced and self.clock >= self.n_steps:
            self._close_open_notes()
            self.forced.append((vocab.ANS_ID, False))
        if not self.forced and self.finishing:
            self._close_open_notes()
            if not self.forced:  # nothing closable now: move on (through fixed events) to the end
                gap = self._wait_limit_step() - self.clock
                self.forced.append((vocab.wait_id(min(gap, vocab.MAX_WAIT_STEPS_PER_TOKEN)), False))
        if not self.forced:
            return None
        return self.forced[0][0]

    def allowed_rows(self) -> np.ndarray:
        """Bool mask over the rows of what may be sampled now."""
        allowed = self.note_allowed & self.on_permitted
        for key, until_step in self.held.items():
            if self.clock < until_step:
                base = self.rows.key_rows(*key)
                allowed[base + 1:base + vocab.N_VELOCITY_BINS] = False
        for track, constraint in self.constraints.items():
            full = constraint.max_polyphony is not None and self._sounding(track) >= constraint.max_polyphony
            if full or constraint.expected_notes == 0 or not self._on_grid(track):
                allowed &= ~self.track_rows[track]
        for key, open_step in self.open_keys.items():
            if open_step < self.clock:
                allowed[self.rows.key_rows(*key)] = True
        limit = self._wait_limit_step()
        if self.need_note and self.n_notes == 0:
            limit = min(limit, self._last_onset_step())
        last_chance = self.n_sampled == self.max_sampled_tokens - 1
        if not (self.need_note and self.n_notes == 0 and last_chance and allowed.any()):
            allowed[FIRST_WAIT_ROW - 1 + self._allowed_waits(limit)] = True
        if not allowed.any():  # the note an empty answer needs cannot start here: let it pass
            allowed[FIRST_WAIT_ROW - 1 + self._allowed_waits(self._wait_limit_step())] = True
        return allowed

    def _density_push(self, track: int, constraint: TrackConstraints) -> float:
        """The note-on bias that keeps the track's note count to its density's pace: a pull of
        DENSITY_PULL_PER_NOTE per note once the count reaches the pace (plus a lead of up to
        DENSITY_LEAD_NOTES), a gentle push while it is behind. The pace is even over the range,
        or, for a track the guide guides, where the guide's notes fall."""
        ahead = min(constraint.max_polyphony or 1, DENSITY_LEAD_NOTES)
        guide_onsets = self.guide.track_onsets.get(track) if self.guide is not None else None
        share = (np.searchsorted(guide_onsets, self.clock, side="right") / len(guide_onsets)
                 if guide_onsets is not None and len(guide_onsets) else self.clock / max(1, self.n_steps))
        expected = constraint.expected_notes * share + ahead
        n_notes = self.notes_per_track[track]
        if n_notes >= expected:
            return -min(MAX_DENSITY_PULL, DENSITY_PULL_PER_NOTE * (n_notes - expected + 1.0))
        return min(MAX_DENSITY_PUSH, DENSITY_GAIN * float(np.log((expected + 1.0) / (n_notes + 1.0))))

    def _guide_bias(self) -> np.ndarray:
        """The repeat guide's bias (R,) now: toward the guide's notes of the clock still to play and
        the note-offs of the guide's notes that have reached their length, against other note-ons,
        toward the wait onto the guide's next onset or note end and against waits past it."""
        guide = self.guide
        bias = np.zeros(len(self.rows))
        stray = GUIDE_STRAY_SHARE * guide.gain
        bias[self.guided_rows] -= stray
        due = guide.onsets.get(self.clock, frozenset()) - self.guide_played
        for key in due:
            base = self.rows.key_rows(*key)
            if base is not None:
                bias[base + 1:base + vocab.N_VELOCITY_BINS] += stray + guide.gain
        ends = {key: open_step + round(guide.length_steps[(open_step, *key)])
                for key, open_step in self.open_keys.items() if (open_step, *key) in guide.length_steps}
        ending = [key for key, end in ends.items() if end <= self.clock and self.open_keys[key] < self.clock]
        for key in ending:
            bias[self.rows.key_rows(*key)] += guide.gain
        waits = slice(FIRST_WAIT_ROW, FIRST_WAIT_ROW + len(WAIT_LENGTHS_STEPS))
        if due or ending:
            bias[waits] -= stray
        later = np.concatenate([self.guide_steps[self.guide_steps > self.clock],
                                [end for end in ends.values() if end > self.clock]])
        if len(later):
            landing = self.clock + WAIT_LENGTHS_STEPS
            target = later.min()
            bias[waits] += np.where(landing == target, guide.gain, np.where(landing > target, -guide.gain, 0.0))
        return bias

    def row_bias(self) -> Optional[np.ndarray]:
        """Logit biases (R,) of the harmony, density and note-length controls and the repeat guide
        now, or None when there are none."""
        if self.guide is None and all(c.expected_notes is None and c.note_length_steps is None
                                      and c.pitch_class_bias is None for c in self.constraints.values()):
            return None
        bias = self.harmony_rows.copy()
        if self.guide is not None:
            bias += self._guide_bias()
        for track, constraint in self.constraints.items():
            if constraint.expected_notes is not None:
                push = self._density_push(track, constraint)
                if self.need_note and self.n_notes == 0:  # the note an empty answer needs is not held back
                    push = max(push, 0.0)
                bias += push * self.track_rows[track]
        overshoot = np.zeros(len(WAIT_LENGTHS_STEPS))
        for key, open_step in self.open_keys.items():
            length_steps = self._aimed_length_steps(key, open_step)
            if length_steps is not None:
                age = self.clock - open_step
                bias[self.rows.key_rows(*key)] += np.clip(
                    LENGTH_GAIN * np.log((age + 0.5) / length_steps), -MAX_LENGTH_BIAS, MAX_LENGTH_BIAS)
                overshoot = np.maximum(overshoot, np.clip(LENGTH_GAIN * np.log(
                    (age + WAIT_LENGTHS_STEPS - 0.5) / length_steps), 0.0, MAX_LENGTH_BIAS))
        bias[FIRST_WAIT_ROW:FIRST_WAIT_ROW + len(WAIT_LENGTHS_STEPS)] -= overshoot
        return bias

    def sampled_row_token(self, row: int) -> int:
        return int(self.rows.token_ids[row])

    def _set_key(self, key: tuple[int, int], sounding: bool) -> None:
        base = self.rows.key_rows(*key)
        if base is not None:
            self.note_allowed[base + 1:base + vocab.N_VELOCITY_BINS] = not sounding

    def advance(self, token_id: int, sampled_row: Optional[int] = None) -> None:
        """Append a token (forced, or sampled from `sampled_row`) and update the constraints."""
        is_fixed = False
        if sampled_row is None:
            token_id, is_fixed = self.forced.popleft()
        self.answer_ids.append(token_id)
        if sampled_row is not None:
            self.n_sampled += 1
            self.presence *= REPETITION_DECAY
            self.presence[sampled_row] += 1.0
        if token_id == vocab.ANS_ID:
            self.done = True
        elif vocab.is_wait(token_id):
            self.clock += vocab.wait_steps(token_id)
            self.guide_played.clear()
        else:
            instrument_bin, pitch, velocity_bin = vocab.note_fields(token_id)
            key = (instrument_bin, pitch)
            if is_fixed and velocity_bin:
                self.fixed_keys.add(key)
            elif is_fixed:
                self.fixed_keys.discard(key)
            elif velocity_bin:
                self.open_keys[key] = self.clock
                self.guide_played.add(key)
                self.n_notes += 1
                owner = self._owner(key)
                if owner in self.notes_per_track:
                    self.notes_per_track[owner] += 1
            else:
                self.open_keys.pop(key, None)
            self._set_key(key, key in self.open_keys or key in self.fixed_keys)


def sample_row(logits: np.ndarray, allowed: np.ndarray, presence: np.ndarray, options: SamplingOptions,
               note_on_rows: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one allowed row from logits (R,) with temperature, repetition penalty, top-k and top-p."""
    scores = np.where(allowed, logits.astype(np.float64), -np.inf)
    if options.repetition_penalty:
        scores = scores - options.repetition_penalty * presence * note_on_rows
    if options.temperature == 0:
        return int(np.argmax(scores))
    scores = scores / options.temperature
    n_allowed = int(allowed.sum())
    if 0 < options.top_k < n_allowed:
        kth = np.partition(scores, -options.top_k)[-options.top_k]
        scores = np.where(scores >= kth, scores, -np.inf)
    probabilities = np.exp(scores - scores.max())
    order = np.argsort(-probabilities, kind="stable")
    sorted_probabilities = probabilities[order] / probabilities.sum()
    cumulative = np.cumsum(sorted_probabilities)
    n_kept = int(np.searchsorted(cumulative, options.top_p - 1e-12)) + 1
    kept = sorted_probabilities[:n_kept]
    choice = int(np.searchsorted(np.cumsum(kept), rng.random() * kept.sum(), side="right"))
    return int(order[min(choice, n_kept - 1)])
