"""Write a model bundle folder (format: cmi_daemon.inference.bundle) from a checkpoint.

The weights are written once, as fp16 safetensors (export.weights); the ONNX graphs are traced
from the models holding those fp16-rounded weights in fp32, then their initializers are pointed
into the safetensors files, so torch and ONNX Runtime compute with the same numbers.

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

from cmi_daemon.music import vocab
from cmi_daemon.inference.bundle import (BUNDLE_FORMAT, CONTEXT_ENCODER_GRAPH, GENERATOR_WEIGHTS,
                                         GRAPH_WEIGHTS_FIELD, JEPA_WEIGHTS, MANIFEST_NAME, PREDICTOR_GRAPH,
                                         PREFILL_CHUNK_TOKENS, PREFILL_GRAPH, STEP_GRAPH, WEIGHTS_DTYPE,
                                         bundle_files, sha256_of)
from cmi_daemon.model.config import ModelConfig
from cmi_daemon.model.jepa import JEPA
from cmi_daemon.model.rwkv import RWKVGenerator
from export.checkpoint import Checkpoint
from export.graphs import export_generator_graphs, export_jepa_graphs
from export.weights import STORAGE_DTYPE, link_graph_to_weights, save_weights
from training.data.batches import ilm_window_tokens


GRAPH_WEIGHT_FILES = {
    PREFILL_GRAPH: GENERATOR_WEIGHTS,
    STEP_GRAPH: GENERATOR_WEIGHTS,
    CONTEXT_ENCODER_GRAPH: JEPA_WEIGHTS,
    PREDICTOR_GRAPH: JEPA_WEIGHTS,
}
"""Graph -> the safetensors file holding its weights."""


def default_context_tokens(model_config: ModelConfig) -> int:
    """The window the generator was trained on (prefix + blank + suffix), within the encoder's positions."""
    tokens = ilm_window_tokens(model_config.generator.ctx_len)
    if model_config.generator.conditioned:
        tokens = min(tokens, model_config.encoder.max_len)
    return tokens


def stored_precision(state_dict: dict) -> dict:
    """The state dict as the bundle stores it: floating-point tensors rounded to fp16, held in fp32."""
    return {name: tensor.detach().to(STORAGE_DTYPE).float() if tensor.is_floating_point() else tensor.detach()
            for name, tensor in state_dict.items()}


def build_models(checkpoint: Checkpoint) -> tuple[RWKVGenerator, Optional[JEPA]]:
    """The checkpoint's networks in eval mode, with their weights rounded to the bundle's fp16."""
    config = checkpoint.model_config
    generator = RWKVGenerator(config.generator)
    generator.load_state_dict(stored_precision(checkpoint.generator))
    jepa = None
    if config.generator.conditioned:
        jepa = JEPA(config.encoder, config.predictor)
        jepa.load_state_dict(stored_precision(checkpoint.jepa))
    return generator.eval(), (jepa.eval() if jepa is not None else None)


def write_bundle(checkpoint: Checkpoint, out_dir, context_tokens: Optional[int] = None,
                 data_summary: Optional[dict] = None, source: str = "") -> Path:
    """Export the checkpoint's networks into the bundle folder out_dir (replacing it)."""
    out_dir = Path(out_dir)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    generator, jepa = build_models(checkpoint)
    save_weights(generator.state_dict(), staging / GENERATOR_WEIGHTS)
    held = export_generator_graphs(generator, staging / PREFILL_GRAPH, staging / STEP_GRAPH)
    if jepa is not None:
        save_weights(jepa.state_dict(), staging / JEPA_WEIGHTS)
        held.update(export_jepa_graphs(jepa, staging / CONTEXT_ENCODER_GRAPH, staging / PREDICTOR_GRAPH))
    conditioned = checkpoint.model_config.generator.conditioned
    graph_weights = {graph: link_graph_to_weights(staging / graph, staging / GRAPH_WEIGHT_FILES[graph], held[graph])
                     for graph in bundle_files(conditioned) if graph in GRAPH_WEIGHT_FILES}
    training = dict(checkpoint.training)
    trained_tokenizer = training.get("tokenizer") or (data_summary or {}).get("tokenizer") or {}
    if data_summary:
        training["data"] = data_summary
    manifest = {
        "format": BUNDLE_FORMAT,
        "vocab_id": vocab.VOCAB_ID,
        "weights_dtype": WEIGHTS_DTYPE,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source_checkpoint": source,
        "torch_version": torch.__version__,
        "model_config": checkpoint.model_config.to_dict(),
        "tokenizer": {"wait_step_ms": vocab.WAIT_STEP_MS,
                      "context_tokens": context_tokens or default_context_tokens(checkpoint.model_config),
                      "prefill_chunk_tokens": PREFILL_CHUNK_TOKENS,
                      "role_bins": bool(trained_tokenizer.get("role_bins", False)),
                      "steps_per_qn": trained_tokenizer.get("steps_per_qn")},
        "training": training or None,
        GRAPH_WEIGHTS_FIELD: graph_weights,
        "files": {name: sha256_of(staging / name) for name in bundle_files(conditioned)},
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir
