"""What an interaction signal means in token space.

A piece "with content C in the range" is the request's song whose target tracks' notes starting
inside [start_qn, end_qn) are replaced by C (a candidate the daemon returned). Its JEPA sequence is
prefix + blank + suffix (regions.build_region, bounded to the model's window); the blank's
positions are the unsatisfied span. A neutral span is a random stretch of the same length
inside the context (before or after the blank).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from ..regions import build_region
from ..tokens import Note, Song


@dataclass(frozen=True)
class Piece:
    """One JEPA sequence and where its blank lies: token_ids[blank_start:blank_end] is the range."""

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


def song_with_content(song: Song, start_qn: float, end_qn: float, content: dict[int, Sequence[Note]]) -> Song:
    """The song with each content track's notes starting in [start_qn, end_qn) replaced by content's."""
    tracks = []
    for index, track in enumerate(song.tracks):
        if index in content:
            kept = [n for n in track.notes if not start_qn <= n.start_qn < end_qn]
            track = replace(track, notes=sorted(kept + [Note(*n) for n in content[index]]))
        tracks.append(track)
    return replace(song, tracks=tracks)


def piece(song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int], window_tokens: int) -> Piece:
    """The sequence prefix + blank + suffix of the song around the range, at most window_tokens long
    (context is cut first, down to a quarter of the window; then the blank's tail)."""
    region = build_region(song, start_qn, end_qn, target_tracks, window_tokens)
    n_blank = len(region.blank_ids)
    if len(region.prefix_ids) + len(region.suffix_ids) + n_blank > window_tokens:
        region = build_region(song, start_qn, end_qn, target_tracks, max(window_tokens // 4, window_tokens - n_blank))
    n_blank = max(0, min(n_blank, window_tokens - len(region.prefix_ids) - len(region.suffix_ids)))
    ids = region.prefix_ids + region.blank_ids[:n_blank] + region.suffix_ids
    return Piece(tuple(int(t) for t in ids), len(region.prefix_ids), len(region.prefix_ids) + n_blank)


def neutral_span(piece_: Piece, rng: np.random.Generator) -> Optional[tuple[int, int]]:
    """A random [start, end) of the blank's length (shorter when the context is) inside the context,
    before or after the blank; None when there is no context at all."""
    n_prefix = piece_.blank_start
    n_suffix = piece_.n_tokens - piece_.blank_end
    length = min(piece_.blank_end - piece_.blank_start, max(n_prefix, n_suffix))
    if length <= 0:
        return None
    starts = list(range(0, n_prefix - length + 1)) + list(range(piece_.blank_end, piece_.n_tokens - length + 1))
    start = int(rng.choice(starts))
    return start, start + length
