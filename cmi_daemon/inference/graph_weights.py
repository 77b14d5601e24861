"""The weight initializers of an ONNX graph file, read without the onnx package.

ONNX files are protocol buffers: ModelProto.graph (field 7) holds GraphProto.initializer
(field 5) entries, TensorProto messages with data_type (field 2) and name (field 8). Only those
fields are decoded; everything else is skipped by its wire type. The daemon needs the names to
replace a graph's weights with a profile's (SessionOptions.add_initializer ignores a name the
graph does not have, so guessing names would fail silently).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

MODEL_GRAPH_FIELD = 7
GRAPH_INITIALIZER_FIELD = 5
TENSOR_DATA_TYPE_FIELD = 2
TENSOR_NAME_FIELD = 8
FLOAT_DATA_TYPES = {1: np.dtype(np.float32), 10: np.dtype(np.float16)}
"""ONNX TensorProto.DataType codes of the weights a profile may replace -> numpy dtypes."""


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of one message: ints for varints, bytes otherwise."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = _varint(data, at)
        elif wire_type == 1:
            value, at = data[at:at + 8], at + 8
        elif wire_type == 2:
            length, at = _varint(data, at)
            value, at = data[at:at + length], at + length
        elif wire_type == 5:
            value, at = data[at:at + 4], at + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        yield number, wire_type, value


def float_initializers(graph_path: Path) -> dict[str, np.dtype]:
    """Name -> numpy dtype of every fp32 or fp16 initializer of the ONNX graph file."""
    found = {}
    for number, _, graph in fields(Path(graph_path).read_bytes()):
        if number != MODEL_GRAPH_FIELD:
            continue
        for graph_number, _, tensor in fields(graph):
            if graph_number != GRAPH_INITIALIZER_FIELD:
                continue
            data_type, name = None, None
            for tensor_number, _, value in fields(tensor):
                if tensor_number == TENSOR_DATA_TYPE_FIELD:
                    data_type = value
                elif tensor_number == TENSOR_NAME_FIELD:
                    name = value.decode("utf-8")
            if name is not None and data_type in FLOAT_DATA_TYPES:
                found[name] = FLOAT_DATA_TYPES[data_type]
    return found
