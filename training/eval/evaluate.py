"""Objective evaluation of infilling systems on held-out songs: a fixed, seeded protocol of blanks,
every metric of `training.eval.metrics` per blank and system, paired significance tests, tables and plots.
This module runs the protocol; the blanks and what one infill scores are in `blanks`, the tests in
`statistics`, the tables and plots in `report`.

    python -m training.evaluate --data ../shared/data/pop909/dev --out eval/ [--model PATH]

The protocol and the meaning of each column are in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm import tqdm

from cmi_daemon.errors import MidiFileError
from cmi_daemon.files import write_bytes_atomic
from cmi_daemon.inference.controls import CONTEXT_BARS
from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.tokens import read_midi
from training.eval import metrics
from training.eval.baselines import BASELINES, InfillSystem
from training.eval.blanks import (BLANK_WIDTHS_BARS, GROUND_TRUTH, METRICS, BlankResult, PianoRoll, blank_nll_bits,
                                  check_infill, choose_blanks, ground_truth_infill, infill_metrics, masked_song,
                                  side_notes, song_paths, target_tracks)
from training.eval.report import plot_metrics, plot_piano_roll, results_markdown
from training.eval.statistics import BOOTSTRAP_RESAMPLES, SIGNIFICANCE_LEVEL, summarise

DEFAULT_BLANKS_PER_SONG = 4
DEFAULT_SEED = 0
PIANO_ROLL_BLANKS = 3
MODEL_SYSTEM = "cmi"
ABLATION_SYSTEM = "cmi w/o JEP-AGA"
"""The unconditioned generator: a system of its own, and the baseline the model must beat."""


def load_model_system(model_path: Path, name: str) -> InfillSystem:
    """Where a trained model (a bundle folder from `python -m export`) becomes an evaluated system;
    it has a `logprob_fn` (metrics.LogprobFn), so it gets the NLL columns."""
    from cmi_daemon.errors import CMIError
    from training.eval.model_system import evaluation_system

    try:
        return evaluation_system(model_path, name)
    except CMIError as error:
        raise SystemExit(f"--model/--ablation {model_path}: no model system can be loaded from it ({error})") from error


def system_rng(seed: int, song_id: str, blank_index: int, system_index: int) -> np.random.Generator:
    """One generator per (song, blank, system): results do not depend on which other songs run."""
    return np.random.default_rng([seed, zlib.crc32(song_id.encode()), blank_index, system_index])


def evaluate_song(path: Path, systems: Sequence[InfillSystem], n_blanks: int, seed: int,
                  rolls_wanted: int) -> tuple[list[BlankResult], list[PianoRoll]]:
    """Every blank of one song under every system, and the first rolls_wanted piano rolls."""
    song_id = path.stem
    song = read_midi(path)
    lines_qn, bar_source = bar_lines_qn(song, path)
    targets = target_tracks(song)
    blanks = choose_blanks(song, song_id, lines_qn, targets, n_blanks,
                           np.random.default_rng([seed, zlib.crc32(song_id.encode())]))
    results, rolls = [], []
    for blank_index, blank in enumerate(blanks):
        truth = ground_truth_infill(song, blank, targets)
        hidden = masked_song(song, blank, targets)
        result = BlankResult(song_id, blank.start_qn, blank.end_qn, blank.width_bars, bar_source)
        result.values[GROUND_TRUTH] = infill_metrics(song, blank, targets, truth, truth)
        infills = {}
        for system_index, system in enumerate(systems):
            infill = system.infill(hidden, blank, targets, system_rng(seed, song_id, blank_index, system_index))
            check_infill(system.name, infill, blank.start_qn, blank.end_qn, targets)
            infills[system.name] = [n for notes in infill.values() for n in notes]
            result.values[system.name] = infill_metrics(song, blank, targets, infill, truth)
            if hasattr(system, "logprob_fn"):
                result.values[system.name].update(blank_nll_bits(system, song, blank, targets))
        results.append(result)
        if len(rolls) < rolls_wanted:
            context = [n for side in (side_notes(song, targets, blank.past_bar_lines_qn),
                                      side_notes(song, targets, blank.future_bar_lines_qn))
                       for notes in side.values() for n in notes]
            rolls.append(PianoRoll(blank, context, [n for notes in truth.values() for n in notes], infills))
    return results, rolls


def git_commit() -> str:
    """HEAD of the repository, with `+dirty` when tracked files differ from it; `unknown` outside git."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def run(data_dir: Path, out_dir: Path, systems: Sequence[InfillSystem], baseline_names: Sequence[str],
        n_songs: Optional[int] = None, blanks_per_song: int = DEFAULT_BLANKS_PER_SONG,
        seed: int = DEFAULT_SEED, progress: bool = True) -> dict:
    """The whole protocol: writes results.json, results.md, metrics.png and piano rolls to out_dir."""
    started = time.perf_counter()
    names = [s.name for s in systems]
    if len(set(names)) != len(names) or GROUND_TRUTH in names:
        raise ValueError(f"system names must be distinct and not {GROUND_TRUTH!r}: {names}")
    paths = song_paths(data_dir, n_songs)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[BlankResult] = []
    rolls: list[PianoRoll] = []
    skipped = {}
    for path in tqdm(paths, desc="songs", unit="song", disable=not progress):
        try:
            song_results, song_rolls = evaluate_song(path, systems, blanks_per_song, seed,
                                                     PIANO_ROLL_BLANKS - len(rolls))
        except MidiFileError as error:
            skipped[str(path)] = str(error)
            continue
        if not song_results:
            skipped[str(path)] = f"too short for a blank with {CONTEXT_BARS} bars of context on each side"
        results += song_results
        rolls += song_rolls
    if not results:
        raise SystemExit(f"--data {data_dir}: no song had room for a blank ({len(skipped)} skipped)")
    aggregates, tests = summarise(results, names, baseline_names, seed)
    protocol = {
        "data": str(data_dir), "n_songs": len(paths) - len(skipped), "n_blanks": len(results),
        "songs_skipped": skipped, "seed": seed, "blanks_per_song": blanks_per_song,
        "context_bars": CONTEXT_BARS, "blank_widths_bars": list(BLANK_WIDTHS_BARS),
        "onset_tolerance_qn": metrics.ONSET_TOLERANCE_QN, "groove_positions_per_bar": metrics.GROOVE_POSITIONS_PER_BAR,
        "duration_bin_centres_beats": list(metrics.DURATION_BIN_CENTRES_BEATS), "chord_window": "half bar",
        "chord_labels": list(metrics.CHORD_LABELS), "min_chord_cosine": metrics.MIN_CHORD_COSINE,
        "significance_level": SIGNIFICANCE_LEVEL, "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "systems": [GROUND_TRUTH, *names], "baselines": list(baseline_names), "metrics": list(METRICS),
        "git_commit": git_commit(),
    }
    report = {"protocol": protocol, "aggregates": aggregates, "tests": tests,
              "blanks": [asdict(r) for r in results]}
    plot_metrics(aggregates, out_dir / "metrics.png")
    for index, roll in enumerate(rolls):
        plot_piano_roll(roll, out_dir / f"pianoroll_{index}_{roll.blank.song_id}_qn{roll.blank.start_qn:.0f}.png")
    protocol["wall_time_s"] = round(time.perf_counter() - started, 2)
    write_bytes_atomic(out_dir / "results.json", json.dumps(report, indent=1, allow_nan=True).encode())
    write_bytes_atomic(out_dir / "results.md", results_markdown(aggregates, tests, protocol).encode())
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of held-out MIDI files (searched recursively)")
    parser.add_argument("--model", type=Path, help="model to evaluate as the system 'cmi'")
    parser.add_argument("--ablation", type=Path,
                        help=f"the model's ablation, evaluated as {ABLATION_SYSTEM!r} and as a baseline for the model")
    parser.add_argument("--songs", type=int, help="only the first N songs in path order")
    parser.add_argument("--blanks-per-song", type=int, default=DEFAULT_BLANKS_PER_SONG)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and plots")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: not a folder")
    systems: list[InfillSystem] = list(BASELINES)
    if args.model:
        systems.append(load_model_system(args.model, MODEL_SYSTEM))
    baseline_names = [b.name for b in BASELINES]
    if args.ablation:
        systems.append(load_model_system(args.ablation, ABLATION_SYSTEM))
        baseline_names.append(ABLATION_SYSTEM)
    report = run(args.data, args.out, systems, baseline_names, args.songs, args.blanks_per_song, args.seed)
    print((args.out / "results.md").read_text())
    print(f"{report['protocol']['n_blanks']} blanks in {report['protocol']['wall_time_s']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
