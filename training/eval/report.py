"""What an evaluation run writes for people: the markdown tables (values, distances with daggers,
paired tests), the metrics bar chart and the piano rolls.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from training.eval.blanks import AVERAGE_CONDITIONING_NLL, GROUND_TRUTH, METRICS, NLL_METRICS, PianoRoll
from training.eval.statistics import SIGNIFICANCE_LEVEL, daggers


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
