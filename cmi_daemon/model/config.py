"""Sizes of the three networks (generator, context encoder, predictor) and named presets.

Configs are plain dataclasses that round-trip through dicts, so a model bundle can store them
as JSON next to the weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cmi_daemon.music.vocab import VOCAB_SIZE


@dataclass
class GeneratorConfig:
    """RWKV-4 generator: n_layer blocks of width n_embd; FFN hidden width is 4 * n_embd."""
    n_layer: int
    n_embd: int
    ctx_len: int
    """Longest training sequence in tokens (the recurrent mode itself has no limit)."""
    vocab_size: int = VOCAB_SIZE
    conditioned: bool = True
    """False is the paper's "w/o JEP-AGA" ablation: no conditioning input at all."""
    cond_in_dim: int = 512
    """Width of the conditioning vector: the encoder's (= predictor output's) width."""
    cond_dim: int = 32
    """Width the conditioning vector is projected to before concatenation (32 as the authors)."""


@dataclass
class EncoderConfig:
    """Context encoder (and its EMA copy, the target encoder): pre-LN Transformer."""
    n_layer: int
    n_embd: int
    n_head: int
    max_len: int
    """Largest position + 1 the sinusoidal position table covers, in tokens."""
    vocab_size: int = VOCAB_SIZE
    ffn_ratio: int = 4


@dataclass
class PredictorConfig:
    """Predictor: pre-LN Transformer of its own width between projections from/to the encoder's."""
    n_layer: int
    n_embd: int
    n_head: int
    ffn_ratio: int = 4


@dataclass
class ModelConfig:
    """The three networks of one model; the predictor's output width is the encoder's."""
    generator: GeneratorConfig
    encoder: EncoderConfig
    predictor: PredictorConfig

    def __post_init__(self):
        if self.generator.conditioned and self.generator.cond_in_dim != self.encoder.n_embd:
            raise ValueError(f"generator.cond_in_dim ({self.generator.cond_in_dim}) must equal "
                             f"encoder.n_embd ({self.encoder.n_embd}): the conditioning vector "
                             "is the mean of predictor outputs, which have the encoder's width")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, config: dict) -> "ModelConfig":
        return cls(generator=GeneratorConfig(**config["generator"]),
                   encoder=EncoderConfig(**config["encoder"]),
                   predictor=PredictorConfig(**config["predictor"]))


PRESETS: dict[str, ModelConfig] = {
    # The paper: RWKV-4 560M (64 x 800, context 4096), encoder 6 x 512, predictor 3 x 256.
    "paper": ModelConfig(
        generator=GeneratorConfig(n_layer=64, n_embd=800, ctx_len=4096, cond_in_dim=512, cond_dim=32),
        encoder=EncoderConfig(n_layer=6, n_embd=512, n_head=8, max_len=8192),
        predictor=PredictorConfig(n_layer=3, n_embd=256, n_head=4)),
    # The shipped default: fast CPU decoding, a CPU training run of a couple of hours, and
    # weights (generator, context and target encoders, predictor) under 40 MB stored as fp16.
    "small": ModelConfig(
        generator=GeneratorConfig(n_layer=6, n_embd=192, ctx_len=1024, cond_in_dim=128, cond_dim=32),
        encoder=EncoderConfig(n_layer=3, n_embd=128, n_head=4, max_len=4096),
        predictor=PredictorConfig(n_layer=2, n_embd=96, n_head=4)),
    # Tests only.
    "tiny": ModelConfig(
        generator=GeneratorConfig(n_layer=2, n_embd=64, ctx_len=256, cond_in_dim=64, cond_dim=8),
        encoder=EncoderConfig(n_layer=2, n_embd=64, n_head=2, max_len=1024),
        predictor=PredictorConfig(n_layer=2, n_embd=32, n_head=2)),
}


def preset(name: str) -> ModelConfig:
    """A fresh copy of a named preset (callers may change fields)."""
    if name not in PRESETS:
        raise ValueError(f"no model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
