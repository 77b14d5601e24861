"""Write a model bundle folder (format: cmi_daemon.bundle) from a checkpoint.

The folder is built under a temporary name next to the target and renamed into place when
complete, so a bundle folder is never half written; the manifest, with every file's sha256,
is written last.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from cmi_daemon import vocab
from cmi_daemon.bundle import (BUNDLE_FORMAT, CONTEXT_ENCODER_GRAPH, GENERATOR_WEIGHTS, JEPA_WEIGHTS,
                               MANIFEST_NAME, PREDICTOR_GRAPH, PREFILL_CHUNK_TOKENS, PREFILL_GRAPH, STEP_GRAPH,
                               bundle_files, sha256_of)
from cmi_daemon.model.config import ModelConfig
from cmi_daemon.model.jepa import JEPA
from cmi_daemon.model.rwkv import RWKVGenerator
from export.checkpoint import Checkpoint
from export.graphs import export_generator_graphs, export_jepa_graphs
from training.batches import ilm_window_tokens


def default_context_tokens(model_config: ModelConfig) -> int:
    """The window the generator was trained on (prefix + blank + suffix), within the encoder's positions."""
    tokens = ilm_window_tokens(model_config.generator.ctx_len)
    if model_config.generator.conditioned:
        tokens = min(tokens, model_config.encoder.max_len)
    return tokens


def build_models(checkpoint: Checkpoint) -> tuple[RWKVGenerator, Optional[JEPA]]:
    config = checkpoint.model_config
    generator = RWKVGenerator(config.generator)
    generator.load_state_dict(checkpoint.generator)
    jepa = None
    if config.generator.conditioned:
        jepa = JEPA(config.encoder, config.predictor)
        jepa.load_state_dict(checkpoint.jepa)
    return generator.eval(), (jepa.eval() if jepa is not None else None)


def _contiguous(state_dict: dict) -> dict:
    return {name: tensor.detach().float().contiguous() for name, tensor in state_dict.items()}


def write_bundle(checkpoint: Checkpoint, out_dir, context_tokens: Optional[int] = None,
                 data_summary: Optional[dict] = None, source: str = "") -> Path:
    """Export the checkpoint's networks into the bundle folder out_dir (replacing it)."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator, jepa = build_models(checkpoint)
    save_file(_contiguous(generator.state_dict()), str(staging / GENERATOR_WEIGHTS))
    export_generator_graphs(generator, staging / PREFILL_GRAPH, staging / STEP_GRAPH)
    if jepa is not None:
        save_file(_contiguous(jepa.state_dict()), str(staging / JEPA_WEIGHTS))
        export_jepa_graphs(jepa.context_encoder, jepa.predictor, staging / CONTEXT_ENCODER_GRAPH,
                           staging / PREDICTOR_GRAPH)
    conditioned = checkpoint.model_config.generator.conditioned
    training = dict(checkpoint.training)
    if data_summary:
        training["data"] = data_summary
    manifest = {
        "format": BUNDLE_FORMAT,
        "vocab_id": vocab.VOCAB_ID,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_checkpoint": source,
        "torch_version": torch.__version__,
        "model_config": checkpoint.model_config.to_dict(),
        "tokenizer": {"wait_step_ms": vocab.WAIT_STEP_MS,
                      "context_tokens": context_tokens or default_context_tokens(checkpoint.model_config),
                      "prefill_chunk_tokens": PREFILL_CHUNK_TOKENS},
        "training": training or None,
        "files": {name: sha256_of(staging / name) for name in bundle_files(conditioned)},
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir
