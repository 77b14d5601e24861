"""Where a song plays the bars of a range again: the section whose surroundings match the range's.

Songs repeat themselves (a second verse, the last chorus), so the best evidence of what belongs in
a range is often elsewhere in the same song: the section that follows what precedes the range and
leads into what follows it. `find_repeat` looks at every offset of the range by whole eighth notes
(a bar of any x/4 or x/8 meter is a multiple of one) and scores how many of the notes around the
range, SURROUND_QN each side and on every track, the same offset finds again (same track and pitch,
onset to KEY_STEP_QN). The target tracks' notes inside the range do not count: they are what the
infill replaces. The section it finds is the infill's guide (`inference.sampling.RepeatGuide`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .tokens import Note, Song

SEND_BARS = 64
"""Bars each side of a range a bridge sends (`hello` reports it as limits.context_bars): a song's
repeats lie far from the range (the first chorus, three minutes before the last); the controls read
the nearest `controls.CONTEXT_BARS` of them, the model what fits its window."""
SURROUND_QN = 8.0
"""QN each side of a range whose notes are matched against each candidate section's."""
OFFSET_STEP_QN = 0.5
"""Candidate sections start a whole number of these from the range (an eighth note)."""
KEY_STEP_QN = 0.25
"""Onsets are compared to the nearest 16th: a repeat played by hand still matches itself."""
MIN_SIMILARITY = 0.2
"""Sections whose surroundings share less than this (Dice) with the range's are not repeats."""
FULL_SIMILARITY = 0.5
"""Similarity from which a repeat is followed at the strength asked for (`Repeat.confidence`)."""
SAME_CONTENT = 0.9
"""A section whose target notes match the range's own this closely (Dice) is what the musician
already has: it is skipped, so that rewriting a copied chorus gives something new."""


@dataclass(frozen=True)
class Repeat:
    """The section [start_qn + offset_qn, end_qn + offset_qn) of the song, which repeats the range."""

    offset_qn: float
    similarity: float
    """Dice coefficient of the notes around the range and around the section, 0..1."""
    notes: dict[int, list[Note]]
    """Target track -> the section's notes moved into the range (starting in it, cut at its end)."""

    def as_wire(self) -> dict:
        """What the protocol's reply says of it (docs/protocol.md, `repeat`)."""
        return {"offset_qn": float(self.offset_qn), "similarity": round(self.similarity, 4)}

    @property
    def confidence(self) -> float:
        """0..1: how far to follow it, rising from 0 at MIN_SIMILARITY to 1 at FULL_SIMILARITY (a weak
        match of the surroundings is weak evidence of what the range holds)."""
        return float(np.clip((self.similarity - MIN_SIMILARITY) / (FULL_SIMILARITY - MIN_SIMILARITY), 0.0, 1.0))


def _keys(tracks: np.ndarray, pitches: np.ndarray, onsets_qn: np.ndarray) -> np.ndarray:
    """One integer per (track, pitch, onset to KEY_STEP_QN): equal keys are the same note of a figure."""
    return (tracks * 128 + pitches) * (1 << 32) + np.round(onsets_qn / KEY_STEP_QN).astype(np.int64)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) and not len(b):
        return 1.0
    return 2.0 * len(np.intersect1d(a, b)) / (len(a) + len(b))


def find_repeat(song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int],
                min_similarity: float = MIN_SIMILARITY) -> Optional[Repeat]:
    """The section of the song that best repeats [start_qn, end_qn), or None when no section's
    surroundings share min_similarity of the range's notes. A section neither overlaps the range
    nor starts before the song; of equally good ones the nearest wins, the earlier of two as near."""
    width_qn = end_qn - start_qn
    targets = set(target_tracks)
    rows = [(index, n.pitch, n.start_qn) for index, track in enumerate(song.tracks) for n in track.notes
            if not (index in targets and start_qn <= n.start_qn < end_qn)]
    if not rows or width_qn <= 0:
        return None
    tracks, pitches, onsets = (np.array(column) for column in zip(*rows))
    tracks, pitches, onsets = tracks.astype(np.int64), pitches.astype(np.int64), onsets.astype(np.float64)
    keys = np.unique(_keys(tracks, pitches, onsets))
    around = (((onsets >= start_qn - SURROUND_QN) & (onsets < start_qn))
              | ((onsets >= end_qn) & (onsets < end_qn + SURROUND_QN)))
    reference = np.unique(_keys(tracks[around], pitches[around], onsets[around]))
    if not len(reference):
        return None
    own = [(i, n.pitch, n.start_qn) for i in targets for n in song.tracks[i].notes if start_qn <= n.start_qn < end_qn]
    own_keys = np.unique(_keys(*(np.array(c) for c in zip(*own)))) if own else None
    by_onset = np.sort(onsets)
    key_steps_per_offset = round(OFFSET_STEP_QN / KEY_STEP_QN)
    song_end_qn = float(by_onset[-1])
    first = int(np.ceil(-start_qn / OFFSET_STEP_QN))
    last = int(np.floor((song_end_qn - start_qn) / OFFSET_STEP_QN))
    offsets = [k for k in range(first, last + 1) if abs(k) * OFFSET_STEP_QN >= width_qn - 1e-9]
    best: Optional[tuple[float, int]] = None
    for k in sorted(offsets, key=abs):
        offset_qn = k * OFFSET_STEP_QN
        shifted_reference = reference + k * key_steps_per_offset
        found = int((keys[np.minimum(np.searchsorted(keys, shifted_reference), len(keys) - 1)]
                     == shifted_reference).sum())
        n_around = sum(np.searchsorted(by_onset, b, "left") - np.searchsorted(by_onset, a, "left")
                       for a, b in ((start_qn + offset_qn - SURROUND_QN, start_qn + offset_qn),
                                    (end_qn + offset_qn, end_qn + offset_qn + SURROUND_QN)))
        similarity = 2.0 * found / (len(reference) + n_around)
        if similarity < min_similarity or (best is not None and similarity <= best[0]):
            continue
        if own_keys is not None:
            inside = np.isin(tracks, list(targets)) & (onsets >= start_qn + offset_qn) & (onsets < end_qn + offset_qn)
            shifted = _keys(tracks[inside], pitches[inside], onsets[inside]) - k * key_steps_per_offset
            if _dice(np.unique(shifted), own_keys) >= SAME_CONTENT:
                continue
        best = (similarity, k)
    if best is None:
        return None
    similarity, k = best
    offset_qn = k * OFFSET_STEP_QN
    moved = {index: [n._replace(start_qn=n.start_qn - offset_qn) for n in song.tracks[index].notes]
             for index in target_tracks}
    notes = {index: [n._replace(duration_qn=min(n.duration_qn, end_qn - n.start_qn))
                     for n in track_notes if start_qn <= n.start_qn < end_qn]
             for index, track_notes in moved.items()}
    return Repeat(offset_qn, float(similarity), notes)
