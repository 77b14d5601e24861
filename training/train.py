"""Train JEP-AGA in two stages with one loop: the JEPA (stage 1), then the generator (stage 2).

    python -m training.train --stage jepa --config small --shards runs/shards --out runs/jepa
    python -m training.train --stage generator --config small --shards runs/shards --out runs/gen \
        --jepa runs/jepa [--conditioning off] [--init-rwkv RWKV-4-MIDI.pth]
    torchrun --nproc_per_node 4 -m training.train ...       (DDP: NCCL on CUDA, gloo on CPU)

Stage 1 trains the context encoder and predictor with AdamW; the target encoder follows by EMA
(momentum 0.996 -> 1.0 over the run). Stage 2 trains the RWKV-4 generator on ILM sequences,
conditioned on the frozen stage-1 JEPA's mean prediction over the blank; `--conditioning off`
is the same recipe without it (the paper's "w/o JEP-AGA" ablation).

Every eval_interval steps the dev split is evaluated and `last.pt` is written; `best.pt` is
the checkpoint of lowest dev NLL (stage 2) or the latest (stage 1, whose loss is measured
against a moving target and so cannot rank checkpoints). Checkpoints are written atomically
and hold everything a resume needs (weights, optimizer, data position, RNG states, elapsed
time); they load with torch.load(weights_only=True). `log.jsonl` gets one line per logged step
and per evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from cmi_daemon.inference.device import choose_device, flush_denormals_in_this_thread
from cmi_daemon.model.config import ModelConfig, preset
from cmi_daemon.model.jepa import JEPA, ema_momentum
from cmi_daemon.model.rwkv import RWKVGenerator, load_blinkdl_checkpoint
from cmi_daemon.music.timeunit import TimeUnit
from cmi_daemon.music.vocab import PAD_ID
from training.checkpoints import CHECKPOINT_FORMAT, read_jepa
from training.data.batches import BlankConfig, ExampleStream, TokenShard, micro_batch_indices
from training.losses import head_cross_entropy

STAGES = ("jepa", "generator")


@dataclass
class TrainConfig:
    stage: str = "generator"
    model: str = "small"
    """Model preset (cmi_daemon.model.config.PRESETS) for the networks this stage builds."""
    conditioning: bool = True
    jepa_dir: str = ""
    """The frozen JEPA of stage 2 with conditioning: a stage-1 output folder (its best.pt) or a model bundle."""
    cond_stats_examples: int = 256
    """Training examples whose conditioning vectors set the generator's standardisation (stage 2)."""
    init_rwkv: str = ""
    """Public RWKV-4-MIDI .pth to start the generator from (sizes then come from it)."""
    ctx_len: int = 1024
    """Tokens per training sequence (JEPA window; ILM sequence incl. <mask> <sep> <ans>)."""
    batch_size: int = 8
    """Sequences per rank per micro-step."""
    grad_accum: int = 1
    max_steps: int = 100_000
    time_budget_min: float = 0.0
    """Stop after this much training time (0: none); the schedules then span the budget."""
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 100
    dev_examples: int = 64
    log_interval: int = 10
    seed: int = 1337
    dev_seed: int = 7
    blanks: BlankConfig = field(default_factory=BlankConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return cls(**{**values, "blanks": BlankConfig(**values["blanks"])})


PRESETS: dict[str, dict] = {
    # A few dozen steps of the tiny model: tests and trying the loop out.
    "smoke": dict(model="tiny", ctx_len=128, batch_size=4, max_steps=40, warmup_steps=5, eval_interval=20,
                  dev_examples=8, log_interval=1, cond_stats_examples=16, lr={"jepa": 1e-3, "generator": 3e-3}),
    "tiny": dict(model="tiny", ctx_len=256, batch_size=8, max_steps=1000, warmup_steps=20, eval_interval=100,
                 dev_examples=32, lr={"jepa": 1e-3, "generator": 2e-3}),
    # The shipped default's size: JEPA and both generators train on a 2-core CPU in about 2 hours (the model card).
    "small": dict(model="small", ctx_len=1024, batch_size=4, max_steps=100_000, warmup_steps=30,
                  eval_interval=100, dev_examples=48, lr={"jepa": 5e-4, "generator": 1e-3}),
    # The paper: RWKV-4 560M, 4096-token sequences, batch 4 per GPU on 4 GPUs, lr 1e-6.
    "paper": dict(model="paper", ctx_len=4096, batch_size=4, max_steps=1_000_000, warmup_steps=1000,
                  eval_interval=2000, dev_examples=256, log_interval=50, lr={"jepa": 1e-4, "generator": 1e-6}),
}


def train_preset(name: str, stage: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"no training preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values["lr"] = values["lr"][stage]
    return TrainConfig(stage=stage, **values)


def lr_at(step: int, horizon_steps: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at horizon_steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, horizon_steps - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def jepa_from_checkpoint(jepa_dir: str) -> tuple[JEPA, ModelConfig]:
    """The frozen stage-1 JEPA (eval mode, no gradients) and the model config it was built with,
    from a stage-1 output folder or a model bundle (training.checkpoints.read_jepa)."""
    state, model_config, _ = read_jepa(jepa_dir)
    jepa = JEPA(model_config.encoder, model_config.predictor)
    jepa.load_state_dict(state)
    return jepa.eval().requires_grad_(False), model_config


def check_jepa_tokenizer(jepa_dir: str, tokenizer: dict) -> None:
    """Refuse a JEPA trained on tokens of another time unit than the shards' (its representations
    would read every wait wrong)."""
    if not jepa_dir:
        return
    _, _, summary = read_jepa(jepa_dir)
    jepa_steps = (summary.get("tokenizer") or {}).get("steps_per_qn")
    if jepa_steps != tokenizer.get("steps_per_qn"):
        raise ValueError(f"--jepa {jepa_dir} was trained on {TimeUnit(jepa_steps).describe()}, the shards are "
                         f"{TimeUnit(tokenizer.get('steps_per_qn')).describe()}: train stage 1 on these shards")


@torch.no_grad()
def conditioning_sample(frozen_jepa: JEPA, stream: ExampleStream, n_examples: int, batch_size: int,
                        device) -> torch.Tensor:
    """Conditioning vectors (n_examples, E) of the stream's first examples."""
    vectors = []
    for first in range(0, n_examples, batch_size):
        batch = stream.batch(range(first, min(first + batch_size, n_examples))).to(device)
        vectors.append(frozen_jepa.conditioning(batch.jepa.token_ids, batch.jepa.context_mask,
                                                batch.jepa.target_mask).float())
    return torch.cat(vectors)


def build_model(config: TrainConfig):
    """(trained module, frozen JEPA or None, model config) for the config's stage."""
    model_config = preset(config.model)
    if config.stage == "jepa":
        encoder = replace(model_config.encoder, max_len=max(model_config.encoder.max_len, config.ctx_len))
        model_config = replace(model_config, encoder=encoder)
        return JEPA(model_config.encoder, model_config.predictor), None, model_config
    frozen_jepa = None
    if config.conditioning:
        if not config.jepa_dir:
            raise ValueError("stage 2 with conditioning needs --jepa DIR (stage 1's output), "
                             "or --conditioning off for the ablation")
        frozen_jepa, jepa_config = jepa_from_checkpoint(config.jepa_dir)
        model_config = replace(model_config, encoder=jepa_config.encoder, predictor=jepa_config.predictor)
    generator_config = replace(model_config.generator, conditioned=config.conditioning,
                               cond_in_dim=model_config.encoder.n_embd, ctx_len=config.ctx_len)
    if config.init_rwkv:
        generator = load_blinkdl_checkpoint(config.init_rwkv, conditioned=config.conditioning,
                                            cond_in_dim=generator_config.cond_in_dim,
                                            cond_dim=generator_config.cond_dim, ctx_len=config.ctx_len)
        generator_config = generator.config
    else:
        generator = RWKVGenerator(generator_config)
    return generator, frozen_jepa, replace(model_config, generator=generator_config)


def trained_parameters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on embeddings' peers: gains, biases, mixes, decays)."""
    params = trained_parameters(model)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


class JEPAObjective(torch.nn.Module):
    """The JEPA loss as a forward(), so DistributedDataParallel can wrap it."""

    def __init__(self, jepa: JEPA):
        super().__init__()
        self.jepa = jepa

    def forward(self, token_ids, context_mask, target_mask):
        return self.jepa.loss(token_ids, context_mask, target_mask)


class GeneratorObjective(torch.nn.Module):
    """The generator's loss as a forward(), so DistributedDataParallel can wrap it: the head is
    applied only at the trained positions, fused with the cross-entropy (training.losses)."""

    def __init__(self, generator: RWKVGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, input_ids, target_ids, loss_mask, cond=None):
        """-> (mean over examples of each example's mean loss over its loss_mask tokens, so that
        N ranks averaging their batch means equal one rank with all N batches; the loss of each
        target token (B, T), 0 where loss_mask is False)."""
        state = self.generator.empty_state(input_ids.shape[0], input_ids.device)
        hidden, _ = self.generator.hidden(input_ids, state, cond)
        mask = loss_mask.float()
        row_weights = mask / mask.sum(1, keepdim=True).clamp(min=1.0) / mask.shape[0]
        rows = loss_mask.flatten().nonzero()[:, 0]
        loss, losses = head_cross_entropy(hidden.flatten(0, 1)[rows], self.generator.head.weight,
                                          target_ids.flatten()[rows], row_weights.flatten()[rows])
        per_token = torch.zeros(loss_mask.numel(), device=losses.device).index_copy_(0, rows, losses)
        return loss, per_token.view(loss_mask.shape)


def generator_losses(objective, batch, frozen_jepa: Optional[JEPA]):
    """GeneratorObjective's (loss, loss per target token) of one generator batch, conditioned on
    the frozen JEPA's vector when there is one."""
    cond = None
    if frozen_jepa is not None:
        with torch.no_grad():
            cond = frozen_jepa.conditioning(batch.jepa.token_ids, batch.jepa.context_mask, batch.jepa.target_mask)
    return objective(batch.input_ids, batch.target_ids, batch.loss_mask, cond)


def batch_loss(stage: str, objective, batch, frozen_jepa):
    if stage == "jepa":
        return objective(batch.token_ids, batch.context_mask, batch.target_mask)
    return generator_losses(objective, batch, frozen_jepa)[0]


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AMX tiles): without it, oneDNN
    emulates bf16 and a bf16 matmul is far slower than fp32 (DEVELOPERS.md: Training speed)."""
    return torch.cpu._is_amx_tile_supported()


def training_autocast(device):
    """bf16 autocast for the matmuls on CUDA and on CPUs with native bf16, else none (fp32)."""
    if device.type == "cuda" or (device.type == "cpu" and native_bf16_cpu()):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def input_tokens(stage: str, batch) -> torch.Tensor:
    """Real (not padding) input tokens of a batch: what tokens/s counts."""
    return (batch.valid if stage == "jepa" else batch.input_ids != PAD_ID).sum()


def train_step(stage: str, trained, model, optimizer, micro_batches, frozen_jepa, autocast, grad_clip: float,
               distributed: bool = False):
    """One optimiser step with gradients accumulated over the micro-batches (DDP synchronises on
    the last) -> (tensor [summed loss, real input tokens], gradient norm before clipping)."""
    losses, tokens = [], []
    for micro_step, batch in enumerate(micro_batches):
        sync = micro_step == len(micro_batches) - 1 or not distributed
        with nullcontext() if sync else trained.no_sync():
            with autocast:
                loss = batch_loss(stage, trained, batch, frozen_jepa) / len(micro_batches)
            loss.backward()
        losses.append(loss.detach().float())
        tokens.append(input_tokens(stage, batch))
    grad_norm = torch.nn.utils.clip_grad_norm_(trained_parameters(model), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return torch.stack([torch.stack(losses).sum(), torch.stack(tokens).sum().float()]), grad_norm


@torch.no_grad()
def evaluate(stage: str, model, frozen_jepa, dev: ExampleStream, n_examples: int, batch_size: int,
             rank: int, world_size: int, device, autocast) -> dict:
    """Dev loss (stage 1: JEPA loss; stage 2: generator loss) and, for stage 2, NLL in bits per
    answer token (answer + <ans>), over the first n_examples of the dev stream, split over ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, examples, nll nats, answer tokens
    mine = list(range(rank, n_examples, world_size))
    for first in range(0, len(mine), batch_size):
        indices = mine[first:first + batch_size]
        batch = dev.batch(indices).to(device)
        with autocast:
            if stage == "jepa":
                totals[0] += model.loss(batch.token_ids, batch.context_mask, batch.target_mask) * len(indices)
            else:
                loss, per_token = generator_losses(GeneratorObjective(model), batch, frozen_jepa)
                totals[0] += loss * len(indices)
                totals[2] += (per_token * batch.answer_mask).sum()
                totals[3] += batch.answer_mask.sum()
        totals[1] += len(indices)
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    result = {"dev_loss": float(totals[0] / totals[1].clamp(min=1))}
    if stage == "generator":
        result["dev_nll_bits"] = float(totals[2] / totals[3].clamp(min=1) / math.log(2))
    return result


def rng_states() -> dict:
    """Python, numpy and torch RNG states as lists and tensors (weights_only-loadable)."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    states = {"python": [version, list(python_state), gauss],
              "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    version, python_state, gauss = states["python"]
    random.setstate((version, tuple(python_state), gauss))
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomically(state: dict, path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


OVERRIDABLE = (("max-steps", int), ("time-budget-min", float), ("batch-size", int), ("grad-accum", int),
               ("lr", float), ("ctx-len", int), ("eval-interval", int), ("dev-examples", int),
               ("log-interval", int), ("seed", int))
"""Preset fields a command-line option may change."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, required=True)
    parser.add_argument("--config", default="small", help="training preset: " + ", ".join(PRESETS))
    parser.add_argument("--shards", type=Path, required=True, help="folder from training.data.prepare")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--conditioning", choices=("on", "off"), default="on")
    parser.add_argument("--jepa", default="", help="stage 1's output folder (stage 2)")
    parser.add_argument("--init-rwkv", default="", help="public RWKV-4-MIDI .pth to start from")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--time-aligned-fraction", type=float,
                        help="share of blanks cut at note onsets for a time, as the engine cuts (the rest are "
                             "random token spans; preset 0.5)")
    parser.add_argument("--pause-at-step", type=int, help="stop at this step, evaluated and checkpointed, with "
                        "the schedules still spanning --max-steps (continue later with --resume)")
    for name, kind in OVERRIDABLE:
        parser.add_argument(f"--{name}", type=kind, default=None)
    return parser.parse_args(argv)


def config_from_args(args) -> TrainConfig:
    names = [name.replace("-", "_") for name, _ in OVERRIDABLE]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    config = replace(train_preset(args.config, args.stage), **overrides,
                     conditioning=args.conditioning == "on", jepa_dir=args.jepa, init_rwkv=args.init_rwkv)
    if args.time_aligned_fraction is not None:
        if not 0.0 <= args.time_aligned_fraction <= 1.0:
            raise ValueError(f"--time-aligned-fraction {args.time_aligned_fraction} is not a share in 0..1")
        config.blanks = replace(config.blanks, time_aligned_fraction=args.time_aligned_fraction)
    if config.stage == "jepa" and not config.conditioning:
        raise ValueError("--conditioning off applies to stage 2 only")
    return config


def main(argv=None) -> None:
    args = parse_args(argv)
    out_dir: Path = args.out
    resume_path = out_dir / "last.pt"
    checkpoint = None
    if args.resume:
        if not resume_path.exists():
            raise FileNotFoundError(f"--resume: no {resume_path} to continue from")
        checkpoint = torch.load(resume_path, map_location="cpu", weights_only=True)
        config = TrainConfig.from_dict(checkpoint["train_config"])
        if args.max_steps is not None:
            config.max_steps = args.max_steps
        if args.time_budget_min is not None:
            config.time_budget_min = args.time_budget_min
    else:
        config = config_from_args(args)

    # Processes: one per device under torchrun, else one.
    distributed = "RANK" in os.environ
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        else:
            device = choose_device()
    else:
        rank, world_size, device = 0, 1, choose_device()
    flush_denormals_in_this_thread(device)
    master = rank == 0
    autocast = training_autocast(device)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Same seed everywhere: identical initial weights on every rank.
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed)
    stage = config.stage
    train_data = ExampleStream(TokenShard(args.shards, "train"), stage, config.ctx_len, config.seed, config.blanks,
                               augmented=True)
    dev_data = ExampleStream(TokenShard(args.shards, "dev"), stage, config.ctx_len, config.dev_seed, config.blanks)
    tokenizer = train_data.shard.tokenizer
    if stage == "generator" and config.conditioning:
        check_jepa_tokenizer(config.jepa_dir, tokenizer)

    model, frozen_jepa, model_config = build_model(config)
    model.to(device)
    if frozen_jepa is not None:
        frozen_jepa.to(device)
        if checkpoint is None:
            model.standardize_conditioning(conditioning_sample(frozen_jepa, train_data, config.cond_stats_examples,
                                                               config.batch_size, device))
    optimizer = make_optimizer(model, config)
    step, examples_seen, elapsed_s, best_dev = 0, 0, 0.0, math.inf
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        step, examples_seen = checkpoint["step"], checkpoint["examples_seen"]
        elapsed_s, best_dev = checkpoint["elapsed_s"], checkpoint["best_dev"]
        restore_rng_states(checkpoint["rng"])
    trained = JEPAObjective(model) if stage == "jepa" else GeneratorObjective(model)
    if distributed:
        trained = DistributedDataParallel(trained, device_ids=[device.index] if device.type == "cuda" else None)
    start_step = step
    budget_s = config.time_budget_min * 60
    global_batch = config.batch_size * config.grad_accum * world_size
    log_file = open(out_dir / "log.jsonl", "a") if master else None
    if master:
        n_params = sum(p.numel() for p in trained_parameters(model))
        print(f"stage {stage}: {n_params / 1e6:.2f} M trained parameters, {world_size} process(es) on {device}, "
              f"{global_batch} sequences of <= {config.ctx_len} tokens per step")

    def log(record: dict) -> None:
        if master:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def checkpoint_state() -> dict:
        return {"format": CHECKPOINT_FORMAT, "stage": stage, "model_config": model_config.to_dict(),
                "train_config": config.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "step": step, "examples_seen": examples_seen, "elapsed_s": elapsed_s, "best_dev": best_dev,
                "world_size": world_size, "rng": rng_states(), "tokenizer": tokenizer}

    # All ranks must agree on the elapsed time, or they would stop at different steps.
    def shared_elapsed(seconds: float) -> float:
        value = torch.tensor([seconds], dtype=torch.float64, device=device)
        if distributed:
            dist.broadcast(value, 0)
        return float(value)

    started_at = time.time() - elapsed_s
    while True:
        elapsed_s = shared_elapsed(time.time() - started_at)
        paused = args.pause_at_step is not None and step >= args.pause_at_step
        done = paused or step >= config.max_steps or (budget_s > 0 and elapsed_s >= budget_s)
        if step > start_step and (step % config.eval_interval == 0 or done):
            metrics = evaluate(stage, model, frozen_jepa, dev_data, config.dev_examples, config.batch_size,
                               rank, world_size, device, autocast)
            score = metrics.get("dev_nll_bits", -step)  # stage 1: the latest is the best
            improved = score < best_dev
            best_dev = min(best_dev, score)
            log({"step": step, **metrics, "wall_s": round(elapsed_s, 1)})
            if master:
                state = checkpoint_state()
                save_atomically(state, out_dir / "last.pt")
                if improved:
                    save_atomically(state, out_dir / "best.pt")
                print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if done:
            break

        # Schedules span max_steps, or under a time budget the steps that fit into it.
        horizon = config.max_steps
        if budget_s > 0 and step > start_step:
            horizon = min(config.max_steps, max(step + 1, round(step * budget_s / elapsed_s)))
        lr = lr_at(step, horizon, config)
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_started = time.time()
        micro_batches = [train_data.batch(micro_batch_indices(examples_seen, micro_step, rank, world_size,
                                                              config.batch_size)).to(device)
                         for micro_step in range(config.grad_accum)]
        loss_sum, grad_norm = train_step(stage, trained, model, optimizer, micro_batches, frozen_jepa, autocast,
                                         config.grad_clip, distributed)
        if stage == "jepa":
            model.update_target(ema_momentum(step, horizon))
        step += 1
        examples_seen += global_batch

        if step % config.log_interval == 0 or step == config.max_steps:
            if distributed:
                dist.all_reduce(loss_sum)
                loss_sum[0] /= world_size
            step_s = time.time() - step_started
            log({"step": step, "loss": round(float(loss_sum[0]), 6), "lr": lr, "grad_norm": round(float(grad_norm), 4),
                 "tokens_per_s": round(float(loss_sum[1]) / step_s, 1), "wall_s": round(time.time() - started_at, 1)})
    if master:
        log_file.close()
    if distributed:
        # Every rank reaches teardown before any leaves: a rank that destroys the group
        # while another still writes its checkpoint can abort in gloo's shutdown.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
