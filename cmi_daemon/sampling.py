"""Constrained sampling of an infill answer: which tokens may come next, and drawing one.

The decoder only ever scores a small set of rows of the head (`AnswerRows`): `<ans>`, the 125
waits and every note token of the target tracks' bins. Per candidate, `AnswerState` follows the
answer as it grows and says what is allowed next:
- waits never pass the blank's end, nor the next note of another track inside the range
  (`Region.fixed_notes`: those are forced in at their steps, with their note-offs);
- a note-on only for a key that is silent, counting the target tracks' notes that start before
  the range and sound into it (a new note would cut them short in a MIDI channel); a note-off only for a key the answer opened at an
  earlier step (no zero-length notes);
- `<ans>` never sampled: when the clock reaches the blank's end, the open notes are closed
  and `<ans>` follows, all forced;
- where the context is dense (the target bins play at least MIN_EXPECTED_NOTES notes per blank
  length on average), waits stop one step short of the end until the answer has a note;
- after max_sampled_tokens sampled tokens the answer is finished by force: open notes closed,
  waits to the end (through any fixed notes), `<ans>`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from . import vocab
from .regions import Region, track_bin
from .tokens import Song, ms_to_step

MIN_EXPECTED_NOTES = 1.0
"""A context whose target-bin note rate predicts at least this many notes in the blank forbids an empty answer."""
REPETITION_DECAY = 0.95
"""Per sampled token, earlier uses of a note-on count this much less toward the repetition penalty."""
NOTE_TOKENS_PER_BIN = vocab.N_PITCHES * vocab.N_VELOCITY_BINS
ANS_ROW = 0
FIRST_WAIT_ROW = 1
FIRST_NOTE_ROW = FIRST_WAIT_ROW + vocab.MAX_WAIT_STEPS_PER_TOKEN


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


def requires_note(region: Region) -> bool:
    """Whether the context's target-bin note rate predicts at least MIN_EXPECTED_NOTES in the blank."""
    context = region.prefix_ids + region.suffix_ids
    context_steps = sum(vocab.wait_steps(t) for t in context)
    if context_steps == 0 or region.n_steps < 1:
        return False
    n_notes = sum(1 for t in context if vocab.is_note(t) and vocab.note_fields(t)[2] > 0
                  and vocab.note_bin(t) in region.target_bins)
    return n_notes * region.n_steps / context_steps >= MIN_EXPECTED_NOTES


class AnswerState:
    """One candidate's answer so far, and what may follow it."""

    def __init__(self, rows: AnswerRows, n_steps: int, events: Sequence[tuple[int, int]], need_note: bool,
                 max_sampled_tokens: int, held: Optional[dict[tuple[int, int], int]] = None):
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

    @property
    def finishing(self) -> bool:
        return self.n_sampled >= self.max_sampled_tokens

    def _wait_limit_step(self) -> int:
        next_event = self.events[0][0] if self.events else self.n_steps
        return min(next_event, self.n_steps)

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
                if vocab.note_fields(token_id)[2] and key in self.open_keys:
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
        allowed = self.note_allowed.copy()
        for key, until_step in self.held.items():
            if self.clock < until_step:
                base = self.rows.key_rows(*key)
                allowed[base + 1:base + vocab.N_VELOCITY_BINS] = False
        for key, open_step in self.open_keys.items():
            if open_step < self.clock:
                allowed[self.rows.key_rows(*key)] = True
        limit = self._wait_limit_step()
        if self.need_note and self.n_notes == 0:
            limit = min(limit, self.n_steps - 1)
        max_wait = min(limit - self.clock, vocab.MAX_WAIT_STEPS_PER_TOKEN)
        if max_wait > 0:
            allowed[FIRST_WAIT_ROW:FIRST_WAIT_ROW + max_wait] = True
        return allowed

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
        else:
            instrument_bin, pitch, velocity_bin = vocab.note_fields(token_id)
            key = (instrument_bin, pitch)
            if is_fixed and velocity_bin:
                self.fixed_keys.add(key)
            elif is_fixed:
                self.fixed_keys.discard(key)
            elif velocity_bin:
                self.open_keys[key] = self.clock
                self.n_notes += 1
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
