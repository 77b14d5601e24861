"""Evaluation protocol: baselines stay inside the range, the run writes every output, the metrics
separate a sensible baseline from noise on real songs."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from cmi_daemon.inference.controls import CONTEXT_BARS
from cmi_daemon.music import vocab
from cmi_daemon.music.annotations import BEAT_FILE_NAME, bar_lines_qn
from cmi_daemon.music.regions import build_region
from cmi_daemon.music.tokens import read_midi
from conftest import GROOVE_FIXTURES, POP909_FIXTURES, shared_data
from tiny_bundle import tiny_bundle_dir
from training.eval import evaluate
from training.eval.blanks import (AVERAGE_CONDITIONING_NLL, BLANK_WIDTHS_BARS, GROUND_TRUTH, METRICS, NLL_METRICS,
                                  blank_nll_bits, check_infill, choose_blanks, masked_song, target_tracks)
from training.eval.baselines import BASELINES, RandomNotes, RepeatPreviousBars


def all_blanks(path, n_blanks=12, seed=3):
    song = read_midi(path)
    lines, _ = bar_lines_qn(song, path)
    targets = target_tracks(song)
    blanks = choose_blanks(song, path.stem, lines, targets, n_blanks, np.random.default_rng(seed))
    return song, targets, blanks


@pytest.mark.parametrize("path", POP909_FIXTURES, ids=lambda p: p.parent.name)
def test_blanks_sit_on_bar_lines_with_context_and_do_not_overlap(path):
    song, targets, blanks = all_blanks(path)
    lines, source = bar_lines_qn(song, path)
    assert source == BEAT_FILE_NAME and targets == (0, 1, 2)
    assert len(blanks) >= 6
    for blank in blanks:
        assert blank.width_bars in BLANK_WIDTHS_BARS
        assert len(blank.bar_lines_qn) == 2 * CONTEXT_BARS + blank.width_bars + 1
        assert set(blank.bar_lines_qn) <= set(lines)
        assert blank.beat_qn == 1.0
    for earlier, later in zip(blanks, blanks[1:]):
        assert earlier.end_qn <= later.start_qn


def test_bars_come_from_the_meter_without_a_beat_file():
    path = next(p for p in GROOVE_FIXTURES if "3-4" in p.name)
    song = read_midi(path)
    lines, source = bar_lines_qn(song, path)
    assert source == "meter" and lines[-1] >= song.end_qn
    assert np.allclose(np.diff(lines), 3.0)
    assert target_tracks(song) == tuple(range(len(song.tracks)))


@pytest.mark.parametrize("path", POP909_FIXTURES, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("system", BASELINES, ids=lambda s: s.name)
def test_baselines_stay_inside_the_range_and_are_deterministic(path, system):
    song, targets, blanks = all_blanks(path)
    for index, blank in enumerate(blanks):
        hidden = masked_song(song, blank, targets)
        infill = system.infill(hidden, blank, targets, np.random.default_rng(index))
        check_infill(system.name, infill, blank.start_qn, blank.end_qn, targets)
        assert set(infill) == set(targets)
        assert any(infill.values())
        for notes in infill.values():
            assert all(blank.start_qn <= n.start_qn < blank.end_qn for n in notes)
            assert all(n.start_qn + n.duration_qn <= blank.end_qn + 1e-9 for n in notes)
        assert infill == system.infill(hidden, blank, targets, np.random.default_rng(index))


def test_repeat_baseline_copies_the_bars_before_and_random_follows_the_context_density():
    song, targets, blanks = all_blanks(POP909_FIXTURES[0])
    blank = blanks[0]
    hidden = masked_song(song, blank, targets)
    repeated = RepeatPreviousBars().infill(hidden, blank, targets, np.random.default_rng(0))
    source_start = blank.bar_lines_qn[blank.context_bars - blank.width_bars]
    shift = blank.start_qn - source_start
    for track in targets:
        source = [n for n in song.tracks[track].notes if source_start <= n.start_qn < blank.start_qn]
        assert [n.pitch for n in repeated[track]] == [n.pitch for n in source]
        assert [n.start_qn - shift for n in repeated[track]] == pytest.approx([n.start_qn for n in source])
    counts = []
    for seed in range(40):
        infill = RandomNotes().infill(hidden, blank, targets, np.random.default_rng(seed))
        counts.append(sum(len(v) for v in infill.values()))
    context = sum(1 for t in targets for n in song.tracks[t].notes
                  if blank.past_start_qn <= n.start_qn < blank.future_end_qn
                  and not blank.start_qn <= n.start_qn < blank.end_qn)
    expected = context * (blank.end_qn - blank.start_qn) / (blank.future_end_qn - blank.past_start_qn
                                                            - (blank.end_qn - blank.start_qn))
    assert np.mean(counts) == pytest.approx(expected, rel=0.15)


def test_systems_never_see_the_ground_truth():
    song, targets, blanks = all_blanks(POP909_FIXTURES[1])
    for blank in blanks:
        hidden = masked_song(song, blank, targets)
        assert not any(blank.start_qn <= n.start_qn < blank.end_qn for t in targets for n in hidden.tracks[t].notes)


def test_check_infill_refuses_notes_outside_the_range():
    song, targets, blanks = all_blanks(POP909_FIXTURES[0])
    blank = blanks[0]
    note = song.tracks[0].notes[0]._replace(start_qn=blank.end_qn - 0.5, duration_qn=1.0)
    with pytest.raises(ValueError, match="outside"):
        check_infill("test", {0: [note]}, blank.start_qn, blank.end_qn, targets)
    with pytest.raises(ValueError, match="not a target"):
        check_infill("test", {7: []}, blank.start_qn, blank.end_qn, targets)


def test_ground_truth_nll_under_a_uniform_model():
    song, targets, blanks = all_blanks(POP909_FIXTURES[0])
    class UniformModel:
        """Every token equally likely; regions with the default context budget."""

        def region(self, song, start_qn, end_qn, targets):
            return build_region(song, start_qn, end_qn, targets)

        def logprob_fn(self, ids, start):
            return [-math.log(vocab.VOCAB_SIZE)] * (len(ids) - start)

    bits = blank_nll_bits(UniformModel(), song, blanks[0], targets)
    assert bits["bits_per_token"] == pytest.approx(math.log2(20099))
    assert bits["bits_per_note"] > 2 * math.log2(20099)


def test_end_to_end_on_the_fixture_songs(tmp_path):
    data = POP909_FIXTURES[0].parent.parent
    report = evaluate.run(data, tmp_path, list(BASELINES), [b.name for b in BASELINES],
                          blanks_per_song=3, seed=5, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["protocol"]["seed"] == 5 and saved["protocol"]["n_songs"] == 2
    assert saved["protocol"]["n_blanks"] == 6 == len(saved["blanks"])
    assert saved["protocol"]["git_commit"]
    systems = [GROUND_TRUTH] + [b.name for b in BASELINES]
    for blank in saved["blanks"]:
        for system in systems:
            assert set(blank["values"][system]) == set(METRICS)
            assert all(math.isfinite(v) for v in blank["values"][system].values())
    truth = saved["aggregates"][GROUND_TRUTH]
    assert truth["onset_F1"]["mean"] == 1.0 and truth["PCE_diff"]["mean"] == 0.0
    names = [b.name for b in BASELINES]
    assert {(t["system"], t["baseline"]) for t in saved["tests"]} == {
        (system, baseline) for system in names for baseline in names if system != baseline}
    table = (tmp_path / "results.md").read_text()
    for name in systems + list(METRICS):
        assert name in table
    images = sorted(tmp_path.glob("*.png"))
    assert (tmp_path / "metrics.png") in images and len(images) == 1 + evaluate.PIANO_ROLL_BLANKS
    import matplotlib.image
    for image in images:
        pixels = matplotlib.image.imread(image)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.05, image
    again = evaluate.run(data, tmp_path / "again", list(BASELINES), [b.name for b in BASELINES],
                         blanks_per_song=3, seed=5, progress=False)
    assert again["blanks"] == report["blanks"]


def test_main_refuses_a_folder_that_holds_no_model(tmp_path):
    data = POP909_FIXTURES[0].parent.parent
    with pytest.raises(SystemExit, match="no model system can be loaded"):
        evaluate.main(["--data", str(data), "--model", str(tmp_path / "model"), "--out", str(tmp_path)])


@pytest.mark.slow
def test_end_to_end_with_a_tiny_model_and_its_ablation(tmp_path, tmp_path_factory):
    data = POP909_FIXTURES[0].parent.parent
    model, ablation = tiny_bundle_dir(tmp_path_factory), tiny_bundle_dir(tmp_path_factory, conditioned=False)
    evaluate.main(["--data", str(data), "--model", str(model), "--ablation", str(ablation),
                   "--blanks-per-song", "1", "--seed", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    models = ("cmi", "cmi w/o JEP-AGA")
    for blank in saved["blanks"]:
        for system in models:
            values = blank["values"][system]
            conditioning = {AVERAGE_CONDITIONING_NLL} if system == "cmi" else set()
            assert set(values) == set(METRICS) | set(NLL_METRICS) | conditioning
            assert all(math.isfinite(v) for v in values.values())
            # a random model spreads its probability: near log2(20099) bits per token, far from 0
            assert 5.0 < values["bits_per_token"] < 20.0
    assert {t["system"] for t in saved["tests"]} >= set(models)
    # The model is tested against its ablation on every metric's distance and on the NLL itself.
    against_ablation = {t["metric"]: t for t in saved["tests"] if (t["system"], t["baseline"]) == models}
    assert set(against_ablation) == set(METRICS) | set(NLL_METRICS)
    for metric in NLL_METRICS:
        differences = [b["values"]["cmi"][metric] - b["values"]["cmi w/o JEP-AGA"][metric] for b in saved["blanks"]]
        test = against_ablation[metric]
        assert test["n"] == len(differences)
        assert test["mean_difference"] == pytest.approx(float(np.mean(differences)))
        assert test["bootstrap_ci95"][0] <= test["mean_difference"] <= test["bootstrap_ci95"][1]
    # How much the model reads its conditioning: its own NLL against the average blank's conditioning.
    [use] = [t for t in saved["tests"] if t["baseline"] == "cmi, average conditioning"]
    gaps = [b["values"]["cmi"]["bits_per_token"] - b["values"]["cmi"][AVERAGE_CONDITIONING_NLL]
            for b in saved["blanks"]]
    assert use["n"] == len(gaps) and use["mean_difference"] == pytest.approx(float(np.mean(gaps)))
    assert any(gap != 0 for gap in gaps), "the tiny model's random fusion reads the conditioning"
    assert not any(t["metric"] in NLL_METRICS for t in saved["tests"] if t["baseline"] == "random notes"), \
        "baselines without a model have no NLL to compare"
    table = (tmp_path / "results.md").read_text()
    assert all(name in table for name in models + NLL_METRICS)


@pytest.mark.slow
def test_pop909_dev_repeat_beats_random_on_pitch_overlap_with_the_past(tmp_path):
    data = shared_data("pop909/dev")
    report = evaluate.run(data, tmp_path, list(BASELINES), [b.name for b in BASELINES],
                          blanks_per_song=2, seed=0, progress=False)
    assert report["protocol"]["n_blanks"] >= 150
    repeat = np.array([b["values"]["repeat previous bars"]["PD_p"] for b in report["blanks"]])
    random_notes = np.array([b["values"]["random notes"]["PD_p"] for b in report["blanks"]])
    assert repeat.mean() > random_notes.mean() + 0.1
    assert stats.wilcoxon(repeat, random_notes, alternative="greater").pvalue < 0.05
    closer = next(t for t in report["tests"] if (t["system"], t["baseline"], t["metric"])
                  == ("repeat previous bars", "random notes", "PD_p"))
    assert closer["significantly_better"] and closer["bootstrap_ci95"][1] < 0
