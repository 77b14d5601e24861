"""What "infill [start_qn, end_qn) of these tracks" means in token space, and back.

Region semantics: notes of the target tracks that start inside the range are the blank and will
be replaced; notes that start before it are kept whole, and the model sees them end at the range
start; notes that start at or after the range end are untouched. Notes of other tracks that start
inside the range are context the model hears while it fills the blank (`fixed_notes`). Answers
never produce a note outside the range.

The ILM sequence is `prefix <mask> suffix <sep> [answer <ans>]`: the prefix ends with waits up
to the range start, the answer spans exactly the range (its waits end at the range end), and
the suffix continues from the range end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from . import vocab
from .errors import RegionError
from .tokens import Event, Note, Song, decode_ids, events_to_ids, ms_to_step, note_events, timed_notes

DEFAULT_CONTEXT_TOKENS = 2048


@dataclass
class Region:
    start_qn: float
    end_qn: float
    start_step: int
    end_step: int
    target_tracks: tuple[int, ...]
    prefix_ids: list[int]
    blank_ids: list[int]
    """What the range holds now (all tracks), from the range start to its end, without `<ans>`."""
    suffix_ids: list[int]
    fixed_notes: frozenset[tuple[int, int, int]]
    """(onset step, bin, pitch) of other tracks' notes inside the range. A target note doubling one
    of them is heard once in the tokens, as the other track's."""
    target_bins: dict[int, tuple[int, ...]]
    """Instrument bin -> target tracks that play it."""
    pitch_centre: dict[int, float]
    """Mean pitch of each target track's notes outside the range, to tell tracks of one bin apart."""

    @property
    def n_steps(self) -> int:
        return self.end_step - self.start_step

    def ilm_ids(self, answer_ids: Optional[Sequence[int]] = None) -> list[int]:
        """`prefix <mask> suffix <sep>`, followed by `answer <ans>` when an answer is given."""
        ids = [*self.prefix_ids, vocab.MASK_ID, *self.suffix_ids, vocab.SEP_ID]
        if answer_ids is not None:
            ids += [*answer_ids, vocab.ANS_ID]
        return ids

    def expected_answer_tokens(self) -> int:
        """Length of the blank: what it holds now, or the context's token rate over its steps."""
        if any(vocab.is_note(t) for t in self.blank_ids):
            return len(self.blank_ids)
        context = self.prefix_ids + self.suffix_ids
        context_steps = sum(vocab.wait_steps(t) for t in context)
        if context_steps == 0:
            return max(1, len(self.blank_ids))
        n_events = sum(1 for t in context if vocab.is_note(t))
        return max(1, len(vocab.wait_ids(self.n_steps)) + round(n_events * self.n_steps / context_steps))


def track_bin(song: Song, track_index: int) -> int:
    """Bin a DAW track's notes take: its program's, or vocab.FALLBACK_BIN for programs with none."""
    instrument_bin = song.tracks[track_index].instrument_bin
    return vocab.FALLBACK_BIN if instrument_bin is None else instrument_bin


def build_region(song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int],
                 context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> Region:
    """Cut the song into prefix / blank / suffix around [start_qn, end_qn).

    context_tokens bounds prefix + suffix together; each side gets half, and a side that needs
    less leaves the rest to the other.
    """
    _check_request(song, start_qn, end_qn, target_tracks, context_tokens)
    targets = tuple(sorted(set(target_tracks)))
    start_ms, end_ms = song.tempo_map.ms_at(start_qn), song.tempo_map.ms_at(end_qn)
    start_step, end_step = (int(s) for s in ms_to_step([start_ms, end_ms]))

    notes, _ = timed_notes(song, fallback_bin=vocab.FALLBACK_BIN)
    part = []  # 0 before the range, 1 inside, 2 after
    clipped = []
    for note in notes:  # ms_at is monotonic, so comparing in ms is comparing in QN
        end_note_ms = note.start_ms + note.duration_ms
        if note.start_ms < start_ms:
            part.append(0)
            end_note_ms = min(end_note_ms, start_ms)
        elif note.start_ms < end_ms:
            part.append(1)
            end_note_ms = min(end_note_ms, end_ms)
        else:
            part.append(2)
        clipped.append(note._replace(duration_ms=max(0.0, end_note_ms - note.start_ms)))
    events, _ = note_events(clipped)
    sides: tuple[list[Event], list[Event], list[Event]] = ([], [], [])
    for event in events:
        sides[part[event.note]].append(event)
    prefix_events, blank_events, suffix_events = sides

    prefix_ids = events_to_ids(prefix_events, until_step=start_step)
    blank_ids = events_to_ids(blank_events, clock_step=start_step, until_step=end_step)
    suffix_ids = events_to_ids(suffix_events, clock_step=end_step)
    prefix_ids, suffix_ids = _bound_context(prefix_ids, suffix_ids, context_tokens)

    fixed = frozenset(
        (int(ms_to_step(note.start_ms)), note.instrument_bin, note.pitch)
        for note, where in zip(clipped, part) if where == 1 and note.source not in targets)
    target_bins: dict[int, tuple[int, ...]] = {}
    for track_index in targets:
        instrument_bin = track_bin(song, track_index)
        target_bins[instrument_bin] = target_bins.get(instrument_bin, ()) + (track_index,)
    pitch_centre = {}
    for track_index in targets:
        outside = [n.pitch for n in song.tracks[track_index].notes if not start_qn <= n.start_qn < end_qn]
        pitch_centre[track_index] = sum(outside) / len(outside) if outside else 60.0
    return Region(float(start_qn), float(end_qn), start_step, end_step, targets, prefix_ids, blank_ids,
                  suffix_ids, fixed, target_bins, pitch_centre)


def _check_request(song: Song, start_qn, end_qn, target_tracks, context_tokens) -> None:
    if not (math.isfinite(start_qn) and math.isfinite(end_qn)):
        raise RegionError(f"range [{start_qn}, {end_qn}) is not finite")
    if start_qn < 0:
        raise RegionError(f"range starts at QN {start_qn}, before the start of the song")
    if end_qn <= start_qn:
        raise RegionError(f"range [{start_qn}, {end_qn}) is empty: its end must come after its start")
    if not target_tracks:
        raise RegionError("no target track: name at least one track to infill")
    for track_index in target_tracks:
        if not 0 <= track_index < len(song.tracks):
            raise RegionError(f"target track {track_index} does not exist (the song has {len(song.tracks)} tracks)")
    if context_tokens < 0:
        raise RegionError(f"context budget {context_tokens} tokens is negative")


def _bound_context(prefix_ids: list[int], suffix_ids: list[int], budget: int) -> tuple[list[int], list[int]]:
    if len(prefix_ids) + len(suffix_ids) <= budget:
        return prefix_ids, suffix_ids
    half = budget // 2
    prefix_keep = max(half, budget - len(suffix_ids))
    suffix_keep = budget - min(prefix_keep, len(prefix_ids))
    prefix = prefix_ids[len(prefix_ids) - min(prefix_keep, len(prefix_ids)):]
    while prefix and vocab.is_wait(prefix[0]) and any(vocab.is_note(t) for t in prefix):
        prefix = prefix[1:]
    suffix = suffix_ids[:suffix_keep]
    while suffix and vocab.is_wait(suffix[-1]):
        suffix = suffix[:-1]
    return prefix, suffix


def answer_notes(song: Song, region: Region, answer_ids: Sequence[int]) -> dict[int, list[Note]]:
    """Notes an answer puts on each target track, all inside [start_qn, end_qn).

    A trailing `<ans>` is allowed. Notes of other tracks that the answer repeats (the fixed
    notes), notes of bins no target plays and notes starting at or after the range end are left
    out; notes still sounding at the end stop there.
    """
    answer_ids = list(answer_ids)
    if answer_ids and answer_ids[-1] == vocab.ANS_ID:
        answer_ids.pop()
    result: dict[int, list[Note]] = {t: [] for t in region.target_tracks}
    tempo_map = song.tempo_map
    for note in decode_ids(answer_ids, start_step=region.start_step):
        on_step = round(note.start_ms / vocab.WAIT_STEP_MS)
        if on_step >= region.end_step or (on_step, note.instrument_bin, note.pitch) in region.fixed_notes:
            continue
        tracks = region.target_bins.get(note.instrument_bin)
        if not tracks:
            continue
        track = min(tracks, key=lambda t: abs(region.pitch_centre[t] - note.pitch))
        start = max(region.start_qn, float(tempo_map.qn_at(note.start_ms)))
        end = min(region.end_qn, float(tempo_map.qn_at(note.start_ms + note.duration_ms)))
        if end > start:
            result[track].append(Note(start, end - start, note.pitch, note.velocity))
    return result


def apply_answer(song: Song, region: Region, answer_ids: Sequence[int]) -> Song:
    """The song with the target tracks' notes starting inside the range replaced by the answer's."""
    new_notes = answer_notes(song, region, answer_ids)
    tracks = []
    for index, track in enumerate(song.tracks):
        if index in new_notes:
            kept = [n for n in track.notes if not region.start_qn <= n.start_qn < region.end_qn]
            track = replace(track, notes=sorted(kept + new_notes[index]))
        tracks.append(track)
    return replace(song, tracks=tracks)
