"""Read the checkpoints a bundle is made from: training.train's, or the simple documented dict.

The simple dict (what tests and hand-made models use), loadable with torch.load(weights_only=True):
    {"model_config": ModelConfig.to_dict(), "generator": RWKVGenerator state dict,
     "encoder": ContextEncoder state dict, "target_encoder": ContextEncoder state dict,
     "predictor": Predictor state dict, "training": optional dict copied into the manifest}
training.train writes the dict described in training.checkpoints ("format": CHECKPOINT_FORMAT); a
generator checkpoint is exported together with the stage-1 JEPA it was conditioned on (its
train_config's jepa_dir, or --jepa): a stage-1 output folder (its best.pt), a stage-1 checkpoint
file, or a model bundle (whose JEPA a new generator can be trained against:
`training.train --jepa cmi_daemon/models/default`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cmi_daemon.model.config import ModelConfig
from training.checkpoints import (CHECKPOINT_FORMAT, CheckpointError, load_checkpoint, read_jepa,
                                  training_summary)

SIMPLE_KEYS = ("model_config", "generator", "encoder", "target_encoder", "predictor")
SHARD_SUMMARY_KEYS = ("vocab_id", "tokenizer", "time_unit", "data_root", "git_commit", "seed",
                      "augmented_copies_per_train_file", "augmentation_choices", "left_out_files",
                      "sources", "splits")


@dataclass
class Checkpoint:
    model_config: ModelConfig
    generator: dict
    jepa: Optional[dict]
    """JEPA state dict (context_encoder.*, predictor.*, target_encoder.*); None when unconditioned."""
    training: dict


def read_checkpoint(path, jepa_path=None) -> Checkpoint:
    path = Path(path)
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(checkpoint).__name__}")
    if checkpoint.get("format") == CHECKPOINT_FORMAT:
        return _read_train_checkpoint(path, checkpoint, jepa_path)
    missing = [key for key in SIMPLE_KEYS if key not in checkpoint]
    model_config = ModelConfig.from_dict(checkpoint["model_config"]) if "model_config" in checkpoint else None
    if model_config is not None and not model_config.generator.conditioned:
        missing = [key for key in missing if key == "generator"]
    if missing:
        raise CheckpointError(f"{path}: neither a {CHECKPOINT_FORMAT} checkpoint nor the simple dict "
                              f"(missing {', '.join(missing)})")
    jepa = None
    if model_config.generator.conditioned:
        jepa = {f"{part}.{name}": tensor for part, key in (("context_encoder", "encoder"),
                                                           ("target_encoder", "target_encoder"),
                                                           ("predictor", "predictor"))
                for name, tensor in checkpoint[key].items()}
    return Checkpoint(model_config, checkpoint["generator"], jepa, dict(checkpoint.get("training", {})))


def _read_train_checkpoint(path: Path, checkpoint: dict, jepa_path) -> Checkpoint:
    if checkpoint["stage"] != "generator":
        raise CheckpointError(f"{path} is a stage-1 ({checkpoint['stage']}) checkpoint: export the stage-2 "
                              "generator checkpoint, with --jepa pointing at this one")
    model_config = ModelConfig.from_dict(checkpoint["model_config"])
    training = training_summary(checkpoint)
    jepa = None
    if model_config.generator.conditioned:
        if jepa_path is None:
            jepa_path = checkpoint.get("train_config", {}).get("jepa_dir")
            if not jepa_path:
                raise CheckpointError(f"{path}: conditioned generator without a JEPA; pass --jepa JEPA_CHECKPOINT")
        jepa, _, training["jepa"] = read_jepa(jepa_path)
    return Checkpoint(model_config, checkpoint["model"], jepa, training)


def shard_summary(shard_dir) -> dict:
    """What the training data was, from training.data.prepare's manifest.json."""
    manifest_path = Path(shard_dir) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{manifest_path}: cannot read the shard manifest ({error})") from error
    return {key: manifest[key] for key in SHARD_SUMMARY_KEYS if key in manifest}
