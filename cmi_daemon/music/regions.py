"""What "infill [start_qn, end_qn) of these tracks" means in token space, and back.

Region semantics: notes of the target tracks that start inside the range are the blank and will
be replaced; notes that start before it are kept whole, and the model sees them end at the range
start; notes that start at or after the range end are untouched. Notes of other tracks that start
inside the range are context the model hears while it fills the blank (`fixed_notes`). Answers
never produce a note outside the range.

The cut (`cut_notes`), the ILM sequence (`ilm_sequence`) and the JEPA sequence (`jepa_sequence`)
are defined here once, for training (`training.data.batches` cuts token windows with them), evaluation,
DIL and the engine. The ILM sequence is `prefix <mask> suffix <sep> [answer <ans>]`: the prefix
ends with waits up to the range start, the answer spans exactly the range (its waits end at the
range end), and the suffix continues from the range end. The JEPA sequence is prefix + blank +
suffix: the blank's positions are the predictor's targets, the others the encoder's context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from ..errors import RegionError
from . import vocab
from .tokens import Note, Song, TimedNote, decode_ids, events_to_ids, ms_to_step, note_events, timed_notes

DEFAULT_CONTEXT_TOKENS = 2048
MAX_CONTEXT_GAP_STEPS = 10 * vocab.MAX_WAIT_STEPS_PER_TOKEN
"""A silence in the prefix or suffix longer than this many steps (10 s at 8 ms, 52 QN at 24 a QN)
is written as this long, as the reference tokenizer cuts silences over 10 s: the music on either
side of it is what the model reads, and a range far past a song's end costs ten wait tokens."""


class Cut(NamedTuple):
    """Token ids of the music before, inside and after a range: prefix + blank + suffix, in order."""
    prefix_ids: list[int]
    blank_ids: list[int]
    suffix_ids: list[int]


def cut_notes(notes: Sequence[TimedNote], start_ms: float, end_ms: float) -> Cut:
    """The prefix / blank / suffix cut of timed notes at [start_ms, end_ms), for training and serving.

    A note's side is where its onset lies; notes before the range end by its start, notes inside
    it by its end; the prefix's and the suffix's silences are cut to MAX_CONTEXT_GAP_STEPS. Each
    side becomes events on its own (tokens.note_events), so the tokenizer's merge of two notes of
    one key starting in one 8 ms step never joins notes of two sides (it
    would carry the later note's end across the boundary: a negative wait). The prefix ends with
    waits up to the range start, the blank spans exactly the range, the suffix starts at its end.
    """
    notes = sorted(notes, key=lambda note: note.start_ms)
    first, after = side_bounds(np.array([note.start_ms for note in notes], dtype=np.float64), start_ms, end_ms)
    return Cut(side_ids(notes[:first], 0, start_ms, end_ms), side_ids(notes[first:after], 1, start_ms, end_ms),
               side_ids(notes[after:], 2, start_ms, end_ms))


def side_bounds(onsets_ms: np.ndarray, start_ms: float, end_ms: float) -> tuple[int, int]:
    """Where the blank's notes start and end in notes sorted by onset: [:first] lie before the
    range, [first:after] inside it, [after:] after it."""
    first, after = np.searchsorted(onsets_ms, [start_ms, end_ms], side="left")
    return int(first), int(after)


def side_ids(notes: Sequence[TimedNote], side: int, start_ms: float, end_ms: float) -> list[int]:
    """Token ids of one side of the cut at [start_ms, end_ms) (0 prefix, 1 blank, 2 suffix), from
    the notes whose onsets lie on that side."""
    bound_ms = (start_ms, end_ms, math.inf)[side]
    clipped = [note if 0.0 <= note.duration_ms and note.start_ms + note.duration_ms <= bound_ms else
               note._replace(duration_ms=max(0.0, min(note.start_ms + note.duration_ms, bound_ms) - note.start_ms))
               for note in notes]
    events, _ = note_events(clipped)
    start_step, end_step = (int(s) for s in ms_to_step([start_ms, end_ms]))
    if side == 0:
        return events_to_ids(events, until_step=start_step, max_gap_steps=MAX_CONTEXT_GAP_STEPS)
    if side == 1:
        return events_to_ids(events, clock_step=start_step, until_step=end_step)
    return events_to_ids(events, clock_step=end_step, max_gap_steps=MAX_CONTEXT_GAP_STEPS)


class ILMSequence(NamedTuple):
    """`prefix <mask> suffix <sep> [answer <ans>]` and where its infilling tokens are."""
    ids: list[int]
    mask_at: int
    sep_at: int

    @property
    def answer_start(self) -> int:
        """Position of the answer's first token (where sampling starts when there is no answer)."""
        return self.sep_at + 1


def ilm_sequence(prefix_ids: Sequence[int], suffix_ids: Sequence[int],
                 answer_ids: Optional[Sequence[int]] = None) -> ILMSequence:
    """The ILM sequence of a cut: `prefix <mask> suffix <sep>`, then `answer <ans>` when given."""
    ids = [*prefix_ids, vocab.MASK_ID, *suffix_ids, vocab.SEP_ID]
    if answer_ids is not None:
        ids += [*answer_ids, vocab.ANS_ID]
    return ILMSequence(ids, len(prefix_ids), len(prefix_ids) + 1 + len(suffix_ids))


def ilm_parts(ilm_ids: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(prefix, suffix, answer without `<ans>`) of an ILM sequence."""
    ilm_ids = list(ilm_ids)
    mask_at, sep_at = ilm_ids.index(vocab.MASK_ID), ilm_ids.index(vocab.SEP_ID)
    answer = ilm_ids[sep_at + 1:]
    if answer and answer[-1] == vocab.ANS_ID:
        answer.pop()
    return ilm_ids[:mask_at], ilm_ids[mask_at + 1:sep_at], answer


@dataclass(frozen=True)
class JEPASequence:
    """prefix + blank + suffix as the JEPA reads it: token_ids[blank_start:blank_end] is the blank
    (the predictor's targets), the rest is the context encoder's input at its own positions."""

    token_ids: tuple[int, ...]
    blank_start: int
    blank_end: int

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    def span(self, start: int, end: int) -> np.ndarray:
        mask = np.zeros(self.n_tokens, dtype=bool)
        mask[start:end] = True
        return mask

    @property
    def blank(self) -> np.ndarray:
        return self.span(self.blank_start, self.blank_end)

    def context(self) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, positions) of the context: every token outside the blank."""
        positions = np.flatnonzero(~self.blank).astype(np.int64)
        return np.asarray(self.token_ids, dtype=np.int64)[positions], positions

    @property
    def target_positions(self) -> np.ndarray:
        return np.arange(self.blank_start, self.blank_end, dtype=np.int64)


def jepa_sequence(prefix_ids: Sequence[int], blank_ids: Sequence[int], suffix_ids: Sequence[int]) -> JEPASequence:
    """The JEPA sequence of a cut (blank_ids may be placeholders: only their count matters to the
    context encoder and the predictor)."""
    ids = tuple(int(t) for t in (*prefix_ids, *blank_ids, *suffix_ids))
    return JEPASequence(ids, len(prefix_ids), len(prefix_ids) + len(blank_ids))


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
        return ilm_sequence(self.prefix_ids, self.suffix_ids, answer_ids).ids

    def expected_answer_tokens(self) -> int:
        """Length of the blank: what it holds now, or the context's token rate over its steps."""
        if any(vocab.is_note(t) for t in self.blank_ids):
            return len(self.blank_ids)
        context = self.prefix_ids + self.suffix_ids
        context_steps = vocab.total_steps(context)
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
    """Cut the song into prefix / blank / suffix around [start_qn, end_qn) (`cut_notes`).

    context_tokens bounds prefix + suffix together; each side gets half, and a side that needs
    less leaves the rest to the other.
    """
    return SongCutter(song).regions(start_qn, end_qn, [target_tracks], context_tokens)[0]


class SongCutter:
    """Regions of one song at many ranges. The song's notes are timed once, and a prefix or a
    suffix, which depends on one boundary only, is made once for all the ranges that share it."""

    def __init__(self, song: Song):
        self.song = song
        notes, _ = timed_notes(song, fallback_bin=vocab.FALLBACK_BIN)
        self.notes = sorted(notes, key=lambda note: note.start_ms)
        self.onsets_ms = np.array([note.start_ms for note in self.notes], dtype=np.float64)
        self._track_notes = [(np.array([n.start_qn for n in track.notes], dtype=np.float64),
                              np.array([n.pitch for n in track.notes], dtype=np.int64)) for track in song.tracks]
        """Per track: its notes' onsets (QN) and pitches."""
        self._prefixes: dict[float, list[int]] = {}
        self._suffixes: dict[float, list[int]] = {}

    def cut(self, start_ms: float, end_ms: float) -> Cut:
        """cut_notes(the song's notes, start_ms, end_ms), its prefix and suffix kept for reuse."""
        first, after = side_bounds(self.onsets_ms, start_ms, end_ms)
        if start_ms not in self._prefixes:
            self._prefixes[start_ms] = side_ids(self.notes[:first], 0, start_ms, end_ms)
        if end_ms not in self._suffixes:
            self._suffixes[end_ms] = side_ids(self.notes[after:], 2, start_ms, end_ms)
        return Cut(self._prefixes[start_ms], side_ids(self.notes[first:after], 1, start_ms, end_ms),
                   self._suffixes[end_ms])

    def regions(self, start_qn: float, end_qn: float, target_sets: Sequence[Sequence[int]],
                context_tokens: int = DEFAULT_CONTEXT_TOKENS) -> list[Region]:
        """build_region of one range for each set of target tracks, from one cut (the cut does not
        depend on the targets: every track's notes inside the range are the blank)."""
        song = self.song
        _check_range(start_qn, end_qn, context_tokens)
        for target_tracks in target_sets:
            _check_targets(song, target_tracks)
        start_ms, end_ms = (float(t) for t in song.tempo_map.ms_at([start_qn, end_qn]))
        start_step, end_step = (int(s) for s in ms_to_step([start_ms, end_ms]))
        cut = self.cut(start_ms, end_ms)  # ms_at is monotonic, so comparing in ms is comparing in QN
        prefix_ids, suffix_ids = _bound_context(cut.prefix_ids, cut.suffix_ids, context_tokens)
        inside = self.notes[slice(*side_bounds(self.onsets_ms, start_ms, end_ms))]
        inside_steps = ms_to_step([note.start_ms for note in inside]).tolist()
        regions = []
        for target_tracks in target_sets:
            targets = tuple(sorted(set(target_tracks)))
            fixed = frozenset((step, note.instrument_bin, note.pitch)
                              for note, step in zip(inside, inside_steps) if note.source not in targets)
            target_bins: dict[int, tuple[int, ...]] = {}
            for track_index in targets:
                instrument_bin = track_bin(song, track_index)
                target_bins[instrument_bin] = target_bins.get(instrument_bin, ()) + (track_index,)
            pitch_centre = {}
            for track_index in targets:
                onsets_qn, pitches = self._track_notes[track_index]
                outside = pitches[(onsets_qn < start_qn) | (onsets_qn >= end_qn)]
                pitch_centre[track_index] = int(outside.sum()) / len(outside) if len(outside) else 60.0
            regions.append(Region(float(start_qn), float(end_qn), start_step, end_step, targets, prefix_ids,
                                  cut.blank_ids, suffix_ids, fixed, target_bins, pitch_centre))
        return regions


def region_in_window(song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int], window_tokens: int,
                     blank_tokens: Callable[[Region], int] = Region.expected_answer_tokens) -> Region:
    """The region whose prefix + blank + suffix fits window_tokens (a model's window), the blank
    counted by blank_tokens: context is cut first, down to a quarter of the window."""
    region = build_region(song, start_qn, end_qn, target_tracks, window_tokens)
    n_blank = blank_tokens(region)
    if len(region.prefix_ids) + len(region.suffix_ids) + n_blank > window_tokens:
        region = build_region(song, start_qn, end_qn, target_tracks, max(window_tokens // 4, window_tokens - n_blank))
    return region


def _check_range(start_qn, end_qn, context_tokens) -> None:
    if not (math.isfinite(start_qn) and math.isfinite(end_qn)):
        raise RegionError(f"range [{start_qn}, {end_qn}) is not finite")
    if start_qn < 0:
        raise RegionError(f"range starts at QN {start_qn}, before the start of the song")
    if end_qn <= start_qn:
        raise RegionError(f"range [{start_qn}, {end_qn}) is empty: its end must come after its start")
    if context_tokens < 0:
        raise RegionError(f"context budget {context_tokens} tokens is negative")


def _check_targets(song: Song, target_tracks) -> None:
    if not target_tracks:
        raise RegionError("no target track: name at least one track to infill")
    for track_index in target_tracks:
        if not 0 <= track_index < len(song.tracks):
            raise RegionError(f"target track {track_index} does not exist (the song has {len(song.tracks)} tracks)")


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


def answer_notes(song: Song, region: Region, answer_ids: Sequence[int],
                 owners: Optional[dict[int, Sequence[int]]] = None) -> dict[int, list[Note]]:
    """Notes an answer puts on each target track, all inside [start_qn, end_qn).

    A trailing `<ans>` is allowed. Notes of other tracks that the answer repeats (the fixed
    notes), notes of bins no target plays and notes starting at or after the range end are left
    out; notes still sounding at the end stop there. A note goes to the track `owners` (bin ->
    track per pitch, as the sampler's `sampling.pitch_owners`) gives its pitch, else to its bin's
    target track whose notes around the range are nearest its pitch.
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
        owner = -1 if owners is None or note.instrument_bin not in owners else owners[note.instrument_bin][note.pitch]
        track = int(owner) if owner >= 0 else min(tracks, key=lambda t: abs(region.pitch_centre[t] - note.pitch))
        start = max(region.start_qn, float(tempo_map.qn_at(note.start_ms)))
        end = min(region.end_qn, float(tempo_map.qn_at(note.start_ms + note.duration_ms)))
        if end > start:
            result[track].append(Note(start, end - start, note.pitch, note.velocity))
    return result


def replace_notes_in_range(song: Song, start_qn: float, end_qn: float,
                           new_notes: Mapping[int, Sequence[Sequence]]) -> Song:
    """The song with the notes of each track in new_notes that start in [start_qn, end_qn) replaced
    by its new notes (start_qn, duration_qn, pitch, velocity); an empty list only removes them.
    Other tracks, and every note starting outside the range, are as they were."""
    tracks = []
    for index, track in enumerate(song.tracks):
        if index in new_notes:
            kept = [n for n in track.notes if not start_qn <= n.start_qn < end_qn]
            track = replace(track, notes=sorted(kept + [Note(*n) for n in new_notes[index]]))
        tracks.append(track)
    return replace(song, tracks=tracks)


def window_song(song: Song, start_qn: float, end_qn: float) -> Song:
    """The song cut to notes starting in [start_qn, end_qn), each ending by end_qn."""
    tracks = [track.__class__(track.name, track.program, track.is_drum,
                              [Note(n.start_qn, min(n.duration_qn, end_qn - n.start_qn), n.pitch, n.velocity)
                               for n in track.notes if start_qn <= n.start_qn < end_qn], track.channel)
              for track in song.tracks]
    return song.__class__(tracks, song.tempo_map, song.meter, song.ticks_per_qn)


def apply_answer(song: Song, region: Region, answer_ids: Sequence[int]) -> Song:
    """The song with the target tracks' notes starting inside the range replaced by the answer's."""
    return replace_notes_in_range(song, region.start_qn, region.end_qn, answer_notes(song, region, answer_ids))
