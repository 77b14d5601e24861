"""Turn a training checkpoint into a model bundle the daemon loads (see cmi_daemon.inference.bundle): the
weights stored once as fp16 safetensors, and ONNX graphs that read them from there.

    python -m export CHECKPOINT --out DIR [--jepa JEPA_CHECKPOINT] [--shards SHARD_DIR]
"""
