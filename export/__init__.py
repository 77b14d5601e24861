"""Turn a training checkpoint into a model bundle the daemon loads (see cmi_daemon.bundle).

    python -m export CHECKPOINT --out DIR [--jepa JEPA_CHECKPOINT] [--shards SHARD_DIR]
"""
