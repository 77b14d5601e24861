"""DIL tests: the two margin losses on hand-made vectors, the engine serving adapted weights, a
live daemon learning from repeat / accept signals per profile (persisting across a restart,
reset), and profiles surviving kill -9 during saves."""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cmi_daemon.client import DaemonClient
from cmi_daemon.daemon import schema
from cmi_daemon.daemon.engine_backend import EngineBackend
from cmi_daemon.daemon.protocol import Limits
from cmi_daemon.dil import losses
from cmi_daemon.dil.adapter import TRAINED_MODULES, graph_weights
from cmi_daemon.dil.examples import piece
from cmi_daemon.dil.learner import Learner, trainable_keys
from cmi_daemon.dil.settings import DILSettings
from cmi_daemon.dil.store import STATE_FILE, ProfileStore
from cmi_daemon.inference.bundle import load_torch_jepa
from cmi_daemon.inference.engine import PROFILE_SESSIONS_IN_MEMORY, Engine
from cmi_daemon.music import vocab
from cmi_daemon.music.tokens import read_midi
from cmi_daemon.paths import default_model_dir
from conftest import POP909_FIXTURES
from daemon_support import REPO, infill_request, process_rss_bytes, threaded_daemon
from tiny_bundle import randomized, tiny_bundle_dir


ALWAYS_STEP = DILSettings(margin=2.0)
"""A margin beyond any cosine gap: every signal steps, whatever the random tiny model's vectors."""


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return tiny_bundle_dir(tmp_path_factory)


# ----- losses -----

def _vectors(seed: int, n: int = 4, width: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(width, generator=generator) for _ in range(n)]


@pytest.mark.parametrize("variant", sorted(losses.LOSSES))
def test_a_step_on_either_loss_lowers_neg_minus_pos(variant):
    predicted_pos, target_pos, noise, target_neg = _vectors(0)
    predicted_neg = target_neg + 0.1 * noise  # the rejected content predicted all too well
    predicted_pos.requires_grad_(True)
    predicted_neg.requires_grad_(True)
    loss, before = losses.LOSSES[variant](predicted_pos, target_pos, predicted_neg, target_neg)
    assert loss > 0
    loss.backward()
    with torch.no_grad():
        predicted_pos -= 0.1 * predicted_pos.grad
        predicted_neg -= 0.1 * predicted_neg.grad
    _, after = losses.LOSSES[variant](predicted_pos, target_pos, predicted_neg, target_neg)
    gap_before = before["neg"] - before["pos"] if variant == "cosine" else before["pos"] - before["neg"]
    gap_after = after["neg"] - after["pos"] if variant == "cosine" else after["pos"] - after["neg"]
    assert gap_after < gap_before


def test_cosine_margin_is_zero_once_pos_beats_neg_by_the_margin():
    target = torch.tensor([1.0, 0.0])
    aligned, opposite = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 0.0])
    loss, terms = losses.cosine_margin_loss(aligned, target, opposite, target)
    assert loss == 0 and terms["pos"] == pytest.approx(1) and terms["neg"] == pytest.approx(-1)
    loss, _ = losses.cosine_margin_loss(opposite, target, aligned, target)
    assert float(loss) == pytest.approx(1 - (-1) + losses.MARGIN)
    near = torch.tensor([1.0, 0.05])
    loss, terms = losses.cosine_margin_loss(aligned, target, near, target)
    assert float(loss) == pytest.approx(terms["neg"] - terms["pos"] + losses.MARGIN), "inside the margin: linear"


def test_iteration_and_sample_losses_compare_span_means():
    predicted = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, -1.0]])
    neutral = torch.tensor([True, True, False, False])
    loss, terms = losses.iteration_loss(predicted, targets, ~neutral, neutral)
    assert terms["pos"] == pytest.approx(1) and terms["neg"] == pytest.approx(-1) and loss == 0
    loss, terms = losses.sample_loss(predicted[:2], targets[2:], targets[:3])
    assert terms["neg"] > terms["pos"] and float(loss) > losses.MARGIN


# ----- the engine with a profile's weights -----

def _request(**options):
    return schema.parse_infill(infill_request(**options), Limits(), [])


def test_engine_serves_a_profile_weights_and_forgets_them(tiny_bundle, tmp_path):
    engine = Engine(tiny_bundle, intra_op_threads=1)
    request = _request()
    region = engine.region(request.song, request.start_qn, request.end_qn, request.target_tracks)
    base = engine.conditioning(region, 12)
    learner = Learner(engine, tmp_path / "dil", settings=ALWAYS_STEP, seed=0)
    assert learner.wait_idle()
    model = learner._model("alice")
    engine.install_profile_weights("alice", model.graph_weights(learner.initializers))
    assert np.allclose(engine.conditioning(region, 12, "alice"), base, atol=1e-5), "base weights, base vector"
    rejected = piece(request.song, request.start_qn, request.end_qn, request.target_tracks, 256)
    model.iteration_step(rejected, (0, rejected.blank_end - rejected.blank_start))
    engine.install_profile_weights("alice", model.graph_weights(learner.initializers))
    assert np.abs(engine.conditioning(region, 12, "alice") - base).max() > 1e-3, "a step changes the vector"
    assert np.array_equal(engine.conditioning(region, 12, "bob"), base), "other profiles keep the base model"
    engine.install_profile_weights("alice", None)
    assert np.array_equal(engine.conditioning(region, 12, "alice"), base)
    learner.close()


@pytest.mark.slow
def test_engine_keeps_a_bounded_number_of_profiles_and_reads_the_others_back(tiny_bundle, tmp_path):
    engine = Engine(tiny_bundle, intra_op_threads=1)
    request = _request()
    region = engine.region(request.song, request.start_qn, request.end_qn, request.target_tracks)
    learner = Learner(engine, tmp_path / "dil", settings=ALWAYS_STEP, seed=0)
    assert learner.wait_idle()
    rejected = piece(request.song, request.start_qn, request.end_qn, request.target_tracks, 256)
    profiles = [f"user{i}" for i in range(PROFILE_SESSIONS_IN_MEMORY + 3)]
    for steps, profile in enumerate(profiles, start=1):  # each adapted by a different number of steps
        model = learner._model(profile)
        for _ in range(steps):
            model.iteration_step(rejected, (0, 8))
        learner.store.save(profile, model.tensors(), model.steps, 1, ALWAYS_STEP.to_json())
    first_pass = {profile: engine.conditioning(region, 12, profile) for profile in profiles}
    assert len(engine._profile_sessions) == PROFILE_SESSIONS_IN_MEMORY
    base = engine.conditioning(region, 12)
    vectors = [base] + list(first_pass.values())
    assert min(np.abs(a - b).max() for i, a in enumerate(vectors) for b in vectors[i + 1:]) > 1e-5, \
        "every profile has its own conditioning"
    for profile in profiles:  # the earliest were dropped for the later ones: read back, the same weights
        np.testing.assert_array_equal(engine.conditioning(region, 12, profile), first_pass[profile])
    assert len(engine._profile_sessions) == PROFILE_SESSIONS_IN_MEMORY
    learner.close()


def test_the_default_models_graphs_take_every_weight_dil_trains_as_torch_computes_it():
    """The shipped bundle's recorded graph weights name every encoder and predictor parameter, and a
    profile's weights installed through them condition exactly as the torch JEPA with those weights."""
    engine = Engine(default_model_dir(), intra_op_threads=1)
    initializers = engine.jepa_initializers()
    base = load_torch_jepa(engine.bundle)
    trained = {key for key, _ in base.named_parameters() if key.startswith(TRAINED_MODULES)}
    assert trainable_keys(base, initializers) == trained
    adapted = randomized(copy.deepcopy(base), seed=3, scale=0.02)
    with torch.no_grad():
        for parameter in adapted.parameters():  # as the graphs store them
            parameter.copy_(parameter.half().float())
    engine.install_profile_weights("alice", graph_weights(adapted.state_dict(), initializers))
    song = read_midi(POP909_FIXTURES[0])
    region = engine.region(song, *song.meter.bar_range_qn(9, 12), [0, 1])
    n_blank = region.expected_answer_tokens()
    token_ids = torch.tensor([region.prefix_ids + [vocab.PAD_ID] * n_blank + region.suffix_ids])
    blank = torch.zeros_like(token_ids, dtype=torch.bool)
    blank[0, len(region.prefix_ids):len(region.prefix_ids) + n_blank] = True
    with torch.no_grad():
        expected = adapted.conditioning(token_ids, ~blank, blank).numpy()
        base_vector = base.conditioning(token_ids, ~blank, blank).numpy()
    served = engine.conditioning(region, n_blank, "alice")
    assert np.abs(served - base_vector).max() > 1e-2, "the adapted weights change the vector"
    assert np.abs(served - expected).max() <= 1e-5


# ----- a live daemon -----

def _state(dil_dir, profile="default"):
    return load_file(ProfileStore(dil_dir, "").folder(profile) / STATE_FILE)


def test_daemon_learns_from_repeat_and_accept_keeps_it_across_restart_and_resets(tiny_bundle, tmp_path):
    dil_dir = tmp_path / "dil"
    backend = EngineBackend(tiny_bundle, "cpu", dil_dir=dil_dir, dil_settings=ALWAYS_STEP)
    request = infill_request(profile="alice")
    with threaded_daemon(backend, tmp_path / "profiles.json") as daemon:
        with DaemonClient(connection=daemon.connection_info(), timeout_ms=20_000) as client:
            first = client.infill(request)
            client.infill({**request, "options": {**request["options"], "seed": 2}})
            assert backend.signal_sink.wait_idle()
            after_repeat = _state(dil_dir, "alice")
            client.feedback(request["session"], "accept")
            assert backend.signal_sink.wait_idle()
            after_accept = _state(dil_dir, "alice")
            log = backend.signal_sink.store.read_log("alice")
    assert [entry["signal"] for entry in log] == ["repeat", "accept"]
    assert first["candidates"], "a reply"
    base = load_file(tiny_bundle / "jepa.safetensors")
    key = "predictor.out_proj.weight"
    assert not torch.allclose(after_repeat[f"jepa.{key}"], base[key].float()), "the repeat moved the weights"
    if log[1]["steps"]:
        assert not torch.equal(after_accept[f"jepa.{key}"], after_repeat[f"jepa.{key}"])
    assert any(k.startswith("adam.exp_avg.") for k in after_accept), "optimizer state is saved"

    engine_request = _request()
    restarted = EngineBackend(tiny_bundle, "cpu", dil_dir=dil_dir)
    engine = restarted.engine
    region = engine.region(engine_request.song, engine_request.start_qn, engine_request.end_qn,
                           engine_request.target_tracks)
    with threaded_daemon(restarted, tmp_path / "profiles.json") as daemon:
        assert restarted.signal_sink.wait_idle()
        adapted = engine.conditioning(region, 12, "alice")
        assert np.abs(adapted - engine.conditioning(region, 12)).max() > 1e-4, "the profile survived the restart"
        assert restarted.signal_sink.store.load("alice").steps == log[0]["steps"] + log[1]["steps"]
        with DaemonClient(connection=daemon.connection_info(), timeout_ms=20_000) as client:
            assert client.profiles(reset="alice")["reset"] == "alice"
            assert restarted.signal_sink.wait_idle()
        assert np.array_equal(engine.conditioning(region, 12, "alice"), engine.conditioning(region, 12))
        assert not ProfileStore(dil_dir, "").folder("alice").exists()


@pytest.mark.slow
def test_learning_from_many_signals_does_not_grow_memory(tiny_bundle, tmp_path):
    """After the first signals (torch's autograd and the profile's sessions, a one-time cost), each
    further signal replaces the profile's sessions: memory stays flat, not one copy per signal."""
    backend = EngineBackend(tiny_bundle, "cpu", dil_dir=tmp_path / "dil", dil_settings=ALWAYS_STEP)
    sessions = [infill_request(session=f"take-1:{start}-{start + 4}", start_qn=float(start), end_qn=float(start + 4),
                               profile="bob") for start in (4, 8, 12)]

    def repeat_each(seed: int) -> None:
        for request in sessions:
            client.infill({**request, "options": {**request["options"], "seed": seed}})
        assert backend.signal_sink.wait_idle(120.0)

    with threaded_daemon(backend, tmp_path / "profiles.json") as daemon:
        with DaemonClient(connection=daemon.connection_info(), timeout_ms=20_000) as client:
            for seed in range(3):
                repeat_each(seed)
            gc.collect()
            warm_bytes = process_rss_bytes(os.getpid())
            for seed in range(3, 9):
                repeat_each(seed)
            gc.collect()
            grown_bytes = process_rss_bytes(os.getpid()) - warm_bytes
    log = backend.signal_sink.store.read_log("bob")
    assert len(log) == 3 * 8, "every infill after a session's first is a repeat signal"
    learned = sum(1 for entry in log[3 * 2:] if entry["steps"])
    assert learned == 3 * 6, "every measured signal stepped, saved and installed new sessions"
    print(f"RSS growth over {learned} learning signals after warm-up: {grown_bytes / 2**20:.1f} MiB")
    assert grown_bytes < 48 * 2**20


# ----- kill -9 during saves -----

SAVER = """
import sys, torch
from cmi_daemon.dil.store import ProfileStore
store = ProfileStore(sys.argv[1], "base")
round_ = 0
while True:
    round_ += 1
    tensors = {f"jepa.w{i}": torch.full((256, 256), float(round_)) for i in range(16)}
    store.save("default", tensors, steps=round_, signals=round_, settings_json="{}")
    store.append_log("default", {"round": round_, "padding": "x" * 2000})
    print(round_, flush=True)
"""


@pytest.mark.slow
def test_a_profile_killed_during_saves_always_loads(tmp_path):
    rng = np.random.default_rng(0)
    store = ProfileStore(tmp_path, "base")
    for attempt in range(6):
        process = subprocess.Popen([sys.executable, "-c", SAVER, str(tmp_path)], cwd=REPO,
                                   stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip(), "the first save finished"
        time.sleep(float(rng.uniform(0.0, 0.3)))
        process.kill()
        process.wait()
        saved = store.load("default")
        assert saved is not None, f"attempt {attempt}: the profile does not load"
        values = {float(t.flatten()[0]) for t in saved.tensors.values()}
        assert values == {float(saved.steps)}, "weights and counters come from one save"
        assert store.read_log("default"), "the log is readable"
    store.remove_temporaries()
    assert not list(store.folder("default").glob(".*.tmp"))


def test_a_state_of_another_model_is_refused_once_until_it_changes(tmp_path, caplog):
    tensors = {"jepa.w": torch.ones(4)}
    ProfileStore(tmp_path, "old model").save("alice", tensors, steps=3, signals=2, settings_json="{}")
    store = ProfileStore(tmp_path, "new model")
    with caplog.at_level("WARNING", logger="cmi_daemon.dil"):
        assert store.load("alice") is None and store.load("alice") is None
    assert [r.getMessage() for r in caplog.records].count(
        f"profile alice: {store.folder('alice') / STATE_FILE} was adapted from another model; "
        "using the base model") == 1
    store.save("alice", tensors, steps=4, signals=3, settings_json="{}")
    assert store.load("alice").steps == 4, "a new save of this model's state is read"


def test_profiles_command_resets_on_disk_when_no_daemon_runs(tmp_path, monkeypatch, capsys):
    from cmi_daemon.cli import main as cli

    monkeypatch.setenv("CMI_HOME", str(tmp_path))
    store = ProfileStore(tmp_path / "data" / "dil", "base")
    store.save("carol", {"jepa.w": torch.zeros(2)}, steps=1, signals=1, settings_json="{}")
    assert cli.main(["profiles"]) == 0 and "carol" in capsys.readouterr().out
    assert cli.main(["profiles", "--reset", "carol"]) == 0
    assert store.profiles() == [] and not store.folder("carol").exists()
    assert cli.main(["profiles", "--reset", "carol"]) == 2


@pytest.mark.slow
def test_latency_benchmark_runs_and_reports_its_figures(tiny_bundle, tmp_path):
    """`python -m training.bench_dil` end to end on the fixture songs (its figures are measured
    by hand on a quiet machine; here only that it runs and reports them)."""
    from training.bench import dil as bench_dil

    out = tmp_path / "bench.json"
    bench_dil.main(["--model", str(tiny_bundle), "--infills", "2", "--out", str(out)])
    figures = json.loads(out.read_text())
    assert figures["infills"] == 2 and figures["signals_handled_while_busy"] >= 1
    assert figures["idle_median_ms"] > 0 and figures["busy_median_ms"] > 0
    assert figures["median_ratio"] == pytest.approx(figures["busy_median_ms"] / figures["idle_median_ms"], rel=0.01)


def test_dil_disabled_in_the_settings_learns_nothing(tiny_bundle, tmp_path):
    backend = EngineBackend(tiny_bundle, "cpu", dil_dir=tmp_path / "dil", dil_settings=DILSettings(enabled=False))
    assert backend.signal_sink is None
    assert not (tmp_path / "dil").exists()
