"""What a musician hears first in an infill, measured against the track's own context bars.

    python -m training.musicality --data ../shared/data/pop909/dev [--bars 17-20] [--seed 1]

For every song, bars --bars are infilled twice with the same seed: all tracks together, and the
melody track alone (the track named MELODY, else the highest-pitched track); the model gets the
file as a musician has it (the bars still hold the notes it rewrites), or with --masked without
them. Each answer is judged
against the same track's context (CONTEXT_BARS bars each side of the range) and against the notes
it replaces:

- grid: the coarsest of GRIDS_QN, at the phase of the context's onsets, on which >= QUANTIZED_SHARE
  of them lie (within 1/8 of the grid step, so a random onset lands "on" it 25% of the time); the
  share of new onsets on that grid, over tracks whose context is quantized;
- durations: median new note length / median replaced note length per track (median over
  tracks), and the share of new notes shorter than SHORT_NOTE_QN;
- melody alone: new / replaced note count, the most notes sounding at once against the context's
  most, and the share of new notes outside the context's pitch range;
- endings: the share of new notes still sounding at the range's end (the engine closes those
  there by force), against the share of the replaced notes that reach the end or beyond.

The same table is computed for "repeat previous bars" and for the ground truth itself, which
shows what each figure is when the notes are the song's own. The measures read only notes and
bar lines: they share nothing with the engine's controls, so they can judge them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
from tqdm import tqdm

from cmi_daemon.errors import CMIError
from cmi_daemon.files import write_bytes_atomic
from cmi_daemon.inference.controls import CONTEXT_BARS
from cmi_daemon.music.tokens import Note, Song, read_midi
from training.eval.baselines import Blank, RepeatPreviousBars, context_notes
from training.eval.blanks import ground_truth_infill, masked_song

GRIDS_QN = (1.0, 0.5, 1 / 3, 0.25, 1 / 6, 0.125)
"""Quarter, 8th, 8th triplet, 16th, 16th triplet, 32nd: candidate grids, coarsest first."""
GRID_TOLERANCE = 1 / 8
"""An onset is on a grid when it is within this fraction of the grid step of a grid line."""
QUANTIZED_SHARE = 0.9
SHORT_NOTE_QN = 0.1
END_TOLERANCE_QN = 1e-6
MIN_CONTEXT_ONSETS = 8
"""A track with fewer onsets in its context has no grid to judge."""
MELODY_NAME = "MELODY"
MODEL = "model"
REPEAT = "repeat previous bars"
GROUND_TRUTH = "ground truth"


class Grid(NamedTuple):
    """Grid lines at phase_qn + k * step_qn."""

    step_qn: float
    phase_qn: float


def grid_phase_qn(onsets_qn: np.ndarray, step_qn: float) -> float:
    """Where the onsets sit inside a step_qn grid: their circular mean phase (a song whose beats are
    offset from QN 0, as many POP909 files are, has its grid offset with them)."""
    angle = np.angle(np.exp(2j * np.pi * onsets_qn / step_qn).mean())
    return float(angle / (2 * np.pi) * step_qn)


def on_grid(onsets_qn: np.ndarray, grid: Grid) -> np.ndarray:
    """Whether each onset lies within GRID_TOLERANCE of the grid's step of one of its lines."""
    offset = np.mod((onsets_qn - grid.phase_qn) / grid.step_qn + 0.5, 1.0) - 0.5
    return np.abs(offset) <= GRID_TOLERANCE + 1e-9


def context_grid(onsets_qn: np.ndarray) -> Optional[Grid]:
    """The coarsest grid of GRIDS_QN that holds QUANTIZED_SHARE of the onsets; None if none does."""
    if len(onsets_qn) < MIN_CONTEXT_ONSETS:
        return None
    for step_qn in GRIDS_QN:
        grid = Grid(step_qn, grid_phase_qn(onsets_qn, step_qn))
        if on_grid(onsets_qn, grid).mean() >= QUANTIZED_SHARE:
            return grid
    return None


def max_polyphony(notes: Sequence[Note]) -> int:
    """Most notes sounding at once (a note ending where another starts does not overlap it)."""
    events = sorted([(n.start_qn, 1) for n in notes] + [(n.start_qn + n.duration_qn, -1) for n in notes],
                    key=lambda event: (event[0], event[1]))
    sounding = most = 0
    for _, change in events:
        sounding += change
        most = max(most, sounding)
    return most


def melody_track(song: Song) -> Optional[int]:
    """The track named MELODY; else the track with notes whose median pitch is highest."""
    named = [i for i, t in enumerate(song.tracks) if t.name.strip().upper() == MELODY_NAME and t.notes]
    if named:
        return named[0]
    pitched = [(float(np.median([n.pitch for n in t.notes])), i) for i, t in enumerate(song.tracks)
               if t.notes and not t.is_drum]
    return max(pitched)[1] if pitched else None


@dataclass
class TrackJudgement:
    """One answer track against its context and the notes it replaces."""

    n_new: int
    n_original: int
    grid: Optional[Grid]
    new_on_grid: int
    new_median_qn: Optional[float]
    original_median_qn: Optional[float]
    n_short: int
    polyphony_new: int
    polyphony_context: int
    n_outside_range: int
    n_held_to_end: int
    """New notes that sound until the range's end (or past it)."""


def judge_track(context: Sequence[Note], original: Sequence[Note], new: Sequence[Note],
                end_qn: float) -> TrackJudgement:
    grid = context_grid(np.array([n.start_qn for n in context]))
    new_onsets = np.array([n.start_qn for n in new])
    low = min((n.pitch for n in context), default=None)
    high = max((n.pitch for n in context), default=None)
    return TrackJudgement(
        n_new=len(new), n_original=len(original), grid=grid,
        new_on_grid=int(on_grid(new_onsets, grid).sum()) if grid and len(new) else 0,
        new_median_qn=float(np.median([n.duration_qn for n in new])) if new else None,
        original_median_qn=float(np.median([n.duration_qn for n in original])) if original else None,
        n_short=sum(n.duration_qn < SHORT_NOTE_QN for n in new),
        polyphony_new=max_polyphony(new), polyphony_context=max_polyphony(context),
        n_outside_range=0 if low is None else sum(not low <= n.pitch <= high for n in new),
        n_held_to_end=sum(n.start_qn + n.duration_qn >= end_qn - END_TOLERANCE_QN for n in new))


@dataclass
class SongCase:
    """One song's range, context and the ground truth of its target tracks."""

    song_id: str
    song: Song
    blank: Blank
    melody: Optional[int]
    all_tracks: tuple[int, ...]


def song_case(path: Path, first_bar: int, last_bar: int) -> Optional[SongCase]:
    """The song's case, or None when the song is too short for the range and its context."""
    song = read_midi(path)
    if first_bar - CONTEXT_BARS < 1:
        raise CMIError(f"--bars {first_bar}-{last_bar}: the range needs {CONTEXT_BARS} bars before it")
    lines = tuple(song.meter.bar_start_qn(bar) for bar in range(first_bar - CONTEXT_BARS, last_bar + CONTEXT_BARS + 2))
    if lines[-1] > song.end_qn:
        return None
    width = last_bar - first_bar + 1
    beat_qn = 4.0 / song.meter.signatures[0].denominator
    blank = Blank(path.parent.name if path.stem == path.parent.name else path.stem, lines[CONTEXT_BARS],
                  lines[CONTEXT_BARS + width], lines, CONTEXT_BARS, width, beat_qn)
    targets = tuple(i for i, t in enumerate(song.tracks)
                    if any(blank.past_start_qn <= n.start_qn < blank.future_end_qn for n in t.notes))
    if not targets:
        return None
    melody = melody_track(song)
    return SongCase(blank.song_id, song, blank, melody if melody in targets else None, targets)


@dataclass
class Tally:
    """The judgements of one system in one setting (all tracks, or the melody alone), over songs."""

    tracks: list[TrackJudgement] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        gridded = [t for t in self.tracks if t.grid]
        n_gridded = sum(t.n_new for t in gridded)
        ratios = [t.new_median_qn / t.original_median_qn for t in self.tracks
                  if t.new_median_qn is not None and t.original_median_qn]
        n_new = sum(t.n_new for t in self.tracks)
        counts = [t.n_new / t.n_original for t in self.tracks if t.n_original]
        return {
            "tracks": len(self.tracks),
            "new_notes": n_new,
            "on_context_grid": sum(t.new_on_grid for t in gridded) / n_gridded if n_gridded else float("nan"),
            "median_duration_ratio": float(np.median(ratios)) if ratios else float("nan"),
            "short_share": sum(t.n_short for t in self.tracks) / n_new if n_new else float("nan"),
            "median_count_ratio": float(np.median(counts)) if counts else float("nan"),
            "count_ratio_in_0.67_1.5": float(np.mean([0.67 <= c <= 1.5 for c in counts])) if counts else float("nan"),
            "polyphony_over_context": float(np.mean([t.polyphony_new > t.polyphony_context for t in self.tracks]))
            if self.tracks else float("nan"),
            "max_polyphony_new": max((t.polyphony_new for t in self.tracks), default=0),
            "max_polyphony_context": max((t.polyphony_context for t in self.tracks), default=0),
            "outside_pitch_range": sum(t.n_outside_range for t in self.tracks) / n_new if n_new else float("nan"),
            "held_to_end": sum(t.n_held_to_end for t in self.tracks) / n_new if n_new else float("nan"),
        }


SETTINGS = ("all tracks", "melody alone")
COLUMNS = (("on_context_grid", "onsets on grid", "{:.1%}"), ("median_duration_ratio", "dur. ratio", "{:.2f}"),
           ("short_share", "< 0.1 QN", "{:.1%}"), ("median_count_ratio", "count ratio", "{:.2f}"),
           ("count_ratio_in_0.67_1.5", "count ok", "{:.0%}"), ("polyphony_over_context", "poly > ctx", "{:.0%}"),
           ("max_polyphony_new", "max poly", "{}"), ("max_polyphony_context", "ctx poly", "{}"),
           ("outside_pitch_range", "out of range", "{:.1%}"), ("held_to_end", "held to end", "{:.1%}"))


def table_markdown(summaries: dict[str, dict[str, dict]]) -> str:
    lines = ["| system | setting | tracks | new notes | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "| --- " * (4 + len(COLUMNS)) + "|"]
    for system, by_setting in summaries.items():
        for setting, row in by_setting.items():
            cells = [fmt.format(row[key]) if row[key] == row[key] else "-" for key, _, fmt in COLUMNS]
            lines.append(f"| {system} | {setting} | {row['tracks']} | {row['new_notes']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(data_dir: Path, model_dir: Optional[Path], first_bar: int, last_bar: int, seed: int,
        n_songs: Optional[int], masked: bool = False) -> dict:
    from cmi_daemon.paths import default_model_dir
    from cmi_daemon.inference.engine import Engine, InfillOptions

    engine = Engine(model_dir or default_model_dir())
    paths = sorted(data_dir.glob("*/*.mid")) or sorted(data_dir.rglob("*.mid"))
    if not paths:
        raise CMIError(f"{data_dir}: no MIDI files found")
    paths = paths[:n_songs] if n_songs else paths
    tallies = {system: {setting: Tally() for setting in SETTINGS} for system in (MODEL, REPEAT, GROUND_TRUTH)}
    skipped = []
    for path in tqdm(paths, desc="songs", unit="song", file=sys.stderr):
        case = song_case(path, first_bar, last_bar)
        if case is None:
            skipped.append(path.name)
            continue
        settings = {"all tracks": case.all_tracks, "melody alone": (case.melody,) if case.melody is not None else ()}
        for setting, targets in settings.items():
            if not targets:
                continue
            song = masked_song(case.song, case.blank, targets)
            answers = {
                MODEL: engine.infill(song if masked else case.song, case.blank.start_qn, case.blank.end_qn, targets,
                                     InfillOptions(seed=seed)).candidates[0].notes,
                REPEAT: RepeatPreviousBars().infill(song, case.blank, targets, np.random.default_rng(seed)),
                GROUND_TRUTH: ground_truth_infill(case.song, case.blank, targets),
            }
            for track in targets:
                context = context_notes(case.song.tracks[track].notes, case.blank)
                original = answers[GROUND_TRUTH][track]
                for system, answer in answers.items():
                    tallies[system][setting].tracks.append(judge_track(context, original, answer.get(track, []),
                                                                       case.blank.end_qn))
    return {"protocol": {"data": str(data_dir), "model": str(engine.bundle.path), "bars": [first_bar, last_bar],
                         "seed": seed, "masked": masked, "songs": len(paths) - len(skipped),
                         "skipped_too_short": skipped,
                         "context_bars": CONTEXT_BARS},
            "summaries": {system: {setting: tally.summary() for setting, tally in by_setting.items()}
                          for system, by_setting in tallies.items()}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.musicality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder of songs (pop909 layout NNN/NNN.mid, or any *.mid)")
    parser.add_argument("--model", type=Path, help="model bundle folder (default: the shipped model)")
    parser.add_argument("--bars", default="17-20", help="bars to infill, counted from 1 (default: 17-20)")
    parser.add_argument("--seed", type=int, default=1, help="infill seed (default: 1)")
    parser.add_argument("--songs", type=int, help="only the first N songs")
    parser.add_argument("--masked", action="store_true",
                        help="remove the target tracks' notes in the bars before infilling (as training.eval.evaluate "
                             "does); by default the model gets the file as a musician has it, bars and all")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    first, _, last = args.bars.partition("-")
    try:
        result = run(args.data, args.model, int(first), int(last or first), args.seed, args.songs, args.masked)
    except (CMIError, ValueError) as error:
        print(f"musicality: {error}", file=sys.stderr)
        return 2
    print(f"{result['protocol']['songs']} songs of {args.data}, bars {args.bars}, seed {args.seed}, "
          f"model {result['protocol']['model']}" + (", the bars' notes removed first" if args.masked else ""))
    print(table_markdown(result["summaries"]))
    if args.out:
        write_bytes_atomic(args.out, json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
