"""Blanks of the evaluation protocol and what one infill of one scores: the songs of a folder, the
target tracks, blanks on bar lines with context on both sides, the song the systems see, the ground
truth, every METRICS column of an infill and the NLL columns of a model's ground-truth answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from cmi_daemon.inference.controls import CONTEXT_BARS
from cmi_daemon.music import vocab
from cmi_daemon.music.regions import ilm_sequence, replace_notes_in_range
from cmi_daemon.music.tokens import Note, Song
from training.eval import metrics
from training.eval.baselines import Blank, notes_in_range

BLANK_WIDTHS_BARS = (2, 4)
"""Blank k of a song is BLANK_WIDTHS_BARS[k % 2] bars wide."""
GROUND_TRUTH = "ground truth"

METRICS = metrics.CONTEXT_METRICS + ("GC", "onset_F1", "chroma_cos", "PCE_diff")
"""Columns computed for every system; each is judged by |value - ground truth's value| per blank."""
NLL_METRICS = ("bits_per_token", "bits_per_note")
"""Columns of model systems that can score the ground truth (they have a `logprob_fn`)."""
AVERAGE_CONDITIONING_NLL = "bits_per_token_average_conditioning"
"""A conditioned model's bits per token with the training blanks' mean conditioning vector instead
of the blank's own: how much worse it gets is how much the generator reads the JEPA."""


# ---------------------------------------------------------------------------------------------
# Songs, bars and blanks


def song_paths(data_dir: Path, n_songs: Optional[int], pattern: str = "**/*") -> list[Path]:
    """MIDI files under data_dir matching the glob pattern, in path order, the first n_songs of them
    when given."""
    paths = sorted(p for p in data_dir.glob(pattern) if p.suffix.lower() in (".mid", ".midi"))
    if not paths:
        raise SystemExit(f"--data {data_dir}: no .mid files there" + ("" if pattern == "**/*" else f" match {pattern}"))
    return paths[:n_songs] if n_songs else paths


def target_tracks(song: Song) -> tuple[int, ...]:
    """Every non-drum track; every track when all are drums."""
    pitched = tuple(i for i, t in enumerate(song.tracks) if not t.is_drum)
    return pitched or tuple(range(len(song.tracks)))


def beat_qn_at(song: Song, qn: float) -> float:
    """One beat of the time signature sounding at qn: 4 / denominator QN."""
    signature = max((s for s in song.meter.signatures if s.start_qn <= qn), key=lambda s: s.start_qn)
    return 4.0 / signature.denominator


def _has_notes(song: Song, targets: Sequence[int], start_qn: float, end_qn: float) -> bool:
    return any(start_qn <= n.start_qn < end_qn for t in targets for n in song.tracks[t].notes)


def choose_blanks(song: Song, song_id: str, lines_qn: Sequence[float], targets: Sequence[int],
                  n_blanks: int, rng: np.random.Generator) -> list[Blank]:
    """Up to n_blanks non-overlapping blanks on bar lines, each with CONTEXT_BARS whole bars on
    both sides and at least one target note in the blank and in each context."""
    n_bars = len(lines_qn) - 1
    used = np.zeros(max(n_bars, 0), dtype=bool)
    blanks = []
    for k in range(n_blanks):
        width = BLANK_WIDTHS_BARS[k % len(BLANK_WIDTHS_BARS)]
        candidates = [
            first for first in range(CONTEXT_BARS, n_bars - width - CONTEXT_BARS + 1)
            if not used[first:first + width].any()
            and _has_notes(song, targets, lines_qn[first], lines_qn[first + width])
            and _has_notes(song, targets, lines_qn[first - CONTEXT_BARS], lines_qn[first])
            and _has_notes(song, targets, lines_qn[first + width], lines_qn[first + width + CONTEXT_BARS])]
        if not candidates:
            continue
        first = int(rng.choice(candidates))
        used[first:first + width] = True
        lines = tuple(lines_qn[first - CONTEXT_BARS:first + width + CONTEXT_BARS + 1])
        blanks.append(Blank(song_id, lines_qn[first], lines_qn[first + width], lines, CONTEXT_BARS, width,
                            beat_qn_at(song, lines_qn[first])))
    return sorted(blanks, key=lambda b: b.start_qn)


def masked_song(song: Song, blank: Blank, targets: Sequence[int]) -> Song:
    """The song without the target tracks' notes that start inside the blank: what systems see."""
    return replace_notes_in_range(song, blank.start_qn, blank.end_qn, {index: [] for index in targets})


# ---------------------------------------------------------------------------------------------
# Metrics of one infill


def _segment(song: Song, notes_by_track: dict[int, list[Note]], lines_qn: Sequence[float]) -> metrics.Segment:
    notes = [n for t in sorted(notes_by_track) for n in notes_by_track[t]]
    pitched = [n for t in sorted(notes_by_track) if not song.tracks[t].is_drum for n in notes_by_track[t]]
    return metrics.Segment(notes, pitched, lines_qn)


def side_notes(song: Song, targets: Sequence[int], lines_qn: Sequence[float]) -> dict[int, list[Note]]:
    """The target tracks' notes starting between the first and the last of lines_qn."""
    return {t: [n for n in song.tracks[t].notes if lines_qn[0] <= n.start_qn < lines_qn[-1]] for t in targets}


def ground_truth_infill(song: Song, blank: Blank, targets: Sequence[int]) -> dict[int, list[Note]]:
    """The blank's original notes, cut to end by the range end as every system's are."""
    return {t: notes_in_range(song.tracks[t].notes, blank.start_qn, blank.end_qn) for t in targets}


def check_infill(system_name: str, infill: dict[int, list[Note]], start_qn: float, end_qn: float,
                 targets: Sequence[int]) -> None:
    """Refuse an answer with notes outside [start_qn, end_qn) or on tracks that are not targets."""
    for track_index, notes in infill.items():
        if track_index not in targets:
            raise ValueError(f"{system_name} wrote notes on track {track_index}, "
                             f"which is not a target {tuple(targets)}")
        for note in notes:
            if not (start_qn <= note.start_qn < end_qn and note.start_qn + note.duration_qn <= end_qn + 1e-9):
                raise ValueError(f"{system_name} put a note outside [{start_qn}, {end_qn}): {note}")


def infill_metrics(song: Song, blank: Blank, targets: Sequence[int], infill: dict[int, list[Note]],
                   truth: dict[int, list[Note]]) -> dict[str, float]:
    """Every column of METRICS for one infill of one blank; `song` gives the context."""
    past = _segment(song, side_notes(song, targets, blank.past_bar_lines_qn), blank.past_bar_lines_qn)
    future = _segment(song, side_notes(song, targets, blank.future_bar_lines_qn), blank.future_bar_lines_qn)
    mine = _segment(song, infill, blank.blank_bar_lines_qn)
    reference = _segment(song, truth, blank.blank_bar_lines_qn)
    values = metrics.context_overlaps(mine, past, future, blank.beat_qn)
    context_grids = np.concatenate([metrics.onset_grids(past.notes, past.bar_lines_qn),
                                    metrics.onset_grids(future.notes, future.bar_lines_qn)])
    values["GC"] = metrics.groove_consistency(metrics.onset_grids(mine.notes, mine.bar_lines_qn), context_grids)
    values["onset_F1"] = metrics.onset_f1(mine.notes, reference.notes)
    values["chroma_cos"] = metrics.chroma_cosine(mine.pitched_notes, reference.pitched_notes,
                                                 blank.start_qn, blank.end_qn)
    values["PCE_diff"] = abs(metrics.pitch_class_entropy_bits(mine.pitched_notes)
                             - metrics.pitch_class_entropy_bits(reference.pitched_notes))
    return values


def blank_nll_bits(system, song: Song, blank: Blank, targets: Sequence[int]) -> dict[str, float]:
    """Bits per token and per note of the ground-truth answer of the blank, teacher-forced, in the
    region the system itself would infill (its context window)."""
    region = system.region(song, blank.start_qn, blank.end_qn, targets)
    sequence = ilm_sequence(region.prefix_ids, region.suffix_ids, region.blank_ids)
    ilm_ids, answer_start = sequence.ids, sequence.answer_start
    n_notes = vocab.note_on_count(region.blank_ids)
    per_token, per_note = metrics.nll_bits(system.logprob_fn, ilm_ids, answer_start, n_notes)
    values = {"bits_per_token": per_token, "bits_per_note": per_note}
    if getattr(system, "conditioned", False):
        values[AVERAGE_CONDITIONING_NLL] = metrics.nll_bits(system.average_conditioning_logprob_fn, ilm_ids,
                                                            answer_start, n_notes)[0]
    return values



# ---------------------------------------------------------------------------------------------
# Results of one blank


@dataclass
class BlankResult:
    song_id: str
    start_qn: float
    end_qn: float
    width_bars: int
    bar_source: str
    values: dict[str, dict[str, float]] = field(default_factory=dict)
    """System -> metric -> value."""


@dataclass
class PianoRoll:
    """What one piano-roll image shows."""

    blank: Blank
    context: list[Note]
    truth: list[Note]
    infills: dict[str, list[Note]]
