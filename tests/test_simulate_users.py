"""The simulated-user command (training.eval.simulate_users) end to end on the committed fixture songs
with the tiny random model: every user and strategy runs, the report and plots are written, a
rerun resumes from the saved runs, and the paired test over pieces is the one reported."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from conftest import POP909_FIXTURES
from tiny_bundle import tiny_bundle_dir
from training.eval import simulate_users


def test_every_user_and_strategy_runs_writes_the_report_and_resumes(tmp_path, tmp_path_factory, capsys):
    data = POP909_FIXTURES[0].parent.parent
    arguments = ["--model", str(tiny_bundle_dir(tmp_path_factory)), "--data", str(data), "--out", str(tmp_path),
                 "--tests", "2", "--pieces", "1", "--rounds", "2", "--lr", "1e-3"]
    simulate_users.main(arguments)
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    expected = {f"{user}-{name}-{test:03d}.json" for test in range(2)
                for user, strategies in simulate_users.USER_STRATEGIES.items()
                for name in (s if s == "off" else f"{s}-cosine" for s in strategies)}
    assert set(runs) == expected
    report = json.loads((tmp_path / "results.json").read_text())
    summary = report["summary"]
    assert set(summary) == {"paper/iteration", "paper/sample", "paper/both", "grounded/both", "random/both"}
    for entry in summary.values():
        assert entry["tests"] == 2
    for test in range(2):
        paper = json.loads((tmp_path / "runs" / f"paper-off-{test:03d}.json").read_text())
        for piece in paper["pieces"]:
            assert len(piece["ss"]) == 2 and all(-1.0 <= ss <= 1.0 for ss in piece["ss"])
            assert 1 <= piece["ic"] <= 3
    # The reported p is the Wilcoxon test of the per-piece figures, DIL against off.
    dil = [json.loads((tmp_path / "runs" / f"grounded-both-cosine-{t:03d}.json").read_text()) for t in range(2)]
    off = [json.loads((tmp_path / "runs" / f"grounded-off-{t:03d}.json").read_text()) for t in range(2)]
    differences = np.subtract([p["rounds"] for run in dil for p in run["pieces"]],
                              [p["rounds"] for run in off for p in run["pieces"]])
    expected_p = 1.0 if np.all(differences == 0) else stats.wilcoxon(differences).pvalue
    assert summary["grounded/both"]["p_pieces"] == pytest.approx(expected_p)
    markdown = (tmp_path / "results.md").read_text()
    assert "| Both |" in markdown and "+20.1% / -43.7%" in markdown and "Grounded user" in markdown
    assert (tmp_path / "ius_ric_per_test.png").stat().st_size > 1000
    assert (tmp_path / "grounded_rounds.png").stat().st_size > 1000

    # A rerun finds every (user, system, test) saved and only summarises.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    capsys.readouterr()
    simulate_users.main(arguments)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()} == before
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == summary


def test_paired_p_is_one_for_identical_figures_and_ignores_missing_ones():
    assert simulate_users.paired_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert simulate_users.paired_p([float("nan")], [1.0]) is None
    assert simulate_users.paired_p([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 3.0, 4.0, 5.0, 6.0, 7.5]) < 0.05


@pytest.mark.parametrize("strategy, expected", [
    ("both", ["iteration", "sample"]),
    ("iteration", ["iteration", "none (sample-wise steps are off)"]),
    ("sample", ["none (iteration-wise steps are off)", "sample"]),
])
def test_the_users_verdicts_reach_the_daemons_learner_as_signals(strategy, expected, tmp_path_factory):
    """A reject then an accept of other notes in one piece: the learner's own policy picks the steps,
    and an ablation turns one kind off without forgetting the session's first version."""
    from cmi_daemon.inference.engine import Engine

    data = POP909_FIXTURES[0].parent.parent
    engine = Engine(tiny_bundle_dir(tmp_path_factory))
    case = simulate_users.load_cases(data, test=0, n_pieces=1, seed=0)[0]
    system = simulate_users.SimulatedSystem(engine, strategy, simulate_users.DILSettings(lr=1e-3))
    system.reset(seed=0)
    try:
        first, second = (system.infill(case, seed) for seed in (1, 2))
        assert first != second
        system.reject(case, "piece", first)
        system.accept(case, "piece", second)
        log = system.learner.store.read_log(simulate_users.PROFILE)
        assert [entry["strategy"] for entry in log] == expected
        assert [entry["signal"] for entry in log] == ["reject", "accept"]
        # Each step taken is one loss term; a step off computes none.
        assert [len(entry["losses"]) for entry in log] == [
            system.settings.steps_per_signal if kind in ("iteration", "sample") else 0 for kind in expected]
    finally:
        system.close()
    assert system.learner is None


def test_the_baseline_has_no_learner(tmp_path_factory):
    from cmi_daemon.inference.engine import Engine

    system = simulate_users.SimulatedSystem(Engine(tiny_bundle_dir(tmp_path_factory)), "off",
                                            simulate_users.DILSettings())
    system.reset(seed=0)
    assert system.learner is None
