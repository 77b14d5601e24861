"""A tiny-preset model with random weights, exported once per test session to a bundle folder."""

from __future__ import annotations

from pathlib import Path

import torch

from cmi_daemon.model.config import preset
from cmi_daemon.model.jepa import JEPA
from cmi_daemon.model.rwkv import RWKVGenerator
from export.bundle import write_bundle
from export.checkpoint import read_checkpoint

_BUNDLES: dict[bool, Path] = {}


def randomized(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Noise on every parameter: the fresh init leaves matrices at zero that the graphs must exercise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module


def tiny_checkpoint(path: Path, conditioned: bool = True, seed: int = 0) -> Path:
    """The simple checkpoint dict (export.checkpoint) of a random tiny model."""
    config = preset("tiny")
    config.generator.conditioned = conditioned
    generator = randomized(RWKVGenerator(config.generator), seed)
    if conditioned:  # a standardisation far from the identity, so the graphs must apply it
        sample = torch.Generator().manual_seed(seed + 2)
        generator.standardize_conditioning(0.5 + 0.2 * torch.randn(64, config.generator.cond_in_dim, generator=sample))
    jepa = randomized(JEPA(config.encoder, config.predictor), seed + 1)
    torch.save({"model_config": config.to_dict(), "generator": generator.state_dict(),
                "encoder": jepa.context_encoder.state_dict(), "target_encoder": jepa.target_encoder.state_dict(),
                "predictor": jepa.predictor.state_dict(), "training": {"note": "random weights for tests"}}, path)
    return path


def tiny_bundle_dir(tmp_path_factory, conditioned: bool = True) -> Path:
    """The session's bundle of the random tiny model (exported on first use)."""
    if conditioned not in _BUNDLES:
        folder = tmp_path_factory.mktemp("bundle")
        checkpoint = read_checkpoint(tiny_checkpoint(folder / "tiny.pt", conditioned))
        _BUNDLES[conditioned] = write_bundle(checkpoint, folder / "tiny", source="tiny.pt")
    return _BUNDLES[conditioned]
