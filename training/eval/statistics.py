"""Statistics of the evaluation protocol: means with 95% t-intervals, paired Wilcoxon tests with
bootstrap intervals, each system's distance to the ground truth, the aggregates and tests of a run,
and which (system, metric) beats every baseline.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy import stats

from training.eval.blanks import AVERAGE_CONDITIONING_NLL, GROUND_TRUTH, METRICS, NLL_METRICS, BlankResult

SIGNIFICANCE_LEVEL = 0.05
BOOTSTRAP_RESAMPLES = 2000


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
