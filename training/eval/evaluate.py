"""Objective evaluation of infilling systems on held-out songs: a fixed, seeded protocol of blanks,
every metric of `training.eval.metrics` per blank and system, paired significance tests, tables and plots.

    python -m training.evaluate --data ../shared/data/pop909/dev --out eval/ [--model PATH]

The protocol and the meaning of each column are in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from scipy import stats
from tqdm import tqdm

from cmi_daemon.errors import MidiFileError
from cmi_daemon.files import write_bytes_atomic
from cmi_daemon.inference.controls import CONTEXT_BARS
from cmi_daemon.music import vocab
from cmi_daemon.music.annotations import bar_lines_qn
from cmi_daemon.music.regions import ilm_sequence, replace_notes_in_range
from cmi_daemon.music.tokens import Note, Song, read_midi
from training.eval import metrics
from training.eval.baselines import BASELINES, Blank, InfillSystem, notes_in_range

BLANK_WIDTHS_BARS = (2, 4)
"""Blank k of a song is BLANK_WIDTHS_BARS[k % 2] bars wide."""
DEFAULT_BLANKS_PER_SONG = 4
DEFAULT_SEED = 0
SIGNIFICANCE_LEVEL = 0.05
BOOTSTRAP_RESAMPLES = 2000
PIANO_ROLL_BLANKS = 3
GROUND_TRUTH = "ground truth"

METRICS = metrics.CONTEXT_METRICS + ("GC", "onset_F1", "chroma_cos", "PCE_diff")
"""Columns computed for every system; each is judged by |value - ground truth's value| per blank."""
NLL_METRICS = ("bits_per_token", "bits_per_note")
AVERAGE_CONDITIONING_NLL = "bits_per_token_average_conditioning"
"""A conditioned model's bits per token with the training blanks' mean conditioning vector instead
of the blank's own: how much worse it gets is how much the generator reads the JEPA."""
MODEL_SYSTEM = "cmi"
ABLATION_SYSTEM = "cmi w/o JEP-AGA"
"""The unconditioned generator: a system of its own, and the baseline the model must beat."""
"""Columns of model systems that can score the ground truth (they have a `logprob_fn`)."""


def load_model_system(model_path: Path, name: str) -> InfillSystem:
    """Where a trained model (a bundle folder from `python -m export`) becomes an evaluated system;
    it has a `logprob_fn` (metrics.LogprobFn), so it gets the NLL columns."""
    from cmi_daemon.errors import CMIError
    from training.eval.model_system import evaluation_system

    try:
        return evaluation_system(model_path, name)
    except CMIError as error:
        raise SystemExit(f"--model/--ablation {model_path}: no model system can be loaded from it ({error})") from error


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


def _side(song: Song, targets: Sequence[int], lines_qn: Sequence[float]) -> dict[int, list[Note]]:
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
    past = _segment(song, _side(song, targets, blank.past_bar_lines_qn), blank.past_bar_lines_qn)
    future = _segment(song, _side(song, targets, blank.future_bar_lines_qn), blank.future_bar_lines_qn)
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
# The protocol


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
            context = [n for side in (_side(song, targets, blank.past_bar_lines_qn),
                                      _side(song, targets, blank.future_bar_lines_qn))
                       for notes in side.values() for n in notes]
            rolls.append(PianoRoll(blank, context, [n for notes in truth.values() for n in notes], infills))
    return results, rolls


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_ci95(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, half-width of its 95% t-interval (NaN below two values) and count, NaNs left out."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return float("nan"), float("nan"), 0
    if len(x) < 2:
        return float(x.mean()), float("nan"), 1
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(half), len(x)


def paired_test(distance_a: Sequence[float], distance_b: Sequence[float], rng: np.random.Generator) -> dict:
    """Two-sided Wilcoxon signed-rank test of paired distances, and a paired bootstrap 95% interval
    of the mean difference a - b (negative: a is closer to the ground truth)."""
    a, b = np.asarray(distance_a, dtype=np.float64), np.asarray(distance_b, dtype=np.float64)
    keep = ~(np.isnan(a) | np.isnan(b))
    difference = a[keep] - b[keep]
    if len(difference) == 0:
        return {"n": 0, "wilcoxon_p": float("nan"), "mean_difference": float("nan"),
                "bootstrap_ci95": [float("nan")] * 2}
    if np.all(difference == 0):
        p_value = 1.0
    else:
        p_value = float(stats.wilcoxon(difference).pvalue)
    resampled = difference[rng.integers(0, len(difference), (BOOTSTRAP_RESAMPLES, len(difference)))].mean(axis=1)
    return {"n": int(len(difference)), "wilcoxon_p": p_value, "mean_difference": float(difference.mean()),
            "bootstrap_ci95": [float(np.percentile(resampled, 2.5)), float(np.percentile(resampled, 97.5))]}


def distances(results: Sequence[BlankResult], system: str, metric: str) -> np.ndarray:
    """|value - ground truth's value| per blank."""
    return np.array([abs(r.values[system][metric] - r.values[GROUND_TRUTH][metric]) for r in results])


def nll_values(results: Sequence[BlankResult], system: str, metric: str) -> Optional[np.ndarray]:
    """The system's NLL per blank (lower is better), or None for a system without one."""
    if any(metric not in r.values[system] for r in results):
        return None
    return np.array([r.values[system][metric] for r in results])


def summarise(results: Sequence[BlankResult], system_names: Sequence[str], baseline_names: Sequence[str],
              seed: int) -> tuple[dict, list[dict]]:
    """Aggregates per system and metric, and paired tests of each system against each baseline:
    on the distance to the ground truth for every metric, and on NLL where both have one."""
    aggregates: dict = {}
    for system in [GROUND_TRUTH, *system_names]:
        aggregates[system] = {}
        for metric in METRICS + NLL_METRICS + (AVERAGE_CONDITIONING_NLL,):
            if metric not in results[0].values[system]:
                continue
            mean, ci95, n = mean_ci95([r.values[system][metric] for r in results])
            entry = {"mean": mean, "ci95": ci95, "n": n}
            if metric in METRICS:
                entry["distance_mean"], entry["distance_ci95"], _ = mean_ci95(distances(results, system, metric))
            aggregates[system][metric] = entry
    rng = np.random.default_rng(seed)
    tests = []
    for system in system_names:
        average = nll_values(results, system, AVERAGE_CONDITIONING_NLL)
        if average is not None:
            test = paired_test(nll_values(results, system, "bits_per_token"), average, rng)
            test.update(system=system, baseline=f"{system}, average conditioning", metric="bits_per_token",
                        significantly_better=bool(test["wilcoxon_p"] < SIGNIFICANCE_LEVEL
                                                  and test["mean_difference"] < 0))
            tests.append(test)
        for baseline in baseline_names:
            if baseline == system:
                continue
            pairs = [(metric, distances(results, system, metric), distances(results, baseline, metric))
                     for metric in METRICS]
            pairs += [(metric, nll_values(results, system, metric), nll_values(results, baseline, metric))
                      for metric in NLL_METRICS]
            for metric, ours, theirs in pairs:
                if ours is None or theirs is None:
                    continue
                test = paired_test(ours, theirs, rng)
                test.update(system=system, baseline=baseline, metric=metric,
                            significantly_better=bool(test["wilcoxon_p"] < SIGNIFICANCE_LEVEL
                                                      and test["mean_difference"] < 0))
                tests.append(test)
    return aggregates, tests


def daggers(tests: Sequence[dict]) -> dict[tuple[str, str], bool]:
    """(system, metric) -> significantly better than every other baseline."""
    marked: dict[tuple[str, str], bool] = {}
    for test in tests:
        key = (test["system"], test["metric"])
        marked[key] = marked.get(key, True) and test["significantly_better"]
    return marked


# ---------------------------------------------------------------------------------------------
# Outputs


def _cell(mean: float, ci95: float, dagger: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean:.3f}" if math.isnan(ci95) else f"{mean:.3f} ± {ci95:.3f}"
    return text + (" †" if dagger else "")


def results_markdown(aggregates: dict, tests: Sequence[dict], protocol: dict) -> str:
    """Tables of raw values, of distances to the ground truth (with daggers) and of p-values."""
    systems = list(aggregates)
    marked = daggers(tests)
    extra = [m for m in NLL_METRICS + (AVERAGE_CONDITIONING_NLL,) if any(m in aggregates[s] for s in systems)]
    lines = [f"# Objective evaluation: {protocol['n_blanks']} blanks from {protocol['n_songs']} songs of "
             f"`{protocol['data']}`", "",
             f"Seed {protocol['seed']}, {protocol['context_bars']} bars of context each side, blanks of "
             f"{' and '.join(map(str, protocol['blank_widths_bars']))} bars, commit `{protocol['git_commit']}`. "
             "Mean ± half-width of the 95% t-interval over blanks.", "",
             "## Values (↑ for PD, DD, CD, GC, onset F1, chroma cosine; ↓ for PCE difference)", "",
             "| system | " + " | ".join(METRICS + tuple(extra)) + " |",
             "| --- |" + " --- |" * (len(METRICS) + len(extra))]
    for system in systems:
        cells = [_cell(aggregates[system][m]["mean"], aggregates[system][m]["ci95"]) if m in aggregates[system] else "–"
                 for m in METRICS + tuple(extra)]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "## Distance to the ground truth's value, |value − value(ground truth)| per blank (↓)", "",
              f"† : closer to the ground truth than every baseline, Wilcoxon signed-rank p < {SIGNIFICANCE_LEVEL} "
              "(two-sided, paired over blanks).", "",
              "| system | " + " | ".join(METRICS) + " |", "| --- |" + " --- |" * len(METRICS)]
    for system in systems[1:]:
        cells = [_cell(aggregates[system][m]["distance_mean"], aggregates[system][m]["distance_ci95"],
                       marked.get((system, m), False)) for m in METRICS]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "## Paired tests (system − baseline; negative: the system is better)", "",
              "On the distance to the ground truth's value for PD … PCE, on the NLL itself for bits per "
              "token and per note.", "",
              "| system | baseline | metric | mean difference [bootstrap 95% CI] | Wilcoxon p |",
              "| --- | --- | --- | --- | --- |"]
    for test in tests:
        low, high = test["bootstrap_ci95"]
        lines.append(f"| {test['system']} | {test['baseline']} | {test['metric']} | "
                     f"{test['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}] | {test['wilcoxon_p']:.2g} |")
    return "\n".join(lines) + "\n"


def plot_metrics(aggregates: dict, path: Path) -> None:
    """Grouped bars: each metric's mean per system (left) and mean distance to the ground truth (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(aggregates)
    figure, axes = plt.subplots(1, 2, figsize=(15, 4.8))
    width = 0.8 / len(systems)
    x = np.arange(len(METRICS))
    for panel, (key, title) in enumerate((("mean", "value"), ("distance_mean", "|value − ground truth|"))):
        axis = axes[panel]
        for index, system in enumerate(systems):
            if key == "distance_mean" and system == GROUND_TRUTH:
                continue
            heights = [aggregates[system][m][key] for m in METRICS]
            errors = [aggregates[system][m]["ci95" if key == "mean" else "distance_ci95"] for m in METRICS]
            axis.bar(x + (index - (len(systems) - 1) / 2) * width, heights, width, yerr=np.nan_to_num(errors),
                     capsize=2, label=system, color=f"C{index}")
        axis.set_xticks(x, METRICS, rotation=30)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_piano_roll(roll: PianoRoll, path: Path) -> None:
    """One row per system: context grey, the system's infill coloured, the ground truth outlined."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    def boxes(notes):
        return [Rectangle((n.start_qn, n.pitch - 0.4), max(n.duration_qn, 0.05), 0.8) for n in notes]

    rows = [(GROUND_TRUTH, roll.truth), *roll.infills.items()]
    pitches = [n.pitch for n in roll.context + roll.truth + [n for _, ns in rows for n in ns]] or [60]
    figure, axes = plt.subplots(len(rows), 1, figsize=(14, 2.2 * len(rows)), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (axis, (name, notes)) in enumerate(zip(axes[:, 0], rows)):
        axis.add_collection(PatchCollection(boxes(roll.context), facecolor="0.75", edgecolor="none"))
        axis.add_collection(PatchCollection(boxes(notes), facecolor=colours[index % len(colours)], edgecolor="none"))
        axis.add_collection(PatchCollection(boxes(roll.truth), facecolor="none", edgecolor="black", linewidth=0.6))
        for line_qn in roll.blank.bar_lines_qn:
            axis.axvline(line_qn, color="0.9", linewidth=0.5, zorder=0)
        axis.axvspan(roll.blank.start_qn, roll.blank.end_qn, color="yellow", alpha=0.08)
        axis.set_xlim(roll.blank.past_start_qn, roll.blank.future_end_qn)
        axis.set_ylim(min(pitches) - 2, max(pitches) + 2)
        axis.set_ylabel("pitch")
        axis.set_title(name, fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("QN")
    figure.suptitle(f"song {roll.blank.song_id}: {roll.blank.width_bars} bars from QN {roll.blank.start_qn:.2f}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


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
