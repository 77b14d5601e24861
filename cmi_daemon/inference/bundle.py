"""Model bundles: the folder the daemon loads a model from (ONNX graphs, safetensors, manifest.json).

A bundle holds everything inference and DIL need and nothing of training:
- `manifest.json`: format version, vocabulary id, the weights' storage dtype, model configs,
  tokenizer settings (context window, time unit, role bins), the training-data summary, and the
  sha256 of every other file;
- weights, stored once as fp16: `generator.safetensors` (RWKVGenerator state dict) and
  `jepa.safetensors` (JEPA state dict: context_encoder.*, predictor.*, target_encoder.*);
  torch loaders upcast them to fp32;
- ONNX graphs without weights of their own: `context_encoder.onnx`, `predictor.onnx`,
  `generator_prefill.onnx`, `generator_step.onnx`. Their weight initializers are ONNX
  external data pointing into the safetensors files (offset and length of each tensor's
  bytes), each read through a Cast to float32, so a session must be created from the graph's
  path inside the bundle folder. The generator graphs take the head rows to compute as an
  input: the engine passes only the rows it may sample, read from the generator's safetensors.
  The manifest's `graph_weights` gives, per graph, the state-dict key each initializer holds
  (recorded at export from the traced weights), which is how a DIL profile's weights replace them.
An unconditioned generator (the "w/o JEP-AGA" ablation) has no JEPA files.

Loading checks the format version, the vocabulary and every file's hash before anything is
used, and refuses a bundle that fails with a BundleError naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CMIError
from ..model.config import ModelConfig
from ..music import vocab
from ..music.roles import with_distinct_bins
from ..music.timeunit import TimeUnit
from ..music.tokens import Song

BUNDLE_FORMAT = "cmi-bundle-2"
WEIGHTS_DTYPE = "float16"
"""Storage dtype of every floating-point tensor in the safetensors files (manifest `weights_dtype`)."""
MANIFEST_NAME = "manifest.json"
CONTEXT_ENCODER_GRAPH = "context_encoder.onnx"
PREDICTOR_GRAPH = "predictor.onnx"
PREFILL_GRAPH = "generator_prefill.onnx"
STEP_GRAPH = "generator_step.onnx"
GENERATOR_WEIGHTS = "generator.safetensors"
JEPA_WEIGHTS = "jepa.safetensors"
GRAPH_WEIGHTS_FIELD = "graph_weights"
"""Manifest field: graph file -> initializer name -> the key, in the state dict of the safetensors file
the graph reads, of the weight the initializer holds; a list of keys when the exporter merged weights
of equal value into one initializer, null for an initializer that holds no weight (a constant)."""
PROFILE_GRAPHS = (CONTEXT_ENCODER_GRAPH, PREDICTOR_GRAPH)
"""The graphs whose weights a DIL profile replaces."""
PREFILL_CHUNK_TOKENS = 32
"""Tokens the prefill graph reads per call (the chunked WKV is unrolled for a fixed length)."""
_HASH_BLOCK_BYTES = 1 << 20


class BundleError(CMIError):
    """A model bundle cannot be used; the message names the bundle, the file and the problem."""


@dataclass(frozen=True)
class TokenizerSettings:
    wait_step_ms: float
    context_tokens: int
    """Most tokens of prefix + blank + suffix the model reads (its training window)."""
    prefill_chunk_tokens: int
    role_bins: bool = False
    """Trained on songs whose tracks of one bin were given a bin each by role (`roles.distinct_bins`):
    the engine then does the same to every request."""
    steps_per_qn: Optional[int] = None
    """The time unit (`timeunit.TimeUnit`): absent for 8 ms real-time steps, else steps per quarter note."""

    def __post_init__(self):
        TimeUnit(self.steps_per_qn)

    @property
    def time_unit(self) -> TimeUnit:
        return TimeUnit(self.steps_per_qn)

    def model_song(self, song: Song) -> Song:
        """The song as this model reads it: with role_bins, tracks of one bin get a bin each by role;
        then its tempo map is the time unit's (`TimeUnit.token_song`). Notes stay in the song's QN."""
        if self.role_bins:
            song = with_distinct_bins(song)
        return self.time_unit.token_song(song)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict
    model_config: ModelConfig
    tokenizer: TokenizerSettings

    @property
    def conditioned(self) -> bool:
        return self.model_config.generator.conditioned

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def training(self) -> Optional[dict]:
        return self.manifest.get("training")

    def own_weight_initializers(self, graph: str) -> dict[str, str]:
        """The graph's initializers that hold one weight each -> its state-dict key (those merged from
        several weights and the constants left out)."""
        return {name: key for name, key in self.manifest[GRAPH_WEIGHTS_FIELD][graph].items() if isinstance(key, str)}


def bundle_files(conditioned: bool) -> tuple[str, ...]:
    """Every file a bundle must hold besides the manifest."""
    generator = (PREFILL_GRAPH, STEP_GRAPH, GENERATOR_WEIGHTS)
    return generator + ((CONTEXT_ENCODER_GRAPH, PREDICTOR_GRAPH, JEPA_WEIGHTS) if conditioned else ())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _is_weight_map(value) -> bool:
    """A GRAPH_WEIGHTS_FIELD entry of one graph: initializer name -> key, list of keys or None."""
    return isinstance(value, dict) and all(
        isinstance(key, str) or key is None or (isinstance(key, list) and all(isinstance(k, str) for k in key))
        for key in value.values())


def load_bundle(path, verify_hashes: bool = True) -> Bundle:
    """Read and check a bundle folder; raises BundleError saying what is wrong."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise BundleError(f"model bundle {path}: no such folder")
    if not manifest_path.is_file():
        raise BundleError(f"model bundle {path}: missing file {MANIFEST_NAME} (is this a bundle folder?)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"model bundle {path}: {MANIFEST_NAME} is not readable JSON ({error})") from error
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"model bundle {path}: {MANIFEST_NAME} has format version {manifest.get('format')!r}, "
                          f"this cmi-daemon reads {BUNDLE_FORMAT!r} (export the model again, or update cmi-daemon)")
    if manifest.get("weights_dtype") != WEIGHTS_DTYPE:
        dtype = manifest.get("weights_dtype")
        raise BundleError(f"model bundle {path}: {MANIFEST_NAME} gives weights dtype {dtype!r}, "
                          f"expected {WEIGHTS_DTYPE!r}")
    if manifest.get("vocab_id") != vocab.VOCAB_ID:
        raise BundleError(f"model bundle {path}: vocabulary {manifest.get('vocab_id')!r} is not {vocab.VOCAB_ID!r}")
    try:
        model_config = ModelConfig.from_dict(manifest["model_config"])
        tokenizer = TokenizerSettings(**manifest["tokenizer"])
        hashes = dict(manifest["files"])
    except (KeyError, TypeError, ValueError) as error:
        raise BundleError(f"model bundle {path}: {MANIFEST_NAME} is incomplete or malformed ({error!r})") from error
    if tokenizer.wait_step_ms != vocab.WAIT_STEP_MS:
        raise BundleError(f"model bundle {path}: wait step {tokenizer.wait_step_ms} ms, this tokenizer uses "
                          f"{vocab.WAIT_STEP_MS} ms")
    weight_maps = manifest.get(GRAPH_WEIGHTS_FIELD)
    for graph in PROFILE_GRAPHS if model_config.generator.conditioned else ():
        if not (isinstance(weight_maps, dict) and _is_weight_map(weight_maps.get(graph))):
            raise BundleError(f"model bundle {path}: {MANIFEST_NAME} gives no {GRAPH_WEIGHTS_FIELD} for {graph} "
                              "(exported before the graphs' weight names were recorded: export the model again)")
    for name in bundle_files(model_config.generator.conditioned):
        if name not in hashes:
            raise BundleError(f"model bundle {path}: {MANIFEST_NAME} lists no hash for {name}")
    for name, expected in sorted(hashes.items()):
        file_path = path / name
        if not file_path.is_file():
            raise BundleError(f"model bundle {path}: missing file {name}")
        if verify_hashes and sha256_of(file_path) != expected:
            raise BundleError(f"model bundle {path}: {name} does not match its sha256 in {MANIFEST_NAME} "
                              "(file changed or damaged; export the bundle again)")
    return Bundle(path, manifest, model_config, tokenizer)


def fp32_weights(bundle: Bundle, name: str) -> dict:
    """A safetensors file of the bundle as a state dict, floating-point tensors upcast to fp32 (the
    models compute in fp32, as the ONNX graphs do)."""
    from safetensors.torch import load_file

    return {key: tensor.float() if tensor.is_floating_point() else tensor
            for key, tensor in load_file(bundle.file(name)).items()}


def load_torch_jepa(bundle: Bundle):
    """The bundle's JEPA (context encoder, predictor, target encoder) in fp32, eval mode, frozen."""
    from ..model.jepa import JEPA

    jepa = JEPA(bundle.model_config.encoder, bundle.model_config.predictor)
    jepa.load_state_dict(fp32_weights(bundle, JEPA_WEIGHTS))
    return jepa.eval().requires_grad_(False)


def load_torch_models(bundle: Bundle):
    """(RWKVGenerator, JEPA or None) in eval mode, from the bundle's safetensors in fp32 (for DIL and NLL)."""
    from ..model.rwkv import RWKVGenerator

    generator = RWKVGenerator(bundle.model_config.generator)
    missing, unexpected = generator.load_state_dict(fp32_weights(bundle, GENERATOR_WEIGHTS), strict=False)
    # Bundles exported before the conditioning standardisation have no cond_mean / cond_inv_std;
    # their graphs do not standardise, which is what the buffers' identity defaults compute.
    missing = sorted(set(missing) - {"cond_mean", "cond_inv_std"})
    if missing or unexpected:
        raise BundleError(f"model bundle {bundle.path}: {GENERATOR_WEIGHTS} does not fit the generator config "
                          f"(missing {missing[:5]}, unexpected {sorted(unexpected)[:5]})")
    jepa = load_torch_jepa(bundle) if bundle.conditioned else None
    return generator.eval().requires_grad_(False), jepa
