"""The one place that picks the torch device: CUDA, then Apple MPS, then CPU."""

from __future__ import annotations

import torch


def choose_device() -> torch.device:
    """Best available device. On CPU, denormal floats are flushed to zero: RWKV's decaying
    state produces many, and they slow CPU decoding by about an order of magnitude."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    torch.set_flush_denormal(True)
    return torch.device("cpu")
