"""Torch networks of CMI: RWKV-4 generator, context/target encoder and predictor (JEPA)."""
