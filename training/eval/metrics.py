"""Objective infill metrics: pure functions over lists of `tokens.Note` (times in quarter notes, QN).

Definitions, bins and edge cases are documented in docs/metrics.md; every constant used there is
named here. Durations are measured in beats: duration_beats = duration_qn / beat_qn, where beat_qn
is the length of one beat in QN (1.0 for x/4 meters, 0.5 for x/8).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from cmi_daemon.music.tokens import Note

N_PITCH_CLASSES = 12
PITCH_CLASS_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")

DURATION_BIN_STEPS_PER_OCTAVE = 2
"""Duration bins are half an octave wide on a log2 scale."""
DURATION_BIN_CENTRES_BEATS = tuple(2.0 ** (k / DURATION_BIN_STEPS_PER_OCTAVE) for k in range(-6, 7))
"""1/8 beat .. 8 beats; a duration goes to the bin whose centre is nearest on the log scale, and
durations beyond either end go to the end bins."""

CHORD_QUALITIES = (
    ("maj", (0, 4, 7)),
    ("min", (0, 3, 7)),
    ("7", (0, 4, 7, 10)),
    ("min7", (0, 3, 7, 10)),
    ("maj7", (0, 4, 7, 11)),
    ("dim", (0, 3, 6)),
    ("aug", (0, 4, 8)),
    ("hdim7", (0, 3, 6, 10)),
    ("dim7", (0, 3, 6, 9)),
)
"""Quality name -> intervals above the root, in semitones. The order breaks exact ties."""
NO_CHORD = "N"
MIN_CHORD_COSINE = 0.7
"""A window whose best template has a lower cosine similarity than this is labelled "N" (a single
sounding pitch class scores 1/sqrt(3) = 0.577 against any triad containing it)."""
CHORD_TIE_COSINE = 1e-6
"""Templates within this cosine of the best one count as tied; the tie goes to the template whose
root sounds longest in the window, then to the earlier template."""

ONSET_TOLERANCE_QN = 0.125
"""A 32nd note: an estimated onset within this distance of a reference onset of the same pitch matches."""
GROOVE_POSITIONS_PER_BAR = 16
"""Onset grid resolution of the groove metric: sixteenth notes in 4/4."""

LN_2 = math.log(2.0)


def _chord_templates() -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """Labels, binary pitch-class templates and root pitch classes; symmetric chords (aug, dim7)
    keep only the root with the lowest pitch class, so each pitch-class set appears once."""
    labels, rows, roots, seen = [], [], [], set()
    for quality, intervals in CHORD_QUALITIES:
        for root in range(N_PITCH_CLASSES):
            pitch_classes = frozenset((root + i) % N_PITCH_CLASSES for i in intervals)
            if pitch_classes in seen:
                continue
            seen.add(pitch_classes)
            row = np.zeros(N_PITCH_CLASSES)
            row[list(pitch_classes)] = 1.0
            labels.append(f"{PITCH_CLASS_NAMES[root]}:{quality}")
            rows.append(row)
            roots.append(root)
    return tuple(labels), np.array(rows), np.array(roots)


CHORD_TEMPLATE_LABELS, CHORD_TEMPLATES, CHORD_TEMPLATE_ROOTS = _chord_templates()
CHORD_LABELS = (NO_CHORD,) + CHORD_TEMPLATE_LABELS
"""Bins of the chord histogram: "N" first, then every template label."""


def _arrays(notes: Sequence[Note]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """start_qn, duration_qn and pitch of the notes as arrays."""
    if not notes:
        empty = np.zeros(0)
        return empty, empty, np.zeros(0, dtype=np.int64)
    table = np.array([(n.start_qn, n.duration_qn, n.pitch) for n in notes], dtype=np.float64)
    return table[:, 0], table[:, 1], table[:, 2].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Histograms and their overlap


def overlap(hist_a: np.ndarray, hist_b: np.ndarray) -> float:
    """Overlapping area of two histograms after each is normalised to sum 1.

    1.0 for identical distributions, 0.0 for disjoint ones. Two empty histograms overlap fully
    (1.0: both parts are silent alike); an empty one against a non-empty one gives 0.0.
    """
    a, b = np.asarray(hist_a, dtype=np.float64), np.asarray(hist_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"histograms of different bins cannot overlap: {a.shape} vs {b.shape}")
    total_a, total_b = a.sum(), b.sum()
    if total_a == 0 or total_b == 0:
        return 1.0 if total_a == total_b else 0.0
    return float(np.minimum(a / total_a, b / total_b).sum())


def pitch_class_histogram(notes: Sequence[Note]) -> np.ndarray:
    """Number of notes of each pitch class (each note counts once, whatever its length)."""
    _, _, pitch = _arrays(notes)
    return np.bincount(pitch % N_PITCH_CLASSES, minlength=N_PITCH_CLASSES).astype(np.float64)


def duration_bin(duration_beats) -> np.ndarray:
    """Index into DURATION_BIN_CENTRES_BEATS: nearest centre on the log2 scale, half up, clipped."""
    duration = np.maximum(np.asarray(duration_beats, dtype=np.float64), np.finfo(np.float64).tiny)
    steps = np.floor(np.log2(duration) * DURATION_BIN_STEPS_PER_OCTAVE + 0.5)
    return np.clip(steps, -6, 6).astype(np.int64) + 6


def duration_histogram(notes: Sequence[Note], beat_qn: float = 1.0) -> np.ndarray:
    """Number of notes in each duration bin, durations in beats."""
    _, duration_qn, _ = _arrays(notes)
    return np.bincount(duration_bin(duration_qn / beat_qn),
                       minlength=len(DURATION_BIN_CENTRES_BEATS)).astype(np.float64)


def sounding_chroma_qn(notes: Sequence[Note], window_edges_qn: Sequence[float]) -> np.ndarray:
    """(n_windows, 12): QN each pitch class sounds inside each window [edge_i, edge_i+1).

    Two notes of one pitch class sounding together both count.
    """
    edges = np.asarray(window_edges_qn, dtype=np.float64)
    start_qn, duration_qn, pitch = _arrays(notes)
    n_windows = max(0, len(edges) - 1)
    chroma = np.zeros((n_windows, N_PITCH_CLASSES))
    if n_windows == 0 or len(start_qn) == 0:
        return chroma
    sounding_qn = np.clip(np.minimum(start_qn + duration_qn, edges[1:, None])
                          - np.maximum(start_qn, edges[:-1, None]), 0.0, None)
    for pitch_class in range(N_PITCH_CLASSES):
        chroma[:, pitch_class] = sounding_qn[:, pitch % N_PITCH_CLASSES == pitch_class].sum(axis=1)
    return chroma


def chord_indices(chroma: np.ndarray) -> np.ndarray:
    """Index into CHORD_LABELS of each row of a (n_windows, 12) chroma: template matching by
    cosine similarity with binary pitch-class templates; the bass note plays no part."""
    chroma = np.atleast_2d(np.asarray(chroma, dtype=np.float64))
    norms = np.linalg.norm(chroma, axis=1)
    cosine = (chroma @ CHORD_TEMPLATES.T) / (
        np.maximum(norms, np.finfo(np.float64).tiny)[:, None] * np.sqrt(CHORD_TEMPLATES.sum(axis=1))[None, :])
    best_cosine = cosine.max(axis=1)
    root_share = chroma[:, CHORD_TEMPLATE_ROOTS] / np.maximum(chroma.sum(axis=1), np.finfo(np.float64).tiny)[:, None]
    tied = cosine >= best_cosine[:, None] - CHORD_TIE_COSINE
    choice = np.argmax(np.where(tied, root_share, -1.0), axis=1) + 1
    return np.where((norms > 0) & (best_cosine >= MIN_CHORD_COSINE), choice, 0)


def chord_labels(notes: Sequence[Note], window_edges_qn: Sequence[float]) -> list[str]:
    """Chord label ("C:maj", "A:min7", "N", ...) of each window."""
    return [CHORD_LABELS[i] for i in chord_indices(sounding_chroma_qn(notes, window_edges_qn))]


def chord_histogram(notes: Sequence[Note], window_edges_qn: Sequence[float]) -> np.ndarray:
    """Number of windows with each label of CHORD_LABELS."""
    return np.bincount(chord_indices(sounding_chroma_qn(notes, window_edges_qn)),
                       minlength=len(CHORD_LABELS)).astype(np.float64)


def half_bar_edges_qn(bar_lines_qn: Sequence[float]) -> np.ndarray:
    """Chord windows: every bar [bar_lines_qn[i], bar_lines_qn[i+1]) cut into two equal halves."""
    lines = np.asarray(bar_lines_qn, dtype=np.float64)
    if len(lines) < 2:
        return lines
    middles = (lines[:-1] + lines[1:]) / 2.0
    return np.append(np.column_stack([lines[:-1], middles]).ravel(), lines[-1])


# ---------------------------------------------------------------------------------------------
# Infill against its past and future context


CONTEXT_METRICS = ("PD_p", "PD_f", "DD_p", "DD_f", "CD_p", "CD_f")


class Segment(NamedTuple):
    """Notes of the target tracks over whole bars: the infill, or the context on one side of it."""

    notes: Sequence[Note]
    """All notes (durations and onsets)."""
    pitched_notes: Sequence[Note]
    """The notes of non-drum tracks (pitch classes and chords)."""
    bar_lines_qn: Sequence[float]
    """Bar lines from the segment's start to its end, both included."""


def segment_histograms(segment: Segment, beat_qn: float) -> dict[str, np.ndarray]:
    """Pitch-class ("PD"), duration ("DD") and half-bar chord ("CD") histograms of a segment."""
    return {"PD": pitch_class_histogram(segment.pitched_notes),
            "DD": duration_histogram(segment.notes, beat_qn),
            "CD": chord_histogram(segment.pitched_notes, half_bar_edges_qn(segment.bar_lines_qn))}


def context_overlaps(infill: Segment, past: Segment, future: Segment, beat_qn: float) -> dict[str, float]:
    """PD_p, PD_f, DD_p, DD_f, CD_p and CD_f: overlap of the infill's histograms with the past's
    (p) and the future's (f)."""
    mine = segment_histograms(infill, beat_qn)
    sides = {"p": segment_histograms(past, beat_qn), "f": segment_histograms(future, beat_qn)}
    return {name: overlap(mine[name[:2]], sides[name[-1]][name[:2]]) for name in CONTEXT_METRICS}


# ---------------------------------------------------------------------------------------------
# Infill against the ground truth


def onset_matches(estimate: Sequence[Note], reference: Sequence[Note],
                  tolerance_qn: float = ONSET_TOLERANCE_QN) -> int:
    """Largest number of one-to-one pairs of the same pitch with onsets at most tolerance_qn apart.

    Per pitch, matching each estimated onset (in time order) to the earliest unmatched reference
    onset still in reach is optimal for intervals of equal width.
    """
    by_pitch: dict[int, list[float]] = {}
    for note in reference:
        by_pitch.setdefault(note.pitch, []).append(note.start_qn)
    estimated: dict[int, list[float]] = {}
    for note in estimate:
        estimated.setdefault(note.pitch, []).append(note.start_qn)
    matches = 0
    for pitch, onsets in estimated.items():
        references = sorted(by_pitch.get(pitch, ()))
        next_reference = 0
        for onset in sorted(onsets):
            while next_reference < len(references) and references[next_reference] < onset - tolerance_qn - 1e-9:
                next_reference += 1
            if next_reference < len(references) and references[next_reference] <= onset + tolerance_qn + 1e-9:
                matches += 1
                next_reference += 1
    return matches


def onset_f1(estimate: Sequence[Note], reference: Sequence[Note], tolerance_qn: float = ONSET_TOLERANCE_QN) -> float:
    """F1 of note onsets (same pitch, onset within tolerance_qn). Both empty: 1.0; one empty: 0.0."""
    if not estimate and not reference:
        return 1.0
    if not estimate or not reference:
        return 0.0
    matches = onset_matches(estimate, reference, tolerance_qn)
    return 2.0 * matches / (len(estimate) + len(reference))


def chroma_cosine(estimate: Sequence[Note], reference: Sequence[Note], start_qn: float, end_qn: float) -> float:
    """Cosine similarity of the two parts' chroma (QN each pitch class sounds in [start_qn, end_qn)).

    Both silent: 1.0; one silent: 0.0.
    """
    a = sounding_chroma_qn(estimate, [start_qn, end_qn])[0]
    b = sounding_chroma_qn(reference, [start_qn, end_qn])[0]
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if norm_a == 0 or norm_b == 0:
        return 1.0 if norm_a == norm_b else 0.0
    return float(a @ b / (norm_a * norm_b))


def entropy_bits(histogram: np.ndarray) -> float:
    """Shannon entropy of a normalised histogram in bits; 0.0 for an empty histogram."""
    counts = np.asarray(histogram, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum())


def pitch_class_entropy_bits(notes: Sequence[Note]) -> float:
    """Entropy of the pitch-class histogram (0 .. log2(12) = 3.585 bits)."""
    return entropy_bits(pitch_class_histogram(notes))


# ---------------------------------------------------------------------------------------------
# Groove


def onset_grids(notes: Sequence[Note], bar_lines_qn: Sequence[float],
                positions_per_bar: int = GROOVE_POSITIONS_PER_BAR) -> np.ndarray:
    """(n_bars, positions_per_bar) booleans: which grid positions of each bar have an onset.

    Bar i is [bar_lines_qn[i], bar_lines_qn[i+1]); an onset goes to the nearest grid position
    (half up), and one that rounds to the end of a bar is the next bar's first position.
    Onsets outside the bars are ignored.
    """
    lines = np.asarray(bar_lines_qn, dtype=np.float64)
    n_bars = max(0, len(lines) - 1)
    grids = np.zeros((n_bars, positions_per_bar), dtype=bool)
    start_qn, _, _ = _arrays(notes)
    if n_bars == 0 or len(start_qn) == 0:
        return grids
    inside = (start_qn >= lines[0]) & (start_qn < lines[-1])
    onsets = start_qn[inside]
    bar = np.searchsorted(lines, onsets, side="right") - 1
    fraction = (onsets - lines[bar]) / (lines[bar + 1] - lines[bar])
    slot = bar * positions_per_bar + np.floor(fraction * positions_per_bar + 0.5).astype(np.int64)
    slot = slot[slot < n_bars * positions_per_bar]
    grids.reshape(-1)[slot] = True
    return grids


def groove_consistency(grids_a: np.ndarray, grids_b: np.ndarray) -> float:
    """1 - mean normalised Hamming distance over every pair (bar of a, bar of b).

    This is Wu & Yang's (2020) grooving pattern similarity averaged over bar pairs; 1.0 when every
    bar has the same onset pattern. With no bar on either side it is undefined: NaN.
    """
    a, b = np.asarray(grids_a, dtype=bool), np.asarray(grids_b, dtype=bool)
    if len(a) == 0 or len(b) == 0:
        return float("nan")
    hamming = (a[:, None, :] != b[None, :, :]).mean(axis=2)
    return float(1.0 - hamming.mean())


# ---------------------------------------------------------------------------------------------
# Likelihood of the ground truth under a model


LogprobFn = Callable[[Sequence[int], int], Sequence[float]]
"""logprob_fn(ilm_ids, answer_start) -> natural-log probability of each of ilm_ids[answer_start:],
each given every id before it (teacher forcing)."""


def nll_bits(logprob_fn: LogprobFn, ilm_ids: Sequence[int], answer_start: int, n_notes: int) -> tuple[float, float]:
    """(bits per token, bits per note) of the answer ilm_ids[answer_start:] under a model.

    The answer includes its closing `<ans>`; n_notes is the number of notes the answer plays
    (its note-on tokens). Bits per note is NaN for an answer without notes.
    """
    n_tokens = len(ilm_ids) - answer_start
    if n_tokens <= 0:
        raise ValueError(f"no answer tokens: the answer starts at {answer_start} of {len(ilm_ids)} ids")
    logprobs = np.asarray(logprob_fn(ilm_ids, answer_start), dtype=np.float64)
    if logprobs.shape != (n_tokens,):
        raise ValueError(f"logprob_fn returned {logprobs.shape[0] if logprobs.ndim else 'a scalar'} "
                         f"log-probabilities for {n_tokens} answer tokens")
    total_bits = float(-logprobs.sum() / LN_2)
    return total_bits / n_tokens, (total_bits / n_notes if n_notes > 0 else float("nan"))
