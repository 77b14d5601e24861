"""Training examples and the training loop: masks, ILM layout, DDP equivalence, exact resume, learning.

Shards are built from the committed fixture MIDI with training.data.prepare's own functions.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from safetensors.torch import load_file

from cmi_daemon.inference.bundle import JEPA_WEIGHTS
from cmi_daemon.model.config import preset
from cmi_daemon.model.jepa import JEPA
from cmi_daemon.model.rwkv import RWKVGenerator
from cmi_daemon.music import vocab
from export.__main__ import main as export_main
from tests.conftest import ALL_FIXTURES, GROOVE_FIXTURES, POP909_FIXTURES, REPO
from training.data import batches
from training.bench import train as bench_train
from training import train
from training.losses import ROW_CHUNK, head_cross_entropy
from tests.tiny_bundle import tiny_bundle_dir
from training.data.prepare import work_items, write_split

SMOKE = ["--config", "smoke", "--eval-interval", "2", "--dev-examples", "4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_split(out, "train", list(work_items(ALL_FIXTURES, 0, 0)), workers=1)
    write_split(out, "dev", list(work_items(POP909_FIXTURES[:1] + GROOVE_FIXTURES[:1], 0, 0)), workers=1)
    return out


@pytest.fixture(scope="module")
def jepa_dir(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("jepa")
    train.main(["--stage", "jepa", "--shards", str(shards), "--out", str(out), *SMOKE, "--max-steps", "2"])
    return out


def params(checkpoint_path):
    return torch.load(checkpoint_path, map_location="cpu", weights_only=True)["model"]


def log_losses(out_dir) -> dict[int, float]:
    """step -> training loss; a resumed run's later lines replace a killed run's."""
    losses = {}
    for line in (out_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def command(*args) -> list[str]:
    return [sys.executable, "-m", "training.train", *map(str, args)]


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# --- examples --------------------------------------------------------------------------------


def test_random_spans_cover_10_to_80_percent(shards):
    shard = batches.TokenShard(shards, "train")
    config = batches.BlankConfig(time_aligned_fraction=0.0)
    for index in range(200):
        split = batches.sample_split(shard, 3, index, 300, config)
        n = len(split.prefix) + len(split.blank) + len(split.suffix)
        assert not split.time_aligned
        assert 0.1 <= len(split.blank) / n <= 0.8 + 1 / n


def test_time_aligned_blanks_span_their_time_exactly(shards):
    shard = batches.TokenShard(shards, "train")
    config = batches.BlankConfig(time_aligned_fraction=1.0)
    steps_per_qn = shard.time_unit.nominal_steps_per_qn
    shortest = config.min_blank_qn * steps_per_qn
    n_aligned = 0
    for index in range(100):
        rng = batches.example_rng(5, index)
        window = shard.window(rng, 400)
        split = batches.draw_split(window, rng, config)
        if not split.time_aligned:
            continue
        n_aligned += 1
        # The blank starts with a note-on at its first step; its waits are its whole length.
        assert vocab.is_note(split.blank[0]) and vocab.note_fields(split.blank[0])[2] > 0
        blank_steps = sum(vocab.wait_steps(t) for t in split.blank)
        assert shortest <= blank_steps <= config.max_blank_qn * steps_per_qn
        # Prefix + blank + suffix play the same time as the window, onsets at the same steps.
        music = split.prefix + split.blank + split.suffix
        window_onsets = onsets(window)
        assert onsets(music) == {s - min(window_onsets) for s in window_onsets}
        # Every note the blank starts is closed inside it; prefix notes are closed before it.
        assert not sounding(split.blank) and not sounding(split.prefix)
    assert n_aligned >= 80


def onsets(token_ids) -> set[int]:
    clock, first, found = 0, None, set()
    for t in token_ids:
        clock += vocab.wait_steps(t)
        if vocab.is_note(t) and vocab.note_fields(t)[2] > 0:
            first = clock if first is None else first
            found.add(clock - first)
    return found


def sounding(token_ids) -> set:
    keys = set()
    for t in token_ids:
        if vocab.is_note(t):
            instrument_bin, pitch, velocity_bin = vocab.note_fields(t)
            (keys.add if velocity_bin else keys.discard)((instrument_bin, pitch))
    return keys


def test_ilm_layout_and_loss_masks():
    split = batches.Split([10, 11, 12], [20, 21], [30, 31, 32, 33], False)
    example = batches.ilm_example(split)
    assert example.ids == [10, 11, 12, vocab.MASK_ID, 30, 31, 32, 33, vocab.SEP_ID, 20, 21, vocab.ANS_ID]
    targets = example.ids[1:]
    assert [t for t, m in zip(targets, example.answer_mask) if m] == [20, 21, vocab.ANS_ID]
    assert [t for t, m in zip(targets, example.loss_mask) if m] == [11, 12, 30, 31, 32, 33, 20, 21, vocab.ANS_ID]
    jepa = batches.jepa_example(split)
    assert jepa.ids == [10, 11, 12, 20, 21, 30, 31, 32, 33]
    assert jepa.target_mask == [False] * 3 + [True] * 2 + [False] * 4


def test_batches_pad_and_masks_agree(shards):
    stream = batches.ExampleStream(batches.TokenShard(shards, "train"), "generator", 128, 1, batches.BlankConfig())
    batch = stream.batch(range(8))
    real = batch.input_ids != vocab.PAD_ID
    assert not (batch.loss_mask & ~real).any() and not (batch.answer_mask & ~batch.loss_mask).any()
    assert batch.input_ids.shape[1] <= 128
    assert ((batch.target_ids == vocab.ANS_ID) == (batch.answer_mask & ~torch.roll(batch.answer_mask, -1, 1))).all()
    jepa = batch.jepa
    assert not (jepa.context_mask & jepa.target_mask).any()
    assert ((jepa.context_mask | jepa.target_mask) == jepa.valid).all()
    assert ((jepa.token_ids == vocab.PAD_ID) == ~jepa.valid).all()
    # The answer is the blank's tokens: same count per example as the JEPA targets (+ <ans>).
    assert (batch.answer_mask.sum(1) == jepa.target_mask.sum(1) + 1).all()
    # Seeded: the same indices give the same batch.
    assert torch.equal(stream.batch(range(8)).input_ids, batch.input_ids)


def test_ranks_split_the_global_stream():
    one = list(batches.micro_batch_indices(32, 0, 0, 1, 8))
    two = [i for rank in (0, 1) for i in batches.micro_batch_indices(32, 0, rank, 2, 4)]
    assert one == two == list(range(32, 40))


# --- the loss and the fast path ----------------------------------------------------------------


def test_head_cross_entropy_is_the_full_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    n_rows = ROW_CHUNK + 37  # a full chunk and a partial one
    hidden = torch.randn(n_rows, 24, dtype=torch.float64, generator=generator, requires_grad=True)
    head = torch.randn(vocab.VOCAB_SIZE, 24, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab.VOCAB_SIZE, (n_rows,), generator=generator)
    row_weights = torch.rand(n_rows, dtype=torch.float64, generator=generator)
    reference_losses = F.cross_entropy(hidden @ head.T, targets, reduction="none")
    reference_gradients = torch.autograd.grad((reference_losses * row_weights).sum() * 3, (hidden, head))
    loss, losses = head_cross_entropy(hidden, head, targets, row_weights)
    gradients = torch.autograd.grad(loss * 3, (hidden, head))
    torch.testing.assert_close(losses, reference_losses.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(loss.detach(), (reference_losses * row_weights).sum().detach(), rtol=1e-12, atol=0)
    for ours, reference in zip(gradients, reference_gradients):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def tiny_paths(shards):
    """The trainer's objective and the pure-torch fp32 reference on copies of one tiny generator,
    with a real batch and a random frozen JEPA's conditioning."""
    config = train.train_preset("smoke", "generator")
    model_config = preset(config.model)
    torch.manual_seed(0)
    model = RWKVGenerator(replace(model_config.generator, ctx_len=config.ctx_len))
    with torch.no_grad():  # fresh init leaves several matrices at zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference = bench_train.ReferenceGeneratorObjective(copy.deepcopy(model))
    frozen_jepa = JEPA(model_config.encoder, model_config.predictor).eval().requires_grad_(False)
    stream = batches.ExampleStream(batches.TokenShard(shards, "train"), "generator", config.ctx_len, 3, config.blanks)
    return train.GeneratorObjective(model), reference, stream.batch(range(4)), frozen_jepa


def objective_gradients(objective, batch, frozen_jepa):
    objective.zero_grad()
    loss, per_token = train.generator_losses(objective, batch, frozen_jepa)
    loss.backward()
    return loss.detach(), per_token.detach(), {name: p.grad for name, p in objective.generator.named_parameters()
                                               if p.grad is not None}


def test_the_trainers_objective_has_the_reference_loss_and_gradients(shards):
    """CPU WKV kernel and fused head loss against full logits, F.cross_entropy and the chunked WKV,
    both fp32: the same loss and gradients up to fp32 rounding."""
    fast, reference, batch, frozen_jepa = tiny_paths(shards)
    loss, per_token, gradients = objective_gradients(fast, batch, frozen_jepa)
    reference_loss, reference_per_token, reference_gradients = objective_gradients(reference, batch, frozen_jepa)
    assert gradients.keys() == reference_gradients.keys()
    assert float(loss) == pytest.approx(float(reference_loss), rel=1e-5)
    torch.testing.assert_close(per_token, reference_per_token, rtol=1e-4, atol=1e-4)
    assert not per_token[~batch.loss_mask].any()
    for name, gradient in gradients.items():
        scale = float(reference_gradients[name].abs().max())
        torch.testing.assert_close(gradient, reference_gradients[name], rtol=1e-3, atol=1e-4 * scale, msg=name)


def assert_same_direction(bf16_gradients: dict, gradients: dict) -> None:
    """bf16 autocast (CUDA, and CPUs with AMX) rounds the matmuls' inputs to 8 significant bits
    (relative error up to 2^-9 per element, accumulated over the layers), so gradients cannot
    agree elementwise; what must hold is that each weight's gradient points the same way as fp32's
    (cosine > 0.99) with a norm within 5 %. Gradients under 1e-3 of the largest are rounding noise
    in both and are not compared."""
    largest = max(float(g.norm()) for g in gradients.values())
    for name, gradient in gradients.items():
        if gradient.norm() < 1e-3 * largest:
            continue
        cosine = F.cosine_similarity(bf16_gradients[name].flatten().double(), gradient.flatten().double(), dim=0)
        assert cosine > 0.99, (name, float(cosine))
        assert float(bf16_gradients[name].norm() / gradient.norm()) == pytest.approx(1.0, abs=0.05), name


def test_bf16_autocast_gradients_of_the_generator_point_the_same_way(shards):
    fast, _, batch, frozen_jepa = tiny_paths(shards)
    loss, _, gradients = objective_gradients(fast, batch, frozen_jepa)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_loss, _, bf16_gradients = objective_gradients(fast, batch, frozen_jepa)
    assert float(bf16_loss) == pytest.approx(float(loss), rel=1e-2)
    assert_same_direction(bf16_gradients, gradients)


def test_bf16_autocast_gradients_of_the_jepa_point_the_same_way(shards):
    config = train.train_preset("smoke", "jepa")
    torch.manual_seed(0)
    jepa, _, _ = train.build_model(config)
    objective = train.JEPAObjective(jepa)
    stream = batches.ExampleStream(batches.TokenShard(shards, "train"), "jepa", config.ctx_len, 3, config.blanks)
    batch = stream.batch(range(4))
    results = []
    for autocast in (nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        jepa.zero_grad()
        with autocast:
            loss = train.batch_loss("jepa", objective, batch, None)
        loss.backward()
        results.append((float(loss.detach()), {name: p.grad.clone() for name, p in jepa.named_parameters()
                                               if p.grad is not None}))
    (loss, gradients), (bf16_loss, bf16_gradients) = results
    assert bf16_loss == pytest.approx(loss, rel=2e-2)
    assert_same_direction(bf16_gradients, gradients)


# --- the loop --------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_twice_the_batch(shards, jepa_dir, tmp_path):
    common = ["--stage", "generator", "--shards", shards, "--jepa", jepa_dir, *SMOKE, "--max-steps", "1"]
    single, double = tmp_path / "single", tmp_path / "ddp"
    train.main([*map(str, common), "--out", str(single), "--batch-size", "4"])
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "training.train", *map(str, common), "--out", str(double), "--batch-size", "2"],
                         cwd=REPO, env=environment(), capture_output=True, text=True, timeout=120)
    assert ddp.returncode == 0, ddp.stderr
    one, two = (torch.load(out / "last.pt", weights_only=True) for out in (single, double))
    config = train.config_from_args(train.parse_args([*map(str, common), "--out", str(single)]))
    initial = train.build_model(config)[0].state_dict()
    assert any(not torch.equal(one["model"][name], initial[name]) for name in initial)
    # Gradients agree to fp32 rounding (Adam's first moment is 0.1 x the clipped gradient) ...
    for state_one, state_two in zip(one["optimizer"]["state"].values(), two["optimizer"]["state"].values()):
        scale = state_one["exp_avg"].abs().max()
        torch.testing.assert_close(state_two["exp_avg"], state_one["exp_avg"], rtol=1e-4, atol=1e-5 * scale)
    # ... and so do the weights; Adam's first step is about +-lr per weight whatever the
    # gradient's size, so rounding in near-zero gradients shows at a small fraction of lr.
    for name in one["model"]:
        torch.testing.assert_close(two["model"][name], one["model"][name], rtol=1e-5, atol=1e-2 * config.lr,
                                   msg=name)
    assert log_losses(single)[1] == pytest.approx(log_losses(double)[1], rel=1e-5)


def test_stage_two_standardizes_the_conditioning_with_training_vectors(shards, jepa_dir, tmp_path):
    out = tmp_path / "generator"
    train.main(["--stage", "generator", "--shards", str(shards), "--jepa", str(jepa_dir), "--out", str(out),
                *SMOKE, "--max-steps", "1"])
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    config = train.TrainConfig.from_dict(checkpoint["train_config"])
    frozen_jepa, _ = train.jepa_from_checkpoint(str(jepa_dir))
    stream = batches.ExampleStream(batches.TokenShard(shards, "train"), "generator", config.ctx_len, config.seed,
                                   config.blanks, augmented=True)
    vectors = train.conditioning_sample(frozen_jepa, stream, config.cond_stats_examples, 4, "cpu")
    assert vectors.shape == (config.cond_stats_examples, checkpoint["model"]["cond_mean"].numel())
    torch.testing.assert_close(checkpoint["model"]["cond_mean"], vectors.mean(0))
    assert not torch.equal(checkpoint["model"]["cond_inv_std"], torch.ones_like(vectors[0]))


def test_a_generator_trains_against_a_bundles_jepa_and_exports_with_it(shards, tmp_path_factory, tmp_path):
    bundle = tiny_bundle_dir(tmp_path_factory)
    out = tmp_path / "generator"
    train.main(["--stage", "generator", "--shards", str(shards), "--jepa", str(bundle), "--out", str(out),
                *SMOKE, "--max-steps", "1"])
    assert export_main([str(out / "last.pt"), "--out", str(tmp_path / "exported")]) == 0
    exported = load_file(str(tmp_path / "exported" / JEPA_WEIGHTS))
    shipped = load_file(str(bundle / JEPA_WEIGHTS))
    assert exported.keys() == shipped.keys()
    for name in shipped:
        assert torch.equal(exported[name], shipped[name]), name


@pytest.mark.slow
def test_resume_after_kill_continues_the_same_run(shards, tmp_path):
    """All runs in subprocesses of one thread count, so their float reductions are the same."""
    n_steps = 10
    common = ["--stage", "generator", "--conditioning", "off", "--shards", shards, *SMOKE,
              "--max-steps", n_steps, "--eval-interval", "1", "--grad-accum", "2"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(command(*common, "--out", straight), check=True, cwd=REPO, env=environment(),
                   capture_output=True, timeout=120)

    process = subprocess.Popen(command(*common, "--out", killed), cwd=REPO, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (killed / "last.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    stopped_at = torch.load(killed / "last.pt", weights_only=True)["step"]
    assert 1 <= stopped_at < n_steps, "the run finished before it could be killed"

    subprocess.run(command(*common, "--out", killed, "--resume"), check=True, cwd=REPO, env=environment(),
                   capture_output=True, timeout=120)
    assert log_losses(killed) == log_losses(straight)
    final_straight, final_resumed = params(straight / "last.pt"), params(killed / "last.pt")
    for name in final_straight:
        assert torch.equal(final_straight[name], final_resumed[name]), name
    best = torch.load(killed / "best.pt", weights_only=True)
    assert set(best) >= {"model", "optimizer", "step", "examples_seen", "rng", "model_config", "train_config"}


def test_a_public_checkpoint_shaped_generator_loads_and_trains(shards, tmp_path):
    """BlinkDL's layout (bf16, 20,096 rows) through --init-rwkv: the trainer's path (CPU kernel,
    fused head loss) starts from exactly the loaded weights and moves them."""
    source = RWKVGenerator(replace(preset("tiny").generator, conditioned=False))
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    public = {name: (tensor[:vocab.PUBLIC_VOCAB_SIZE] if name in ("emb.weight", "head.weight") else tensor)
              .to(torch.bfloat16).clone() for name, tensor in source.state_dict().items()}
    torch.save(public, tmp_path / "public.pth")
    out = tmp_path / "generator"
    train.main(["--stage", "generator", "--conditioning", "off", "--init-rwkv", str(tmp_path / "public.pth"),
                "--shards", str(shards), "--out", str(out), *SMOKE, "--max-steps", "2"])
    trained = params(out / "last.pt")
    for name, tensor in public.items():
        start = tensor.float()
        assert not torch.equal(trained[name][:start.shape[0]], start), name
        assert (trained[name][:start.shape[0]] - start).abs().max() <= 2 * 2 * 3e-3, name  # two steps of lr 3e-3
    assert all(math.isfinite(loss) for loss in log_losses(out).values())


def test_smoke_training_lowers_the_loss(shards, tmp_path):
    out = tmp_path / "smoke"
    train.main(["--stage", "generator", "--conditioning", "off", "--shards", str(shards), "--out", str(out),
                "--config", "smoke", "--max-steps", "30", "--eval-interval", "30"])
    losses = log_losses(out)
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(26, 31)])
    assert last < first - 2.0, (first, last)
    dev = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if "dev_nll_bits" in line]
    assert dev[-1]["dev_nll_bits"] < np.log2(vocab.VOCAB_SIZE)


def test_a_paused_run_continues_on_its_own_schedule(shards, tmp_path):
    common = ["--stage", "generator", "--conditioning", "off", "--shards", str(shards), *SMOKE, "--max-steps", "4"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    train.main([*common, "--out", str(tmp_path / "paused"), "--pause-at-step", "2"])
    assert torch.load(tmp_path / "paused" / "last.pt", weights_only=True)["step"] == 2
    train.main([*common, "--out", str(tmp_path / "paused"), "--resume"])
    assert log_losses(tmp_path / "paused") == log_losses(tmp_path / "straight")
    straight, paused = params(tmp_path / "straight" / "last.pt"), params(tmp_path / "paused" / "last.pt")
    for name in straight:
        torch.testing.assert_close(paused[name], straight[name], rtol=0, atol=0)


def test_the_share_of_time_aligned_blanks_is_an_option():
    base = ["--stage", "generator", "--shards", "shards", "--out", "out", "--conditioning", "off"]
    config = train.config_from_args(train.parse_args([*base, "--time-aligned-fraction", "0.8"]))
    assert config.blanks.time_aligned_fraction == 0.8
    assert train.TrainConfig.from_dict(config.to_dict()).blanks.time_aligned_fraction == 0.8
    assert train.config_from_args(train.parse_args(base)).blanks.time_aligned_fraction == 0.5
    with pytest.raises(ValueError, match="share in 0..1"):
        train.config_from_args(train.parse_args([*base, "--time-aligned-fraction", "1.5"]))
