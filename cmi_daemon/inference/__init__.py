"""Running a model bundle: loading, ONNX sessions and devices, constrained sampling, controls."""
