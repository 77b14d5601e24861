"""What an interaction signal means in token space.

A piece "with content C in the range" is the request's song whose target tracks' notes starting
inside [start_qn, end_qn) are replaced by C (a candidate the daemon returned;
regions.replace_notes_in_range). Its JEPA sequence is
prefix + blank + suffix (regions.jepa_sequence of the region bounded to the model's window); the
blank's positions are the unsatisfied span. A neutral span is a random stretch of the same length
inside the context (before or after the blank).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..music.regions import JEPASequence, jepa_sequence, region_in_window
from ..music.tokens import Song


def piece(song: Song, start_qn: float, end_qn: float, target_tracks: Sequence[int],
          window_tokens: int) -> JEPASequence:
    """The sequence prefix + blank + suffix of the song around the range, at most window_tokens long
    (context is cut first, down to a quarter of the window; then the blank's tail)."""
    region = region_in_window(song, start_qn, end_qn, target_tracks, window_tokens,
                              blank_tokens=lambda cut: len(cut.blank_ids))
    n_blank = max(0, min(len(region.blank_ids), window_tokens - len(region.prefix_ids) - len(region.suffix_ids)))
    return jepa_sequence(region.prefix_ids, region.blank_ids[:n_blank], region.suffix_ids)


def neutral_span(piece_: JEPASequence, rng: np.random.Generator) -> Optional[tuple[int, int]]:
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
