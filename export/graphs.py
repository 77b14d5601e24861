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

The graphs are traced without constant folding, so every weight stays an initializer named
after its parameter; initializer_weights records which state-dict keys each one holds (from the
traced module's own tensors), export.weights then points it into the safetensors files, and nothing
derived from a weight (a transpose, -exp(time_decay)) is baked into a graph; ONNX Runtime
folds those at session creation. The encoder's and predictor's sinusoidal position tables are
computed in the graph too (Range, Mul, Sin, Cos), instead of being stored as a constant of
max_len x width floats. The encoder and predictor are traced with their attention computed one
head at a time (model.jepa.attention_one_head_at_a_time), so ONNX Runtime holds one head's
(B, N, N) scores at a time, not all heads' at once.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from cmi_daemon.inference.bundle import PREFILL_CHUNK_TOKENS
from cmi_daemon.model.jepa import JEPA, Predictor, SelfAttention, conditioning_vector, sinusoid_table
from cmi_daemon.model.rwkv import RWKVGenerator

ONNX_OPSET = 17
ONNX_IR_VERSION = 8
"""Of the position-table graph run at export (onnx's default IR version is newer than ONNX Runtime reads)."""
POSITION_TABLE_TOLERANCE = 1e-6


class StepGraph(nn.Module):
    def __init__(self, generator: RWKVGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, token_ids, state, head_rows, cond=None):
        hidden, new_state = self.generator.hidden(token_ids, state, cond)
        return hidden @ head_rows.T, new_state


class PrefillGraph(nn.Module):
    def __init__(self, generator: RWKVGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, token_ids, state, head_rows, cond=None):
        hidden, new_state = self.generator.hidden(token_ids, state, cond)
        return hidden[:, -1] @ head_rows.T, new_state


class PredictorGraph(nn.Module):
    def __init__(self, predictor: Predictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, context_repr, context_positions, context_valid, target_positions, target_valid):
        predicted = self.predictor(context_repr, context_positions, context_valid, target_positions, target_valid)
        return conditioning_vector(predicted, target_valid)


@contextmanager
def heads_one_at_a_time(*modules: nn.Module):
    """The modules' SelfAttention layers attend one head at a time inside the block."""
    layers = [layer for module in modules for layer in module.modules() if isinstance(layer, SelfAttention)]
    for layer in layers:
        layer.one_head_at_a_time = True
    try:
        yield
    finally:
        for layer in layers:
            layer.one_head_at_a_time = False


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    """Trace to ONNX; the tracer's warnings about shapes are expected (the chunk length is fixed)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trace(module, args, path, input_names, output_names, dynamic_axes)


def _trace(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_axes) -> None:
    torch.onnx.export(module.eval(), args, str(path), dynamo=False, input_names=list(input_names),
                      output_names=list(output_names), dynamic_axes=dynamic_axes, opset_version=ONNX_OPSET,
                      do_constant_folding=False)


def _position_table_nodes(table_name: str, max_len: int, width: int) -> list[onnx.NodeProto]:
    """Nodes computing model.jepa.sinusoid_table(max_len, width) into table_name.

    The width / 2 frequencies are a constant taken from that table's torch computation (exp of
    ONNX Runtime and of torch may differ by an ulp, which position 4,000 turns into 2e-4), the
    angles are the same fp32 products as in torch, and Sin and Cos run in fp64 so the table
    matches torch's to an ulp."""
    prefix = table_name + "/"
    frequency = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))

    def constant(name: str, value) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [prefix + name],
                                value=numpy_helper.from_array(np.asarray(value), prefix + name))

    def node(op: str, inputs, output: str, **attributes) -> onnx.NodeProto:
        return helper.make_node(op, [prefix + name for name in inputs], [prefix + output], **attributes)

    return [
        constant("zero", np.float32(0)), constant("one", np.float32(1)), constant("max_len", np.float32(max_len)),
        constant("frequency", frequency.numpy()),
        constant("column_axis", np.array([1], dtype=np.int64)), constant("pair_axis", np.array([2], dtype=np.int64)),
        constant("shape", np.array([max_len, width], dtype=np.int64)),
        node("Range", ["zero", "max_len", "one"], "positions"),
        node("Unsqueeze", ["positions", "column_axis"], "position_column"),
        node("Mul", ["position_column", "frequency"], "angle"),
        node("Cast", ["angle"], "angle_fp64", to=TensorProto.DOUBLE),
        node("Sin", ["angle_fp64"], "sin_fp64"), node("Cos", ["angle_fp64"], "cos_fp64"),
        node("Unsqueeze", ["sin_fp64", "pair_axis"], "sin_pairs"),
        node("Unsqueeze", ["cos_fp64", "pair_axis"], "cos_pairs"),
        node("Concat", ["sin_pairs", "cos_pairs"], "pairs", axis=2),
        node("Cast", ["pairs"], "pairs_fp32", to=TensorProto.FLOAT),
        helper.make_node("Reshape", [prefix + "pairs_fp32", prefix + "shape"], [table_name]),
    ]


def _run_nodes(nodes: list[onnx.NodeProto], output: str, shape: tuple[int, ...]) -> np.ndarray:
    graph = helper.make_graph(nodes, "check", [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], ir_version=ONNX_IR_VERSION)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {})[0]


def compute_position_tables(path: Path, max_len: int, width: int) -> None:
    """Replace the traced constant sinusoid_table(max_len, width) of the graph at path by nodes computing it."""
    model = onnx.load(str(path))
    table = sinusoid_table(max_len, width).numpy()
    nodes, replaced = [], 0
    for node in model.graph.node:
        value = node.attribute[0].t if node.op_type == "Constant" and node.attribute[0].name == "value" else None
        if value is not None and tuple(value.dims) == table.shape and value.data_type == TensorProto.FLOAT \
                and np.array_equal(numpy_helper.to_array(value), table):
            nodes.extend(_position_table_nodes(node.output[0], max_len, width))
            replaced += 1
        else:
            nodes.append(node)
    if replaced != 1:
        raise ValueError(f"{path.name}: expected one position table of {max_len} x {width}, found {replaced}")
    computed = _run_nodes(_position_table_nodes("table", max_len, width), "table", table.shape)
    error = float(np.abs(computed - table).max())
    if error > POSITION_TABLE_TOLERANCE:
        raise ValueError(f"{path.name}: the computed position table differs from torch's by {error:.2e}")
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))


def initializer_weights(graph_path: Path, traced: nn.Module, owner: nn.Module) -> dict[str, list[str]]:
    """Initializer name -> the owner's state-dict keys of the weights it holds, in the graph just traced
    from `traced` (a module whose tensors are owner's, e.g. its submodule or a wrapper of it).

    torch.onnx names a weight's initializer after the traced module's state-dict entry, so each is
    found by the tensor itself. In eval mode the exporter also merges weights of equal value into the
    first one's initializer (fresh LayerNorms, all ones), which then holds several keys; a traced
    weight that is neither in the graph nor equal to one that is was not used. Initializers that are
    no traced weight (constants) are not listed."""
    owner_keys = {id(tensor): key for key, tensor in owner.state_dict(keep_vars=True).items()}
    traced_state = traced.state_dict(keep_vars=True)
    names = [initializer.name for initializer in onnx.load(str(graph_path)).graph.initializer]
    held = {name: [owner_keys[id(traced_state[name])]] for name in names if name in traced_state}
    for name, tensor in traced_state.items():
        if name in held:
            continue
        for kept, keys in held.items():
            if traced_state[kept].shape == tensor.shape and torch.equal(traced_state[kept], tensor):
                keys.append(owner_keys[id(tensor)])
                break
    return held


def export_generator_graphs(generator: RWKVGenerator, prefill_path: Path, step_path: Path
                            ) -> dict[str, dict[str, list[str]]]:
    """Trace the step and prefill graphs; returns graph file name -> initializer_weights (generator keys)."""
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
    step, prefill = StepGraph(generator), PrefillGraph(generator)
    with torch.no_grad():
        _export(step, (torch.tensor([5, 300]), state, head_rows, *cond), step_path,
                names, ("logits", "new_state"), axes)
        prompt = torch.full((2, PREFILL_CHUNK_TOKENS), 300, dtype=torch.int64)
        _export(prefill, (prompt, state, head_rows, *cond), prefill_path,
                names, ("logits", "new_state"), axes)
    return {step_path.name: initializer_weights(step_path, step, generator),
            prefill_path.name: initializer_weights(prefill_path, prefill, generator)}


def export_jepa_graphs(jepa: JEPA, encoder_path: Path, predictor_path: Path) -> dict[str, dict[str, list[str]]]:
    """Trace the JEPA's context encoder and predictor graphs; returns graph file name ->
    initializer_weights (JEPA keys)."""
    encoder, predictor = jepa.context_encoder, PredictorGraph(jepa.predictor)
    n_context, n_target, width = 7, 3, encoder.config.n_embd
    positions = torch.arange(n_context)[None]
    valid = torch.ones(1, n_context, dtype=torch.bool)
    with torch.no_grad(), heads_one_at_a_time(encoder, predictor):
        _export(encoder, (torch.full((1, n_context), 300), positions, valid), encoder_path,
                ("token_ids", "positions", "valid"), ("representations",),
                {"token_ids": {0: "batch", 1: "n_context"}, "positions": {0: "batch", 1: "n_context"},
                 "valid": {0: "batch", 1: "n_context"}, "representations": {0: "batch", 1: "n_context"}})
        compute_position_tables(encoder_path, *encoder.pos_table.shape)
        target_positions = torch.arange(n_context, n_context + n_target)[None]
        target_valid = torch.ones(1, n_target, dtype=torch.bool)
        context_axes = {0: "batch", 1: "n_context"}
        target_axes = {0: "batch", 1: "n_target"}
        _export(predictor, (torch.zeros(1, n_context, width), positions, valid, target_positions,
                            target_valid), predictor_path,
                ("context_repr", "context_positions", "context_valid", "target_positions", "target_valid"),
                ("cond",),
                {"context_repr": context_axes, "context_positions": context_axes, "context_valid": context_axes,
                 "target_positions": target_axes, "target_valid": target_axes, "cond": {0: "batch"}})
        compute_position_tables(predictor_path, *jepa.predictor.pos_table.shape)
    return {encoder_path.name: initializer_weights(encoder_path, encoder, jepa),
            predictor_path.name: initializer_weights(predictor_path, predictor, jepa)}
