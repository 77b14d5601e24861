"""Training speed on this machine: the trainer's step against the pure-torch fp32 reference.

    python -m training.bench_train --config small [--stage generator|jepa] [--compare]
        [--generator 8x384] [--batch-size N] [--ctx-len N] [--steps N] [--shards DIR]

Times whole optimiser steps (forward, backward, clipping, AdamW) of `training.train.train_step`
on real batches (token shards of the fixture songs in tests/fixtures/midi, or --shards), with the
trainer's model, batch and sequence length; stage 2 includes the frozen JEPA's conditioning
forward, as in training. With --compare the reference path runs on a copy of the same model and
the same batches, its steps interleaved with the trainer's (so a shared machine's load hits both
alike), and the ratio of their tokens/s is printed. The reference path is what the trainer did
before its CPU work: the chunked pure-torch WKV and a cross-entropy over full (B, T, 20,099)
logits for the generator; fp32 everywhere. Two warm-up steps of each are excluded; tokens/s
counts real input tokens, as the trainer's log does.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn import functional as F

from cmi_daemon.inference.measure import cpu_model
from cmi_daemon.inference.device import choose_device, flush_denormals_in_this_thread
from cmi_daemon.model import wkv_kernel
from cmi_daemon.model.config import preset
from cmi_daemon.model.jepa import JEPA
from cmi_daemon.model.rwkv import RWKVGenerator
from training import train
from training.data.batches import ExampleStream, TokenShard

WARMUP_STEPS = 2
FIXTURE_MIDI = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "midi"


class ReferenceGeneratorObjective(torch.nn.Module):
    """GeneratorObjective's loss the plain way: full logits, F.cross_entropy, chunked WKV."""

    def __init__(self, generator):
        super().__init__()
        self.generator = generator.use_wkv_kernel(False)

    def forward(self, input_ids, target_ids, loss_mask, cond=None):
        logits, _ = self.generator(input_ids, cond=cond)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), target_ids.flatten(), reduction="none")
        per_token = per_token.view(target_ids.shape)
        mask = loss_mask.float()
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean(), per_token * mask


def fixture_shards(folder: Path) -> Path:
    """Token shards of the committed fixture songs (training.data.prepare's own functions)."""
    from training.data.prepare import work_items, write_split

    songs = sorted(FIXTURE_MIDI.glob("pop909/*/*.mid")) + sorted(FIXTURE_MIDI.glob("groove/*.mid"))
    write_split(folder, "train", list(work_items(songs, 0, 0)), workers=1)
    return folder


class TrainingPath:
    """One way of training: its model, objective, optimizer and autocast, and its timed steps."""

    def __init__(self, name: str, stage: str, model, objective, config, autocast):
        self.name, self.stage, self.model, self.objective, self.autocast = name, stage, model, objective, autocast
        self.optimizer = train.make_optimizer(model, config)
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def step(self, batch, frozen_jepa, grad_clip: float, record: bool) -> None:
        started = time.perf_counter()
        loss_sum, _ = train.train_step(self.stage, self.objective, self.model, self.optimizer, [batch], frozen_jepa,
                                       self.autocast, grad_clip)
        float(loss_sum[0])
        if record:
            self.seconds.append(time.perf_counter() - started)
            self.tokens.append(int(loss_sum[1]))

    def tokens_per_s(self) -> list[float]:
        return [tokens / seconds for tokens, seconds in zip(self.tokens, self.seconds)]


def build_paths(config: train.TrainConfig, device, compare: bool, generator_size: str = None):
    """(the trainer's path, the reference path or None, frozen JEPA or None) on one initial model."""
    model_config = preset(config.model)
    if generator_size:
        n_layer, n_embd = (int(part) for part in generator_size.lower().split("x"))
        model_config = replace(model_config, generator=replace(model_config.generator, n_layer=n_layer, n_embd=n_embd))
    frozen_jepa = None
    if config.stage == "jepa":
        model = JEPA(replace(model_config.encoder, max_len=max(model_config.encoder.max_len, config.ctx_len)),
                     model_config.predictor)
    else:  # conditioned by a random JEPA: it costs what a trained one does
        model = RWKVGenerator(replace(model_config.generator, ctx_len=config.ctx_len))
        frozen_jepa = JEPA(model_config.encoder, model_config.predictor).eval().requires_grad_(False).to(device)
    model.to(device).train()
    reference_model = copy.deepcopy(model) if compare else None
    wrap = train.JEPAObjective if config.stage == "jepa" else train.GeneratorObjective
    fast = TrainingPath("trainer", config.stage, model, wrap(model), config, train.training_autocast(device))
    reference = None
    if compare:
        reference_objective = (train.JEPAObjective(reference_model) if config.stage == "jepa"
                               else ReferenceGeneratorObjective(reference_model))
        reference = TrainingPath("reference", config.stage, reference_model, reference_objective, config, nullcontext())
    return fast, reference, frozen_jepa


def summary(path: TrainingPath) -> str:
    rates = path.tokens_per_s()
    return (f"{path.name:>9}: median {statistics.median(rates):,.0f} tokens/s (best {max(rates):,.0f}), "
            f"median step {statistics.median(path.seconds):.2f} s")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small", help="training preset: " + ", ".join(train.PRESETS))
    parser.add_argument("--stage", choices=train.STAGES, default="generator")
    parser.add_argument("--compare", action="store_true", help="also time the reference path, interleaved")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--ctx-len", type=int, default=None)
    parser.add_argument("--generator", default=None, metavar="LAYERSxWIDTH",
                        help="another generator size than the preset's, e.g. 8x384 (stage 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each path after the warm-up")
    parser.add_argument("--shards", type=Path, default=None, help="token shards (default: the fixture songs)")
    args = parser.parse_args(argv)

    config = train.train_preset(args.config, args.stage)
    overrides = {name: value for name, value in (("batch_size", args.batch_size), ("ctx_len", args.ctx_len))
                 if value is not None}
    config = replace(config, **overrides)
    device = choose_device()
    flush_denormals_in_this_thread(device)
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory() as folder:
        shards = args.shards or fixture_shards(Path(folder))
        stream = ExampleStream(TokenShard(shards, "train"), args.stage, config.ctx_len, config.seed, config.blanks)
        fast, reference, frozen_jepa = build_paths(config, device, args.compare, args.generator)
        kernel = "in use" if device.type == "cpu" and wkv_kernel.library() is not None else (
            f"not used ({wkv_kernel.problem() or 'not a CPU run'})")

        print(f"command: python -m training.bench_train {' '.join(sys.argv[1:] if argv is None else argv)}")
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), python {platform.python_version()}, device {device}, "
              f"load average {os.getloadavg()[0]:.1f}")
        size = (f"generator {fast.model.config.n_layer} x {fast.model.config.n_embd}" if args.stage == "generator"
                else f"encoder {fast.model.context_encoder.config.n_layer} x "
                     f"{fast.model.context_encoder.config.n_embd}")
        n_params = sum(p.numel() for p in train.trained_parameters(fast.model)) / 1e6
        print(f"stage {args.stage}, preset {args.config} ({size}, {n_params:.2f}M trained parameters): "
              f"batch {config.batch_size} x "
              f"<= {config.ctx_len} tokens; trainer: autocast "
              f"{'bf16' if isinstance(fast.autocast, torch.autocast) else 'off (fp32)'}"
              + (f", CPU WKV kernel {kernel}" if args.stage == "generator" else ""))
        paths = [fast] + ([reference] if reference is not None else [])
        for index in range(WARMUP_STEPS + args.steps):
            batch = stream.batch(range(index * config.batch_size, (index + 1) * config.batch_size)).to(device)
            for path in paths if index % 2 == 0 else paths[::-1]:
                path.step(batch, frozen_jepa, config.grad_clip, record=index >= WARMUP_STEPS)
        print(f"timings: {args.steps} steps of each after {WARMUP_STEPS} warm-up steps, interleaved")
        for path in paths:
            print(summary(path))
        if reference is not None:
            ratios = [f / r for f, r in zip(fast.tokens_per_s(), reference.tokens_per_s())]
            ratio = statistics.median(fast.tokens_per_s()) / statistics.median(reference.tokens_per_s())
            print(f"ratio trainer / reference: {ratio:.2f} "
                  f"(per step pair: median {statistics.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
