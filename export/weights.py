"""Store every weight once, as fp16, shared by torch and ONNX Runtime.

The safetensors files are the only copy of the weights. An ONNX graph's weight initializers are
rewritten as fp16 external data pointing into them (ONNX external data: the file name relative
to the graph, the byte offset and the byte length of the raw little-endian tensor), each
followed by a Cast to float32, so the graph still computes in fp32; ONNX Runtime folds the
Casts into fp32 constants when it creates a session with graph optimisations on.

A safetensors file is an 8-byte little-endian header length, a JSON header giving each
tensor's dtype, shape and data_offsets (relative to the end of the header), then the raw
little-endian bytes; a tensor's offset in the file is 8 + header length + data_offsets[0].
ONNX Runtime reads external data at any offset (checked with odd offsets), so the layout
safetensors chooses needs no padding.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import onnx
import torch
from onnx import TensorProto, helper
from safetensors.torch import save_file

from cmi_daemon.inference.bundle import WEIGHTS_DTYPE

STORAGE_DTYPE = getattr(torch, WEIGHTS_DTYPE)
SAFETENSORS_ONNX_TYPES = {"F16": TensorProto.FLOAT16}
"""Stored dtypes a graph may read through a Cast to float32."""
_HEADER_LENGTH_BYTES = 8
FP16_INITIALIZER_SUFFIX = "::fp16"
"""Appended to a weight's name for its fp16 initializer; the Cast's float32 output keeps the name."""


class WeightLinkError(Exception):
    """A graph's float initializer has no stored fp16 tensor of the same name and shape."""


@dataclass(frozen=True)
class StoredTensor:
    dtype: str
    """safetensors dtype code, e.g. F16."""
    shape: tuple[int, ...]
    offset_bytes: int
    """From the start of the file."""
    length_bytes: int


def save_weights(state_dict: dict, path: Path) -> None:
    """A state dict as safetensors, floating-point tensors stored as fp16."""
    tensors = {name: (tensor.detach().to(STORAGE_DTYPE) if tensor.is_floating_point() else tensor.detach())
               for name, tensor in state_dict.items()}
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(path),
              metadata={"weights_dtype": WEIGHTS_DTYPE})


def stored_tensors(path: Path) -> dict[str, StoredTensor]:
    """Where each tensor of a safetensors file lies in it, read from the header."""
    with open(path, "rb") as file:
        (header_bytes,) = struct.unpack("<Q", file.read(_HEADER_LENGTH_BYTES))
        header = json.loads(file.read(header_bytes))
    data_start = _HEADER_LENGTH_BYTES + header_bytes
    return {name: StoredTensor(entry["dtype"], tuple(entry["shape"]), data_start + entry["data_offsets"][0],
                               entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"}


def _external_initializer(name: str, stored: StoredTensor, location: str) -> TensorProto:
    tensor = TensorProto(name=name, data_type=SAFETENSORS_ONNX_TYPES[stored.dtype], dims=stored.shape,
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", stored.offset_bytes), ("length", stored.length_bytes)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    return tensor


def link_graph_to_weights(graph_path: Path, weights_path: Path, held: dict[str, list[str]]
                          ) -> dict[str, Union[str, list[str], None]]:
    """Replace every float initializer of the graph by fp16 external data + Cast to float32.

    held is export.graphs.initializer_weights of the graph: the initializer `name` reads the tensor
    held[name][0] of weights_path, which must sit in the same folder; a float initializer with no
    such tensor is a WeightLinkError (the graph would carry a weight of its own). The graph file is
    rewritten in place. Returns the manifest's map of the linked graph (inference.bundle
    GRAPH_WEIGHTS_FIELD): initializer name -> the key it holds, the list of keys when it holds
    several, None when it holds none."""
    model = onnx.load(str(graph_path))
    stored = stored_tensors(weights_path)
    kept, linked, casts = [], [], []
    weight_map: dict[str, Union[str, list[str], None]] = {}
    for initializer in model.graph.initializer:
        name = initializer.name
        if initializer.data_type != TensorProto.FLOAT:
            kept.append(initializer)
            weight_map[name] = None
            continue
        keys = held.get(name, [])
        tensor = stored.get(keys[0]) if keys else None
        if tensor is None or tuple(initializer.dims) != tensor.shape or tensor.dtype not in SAFETENSORS_ONNX_TYPES:
            found = "holds no traced weight" if not keys else f"{keys[0]} " + (
                "absent" if tensor is None else f"{tensor.dtype} {tensor.shape}")
            raise WeightLinkError(f"{graph_path.name}: initializer {name} {tuple(initializer.dims)} has no stored "
                                  f"tensor in {weights_path.name} ({found})")
        linked.append(_external_initializer(name + FP16_INITIALIZER_SUFFIX, tensor, weights_path.name))
        casts.append(helper.make_node("Cast", [name + FP16_INITIALIZER_SUFFIX], [name], to=TensorProto.FLOAT,
                                      name=f"cast_{name}"))
        weight_map[name + FP16_INITIALIZER_SUFFIX] = keys[0] if len(keys) == 1 else list(keys)
    nodes = casts + list(model.graph.node)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + linked)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    graph_path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(graph_path))
    return weight_map
