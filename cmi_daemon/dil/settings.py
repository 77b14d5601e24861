"""DIL's settings (the config file's [dil] section), without importing torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

MARGIN = 0.1
"""alpha of eq. 2 and 3 (the paper's value)."""
LOSS_VARIANTS = ("cosine", "distance")
"""`cosine`: the paper's margin on cosine similarities; `distance`: the authors' code (losses.LOSSES)."""


@dataclass(frozen=True)
class DILSettings:
    enabled: bool = True
    """False: the daemon learns nothing and serves the base model to every profile."""
    steps_per_signal: int = 2
    """AdamW steps per interaction signal."""
    lr: float = 1e-4
    margin: float = MARGIN
    ema_momentum: float = 0.996
    loss: str = "cosine"
    """One of LOSS_VARIANTS."""
    weight_decay: float = 0.0
    """0: decay would pull the weights towards zero, not towards the base model."""

    def __post_init__(self):
        if self.loss not in LOSS_VARIANTS:
            raise ValueError(f"DIL loss {self.loss!r}: choose one of {', '.join(LOSS_VARIANTS)}")
        if not 1 <= self.steps_per_signal <= 16:
            raise ValueError(f"{self.steps_per_signal} DIL steps per signal: choose 1..16")
        if not 0 < self.lr <= 1e-2:
            raise ValueError(f"DIL lr {self.lr}: choose a value in (0, 0.01]")
        if not 0 <= self.margin <= 2 or not 0 <= self.ema_momentum <= 1 or self.weight_decay < 0:
            raise ValueError("DIL margin must be in 0..2, ema_momentum in 0..1, weight_decay not negative")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)
