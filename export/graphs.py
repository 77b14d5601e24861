"""The torch modules exported to ONNX: context encoder, predictor (with the mean over the blank),
generator prefill (a fixed-length chunk of prompt) and generator step. The generator graphs take
the head rows to compute as an input, so the engine multiplies only the rows it may sample (the
target bins' notes, waits and `<ans>`: about 1,700 of 20,099 rows for one bin); passing the
whole head gives the full logits.

Graph inputs and outputs (B is dynamic everywhere; N, Nc, Nt are dynamic token counts):
- context_encoder: token_ids (B, Nc) int64, positions (B, Nc) int64, valid (B, Nc) bool
  -> representations (B, Nc, E)
- predictor: context_repr (B, Nc, E), context_positions, context_valid, target_positions (B, Nt),
  target_valid (B, Nt) -> cond (B, E), the mean prediction over the valid targets
- generator_prefill: token_ids (B, PREFILL_CHUNK_TOKENS) int64, state (n_layer, 5, B, C), head_rows (R, C),
  [cond (B, E)] -> logits (B, R) after the chunk's last token, new_state
- generator_step: token_ids (B,) int64, state, head_rows, [cond] -> logits (B, R), new_state
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from cmi_daemon.bundle import PREFILL_CHUNK_TOKENS
from cmi_daemon.model.jepa import ContextEncoder, Predictor, conditioning_vector
from cmi_daemon.model.rwkv import WKV_CHUNK_LEN, RWKVGenerator

ONNX_OPSET = 17


def generator_hidden(generator: RWKVGenerator, token_ids, state, cond):
    """(ln_out output, new state) for token_ids (B,) or (B, T): the generator without its head."""
    x = generator.embed(token_ids, cond)
    new_states = []
    for layer_id, block in enumerate(generator.blocks):
        x, layer_state = block(x, state[layer_id], WKV_CHUNK_LEN)
        new_states.append(layer_state)
    return generator.ln_out(x), torch.stack(new_states)


class StepGraph(nn.Module):
    def __init__(self, generator: RWKVGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, token_ids, state, head_rows, cond=None):
        hidden, new_state = generator_hidden(self.generator, token_ids, state, cond)
        return hidden @ head_rows.T, new_state


class PrefillGraph(nn.Module):
    def __init__(self, generator: RWKVGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, token_ids, state, head_rows, cond=None):
        hidden, new_state = generator_hidden(self.generator, token_ids, state, cond)
        return hidden[:, -1] @ head_rows.T, new_state


class PredictorGraph(nn.Module):
    def __init__(self, predictor: Predictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, context_repr, context_positions, context_valid, target_positions, target_valid):
        predicted = self.predictor(context_repr, context_positions, context_valid, target_positions, target_valid)
        return conditioning_vector(predicted, target_valid)


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    """Trace to ONNX; the tracer's warnings about shapes are expected (the chunk length is fixed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trace(module, args, path, input_names, output_names, dynamic_axes)


def _trace(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    torch.onnx.export(module.eval(), args, str(path), dynamo=False, input_names=list(input_names),
                      output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET)


def export_generator_graphs(generator: RWKVGenerator, prefill_path: Path, step_path: Path) -> None:
    config = generator.config
    state = generator.empty_state(2)
    cond = (torch.zeros(2, config.cond_in_dim),) if config.conditioned else ()
    cond_names = ("cond",) if config.conditioned else ()
    head_rows = generator.head.weight[:50]
    axes = {"state": {2: "batch"}, "new_state": {2: "batch"}, "logits": {0: "batch", 1: "n_rows"},
            "token_ids": {0: "batch"}, "head_rows": {0: "n_rows"}}
    if config.conditioned:
        axes["cond"] = {0: "batch"}
    names = ("token_ids", "state", "head_rows", *cond_names)
    with torch.no_grad():
        _export(StepGraph(generator), (torch.tensor([5, 300]), state, head_rows, *cond), step_path,
                names, ("logits", "new_state"), axes)
        prompt = torch.full((2, PREFILL_CHUNK_TOKENS), 300, dtype=torch.int64)
        _export(PrefillGraph(generator), (prompt, state, head_rows, *cond), prefill_path,
                names, ("logits", "new_state"), axes)


def export_jepa_graphs(encoder: ContextEncoder, predictor: Predictor, encoder_path: Path, predictor_path: Path) -> None:
    n_context, n_target, width = 7, 3, encoder.config.n_embd
    positions = torch.arange(n_context)[None]
    valid = torch.ones(1, n_context, dtype=torch.bool)
    with torch.no_grad():
        _export(encoder, (torch.full((1, n_context), 300), positions, valid), encoder_path,
                ("token_ids", "positions", "valid"), ("representations",),
                {"token_ids": {0: "batch", 1: "n_context"}, "positions": {0: "batch", 1: "n_context"},
                 "valid": {0: "batch", 1: "n_context"}, "representations": {0: "batch", 1: "n_context"}})
        target_positions = torch.arange(n_context, n_context + n_target)[None]
        target_valid = torch.ones(1, n_target, dtype=torch.bool)
        context_axes = {0: "batch", 1: "n_context"}
        target_axes = {0: "batch", 1: "n_target"}
        _export(PredictorGraph(predictor), (torch.zeros(1, n_context, width), positions, valid, target_positions,
                                            target_valid), predictor_path,
                ("context_repr", "context_positions", "context_valid", "target_positions", "target_valid"),
                ("cond",),
                {"context_repr": context_axes, "context_positions": context_axes, "context_valid": context_axes,
                 "target_positions": target_axes, "target_valid": target_axes, "cond": {0: "batch"}})
