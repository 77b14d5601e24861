"""The checkpoints of training.train: what marks one, and reading them back, shared by the trainer
(which resumes from them and reads a stage-1 JEPA for stage 2) and export.checkpoint (which makes
bundles from them). The data flow runs training -> export, so export imports this and not the reverse.

A checkpoint is a dict loadable with torch.load(weights_only=True): {"format": CHECKPOINT_FORMAT,
"stage": "jepa" | "generator", "model_config", "train_config", "model": state dict, "optimizer",
"step", "examples_seen", "elapsed_s", "best_dev", "world_size", "rng", "tokenizer"}.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cmi_daemon.inference.bundle import JEPA_WEIGHTS, MANIFEST_NAME, BundleError, fp32_weights, load_bundle
from cmi_daemon.model.config import ModelConfig

CHECKPOINT_FORMAT = "cmi-train-1"
TRAINING_SUMMARY_KEYS = ("stage", "step", "examples_seen", "elapsed_s", "best_dev", "train_config", "tokenizer")
"""`tokenizer`: how the training shards were tokenized (training.data.batches.shard_tokenizer)."""


class CheckpointError(Exception):
    """A checkpoint cannot be read or exported; the message says which file and why."""


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"{path}: no such checkpoint") from error
    except Exception as error:  # torch reports unpicklable or corrupt files with many types
        raise CheckpointError(f"{path}: not a weights-only torch checkpoint ({error})") from error


def training_summary(checkpoint: dict) -> dict:
    return {key: checkpoint[key] for key in TRAINING_SUMMARY_KEYS if key in checkpoint}


def read_jepa(location) -> tuple[dict, ModelConfig, dict]:
    """(JEPA state dict in fp32, the model config it was built with, training summary) from a
    stage-1 output folder (its best.pt), a stage-1 checkpoint file or a model bundle folder."""
    location = Path(location)
    if (location / MANIFEST_NAME).is_file():
        try:
            bundle = load_bundle(location)
        except BundleError as error:
            raise CheckpointError(str(error)) from error
        if not bundle.conditioned:
            raise CheckpointError(f"{location}: an unconditioned bundle has no JEPA")
        return fp32_weights(bundle, JEPA_WEIGHTS), bundle.model_config, {
            "bundle": str(location), **(bundle.training or {}).get("jepa", {}),
            "tokenizer": {"steps_per_qn": bundle.tokenizer.steps_per_qn, "role_bins": bundle.tokenizer.role_bins}}
    path = location / "best.pt" if location.is_dir() else location
    if location.is_dir() and not path.exists():
        raise CheckpointError(f"{location}: no best.pt and no {MANIFEST_NAME}: neither a stage-1 output folder "
                              "nor a model bundle (run stage 1 first: --stage jepa --out DIR)")
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict) or checkpoint.get("stage") != "jepa":
        raise CheckpointError(f"{path}: not a stage-1 (jepa) checkpoint")
    return checkpoint["model"], ModelConfig.from_dict(checkpoint["model_config"]), training_summary(checkpoint)
