"""Model bundles: every weight is stored once as fp16 and the ONNX graphs read it from the safetensors
files; the graphs agree with the torch model on real tokens; the JEPA graphs' memory at full windows
is bounded; broken bundles are refused."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cmi_daemon.dil.adapter import TRAINED_MODULES
from cmi_daemon.dil.learner import trainable_keys
from cmi_daemon.inference.bundle import (BUNDLE_FORMAT, CONTEXT_ENCODER_GRAPH, GENERATOR_WEIGHTS, GRAPH_WEIGHTS_FIELD,
                                         JEPA_WEIGHTS, MANIFEST_NAME, PREDICTOR_GRAPH, STEP_GRAPH, BundleError,
                                         load_bundle, load_torch_models, sha256_of)
from cmi_daemon.inference.engine import Engine, blank_positions
from cmi_daemon.model.config import preset
from cmi_daemon.model.jepa import JEPA
from cmi_daemon.model.rwkv import RWKVGenerator
from cmi_daemon.music.tokens import read_midi
from cmi_daemon.paths import default_model_dir
from conftest import POP909_FIXTURES
from daemon_support import process_rss_bytes
from export.__main__ import main as export_main
from export.bundle import GRAPH_WEIGHT_FILES
from export.graphs import export_jepa_graphs
from export.weights import link_graph_to_weights, save_weights
from tiny_bundle import randomized, tiny_bundle_dir

TOLERANCE = 1e-4
JEPA_TOLERANCE = 1e-5
FULL_WINDOW_BARS = (20, 30)
FULL_WINDOW_FRACTION = 0.95
"""One-bar blanks of the POP909 fixtures whose context fills at least this share of the default model's window."""
FULL_WINDOW_CONDITIONING_MIB = 40
"""What conditioning at full windows may add to a process's memory with the default model: measured 11 MiB
(ONNX Runtime's arena for the encoder and predictor), and 179 MiB while the graphs held all heads'
(B, heads, N, N) scores at once and the sessions kept a memory pattern per input shape."""
MAX_INLINE_TENSOR_BYTES = 4096
"""The largest constant a graph may hold itself (the traced code's small masks, shapes and indices)."""


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(tiny_bundle_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def region(engine):
    song = read_midi(POP909_FIXTURES[0])
    start_qn, end_qn = song.meter.bar_range_qn(9, 12)
    return engine.region(song, start_qn, end_qn, [0, 1])


def test_bundle_manifest_describes_the_model(engine):
    manifest = engine.bundle.manifest
    assert manifest["format"] == BUNDLE_FORMAT and manifest["vocab_id"] == "rwkv4-midi-20096+ilm3"
    assert manifest["model_config"] == preset("tiny").to_dict()
    assert manifest["tokenizer"]["wait_step_ms"] == 8.0 and manifest["training"]["note"] == "random weights for tests"
    assert sorted(manifest["files"]) == sorted(p.name for p in engine.bundle.path.iterdir() if p.name != MANIFEST_NAME)
    assert manifest["weights_dtype"] == "float16"


def test_weights_are_stored_once_as_fp16_and_the_graphs_read_them(engine):
    folder = engine.bundle.path
    for weights_name in (GENERATOR_WEIGHTS, JEPA_WEIGHTS):
        with safe_open(str(folder / weights_name), framework="numpy") as weights:
            assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F16"}
    for graph_name, weights_name in GRAPH_WEIGHT_FILES.items():
        graph = onnx.load(str(folder / graph_name), load_external_data=False).graph
        external = [tensor for tensor in graph.initializer if tensor.data_location == TensorProto.EXTERNAL]
        assert external and all(tensor.data_type == TensorProto.FLOAT16 for tensor in external)
        assert all({entry.key: entry.value for entry in tensor.external_data}["location"] == weights_name
                   for tensor in external)
        cast_inputs = {node.input[0] for node in graph.node if node.op_type == "Cast"}
        assert {tensor.name for tensor in external} <= cast_inputs
        inline = [tensor for tensor in graph.initializer if tensor.data_location != TensorProto.EXTERNAL]
        inline += [attribute.t for node in graph.node if node.op_type == "Constant" for attribute in node.attribute]
        assert max(len(numpy_helper.to_array(tensor).tobytes()) for tensor in inline) <= MAX_INLINE_TENSOR_BYTES
        assert (folder / graph_name).stat().st_size < (folder / weights_name).stat().st_size / 10


def test_the_graphs_external_data_is_the_stored_tensor(engine):
    folder = engine.bundle.path
    for graph_name, weights_name in GRAPH_WEIGHT_FILES.items():
        graph = onnx.load(str(folder / graph_name)).graph
        keys = engine.bundle.manifest[GRAPH_WEIGHTS_FIELD][graph_name]
        assert sorted(keys) == sorted(tensor.name for tensor in graph.initializer)
        with safe_open(str(folder / weights_name), framework="numpy") as weights:
            for tensor in graph.initializer:
                if tensor.data_type == TensorProto.FLOAT16:
                    assert np.array_equal(numpy_helper.to_array(tensor), weights.get_tensor(keys[tensor.name]))


def test_weights_merged_into_one_initializer_are_recorded_with_every_key_and_stay_frozen(tmp_path):
    jepa = JEPA(preset("tiny").encoder, preset("tiny").predictor).eval()  # fresh: equal LayerNorms
    held = export_jepa_graphs(jepa, tmp_path / CONTEXT_ENCODER_GRAPH, tmp_path / PREDICTOR_GRAPH)
    save_weights(jepa.state_dict(), tmp_path / JEPA_WEIGHTS)
    recorded = {graph: link_graph_to_weights(tmp_path / graph, tmp_path / JEPA_WEIGHTS, held[graph]) for graph in held}
    state = jepa.state_dict()
    keys = [key for names in recorded.values() for value in names.values() if value is not None
            for key in ([value] if isinstance(value, str) else value)]
    assert sorted(keys) == sorted(key for key, _ in jepa.named_parameters() if key.startswith(TRAINED_MODULES))
    merged = [value for names in recorded.values() for value in names.values() if isinstance(value, list)]
    assert merged and all(torch.equal(state[key], state[value[0]]) for value in merged for key in value)
    own = {graph: {name: key for name, key in names.items() if isinstance(key, str)}
           for graph, names in recorded.items()}
    assert trainable_keys(jepa, own) == set(keys) - {key for value in merged for key in value}


def test_torch_models_load_the_fp16_weights_as_fp32(engine):
    generator, jepa = load_torch_models(engine.bundle)
    parameters = list(generator.parameters()) + list(jepa.parameters())
    assert {parameter.dtype for parameter in parameters} == {torch.float32}
    emb = generator.emb.weight
    assert torch.equal(emb, emb.half().float())


@pytest.mark.slow
def test_step_graph_agrees_with_torch_on_real_tokens(engine, region):
    generator, _ = load_torch_models(engine.bundle)
    prompt = region.ilm_ids()[:48]
    cond = torch.randn(2, generator.config.cond_in_dim, generator=torch.Generator().manual_seed(0))
    torch_state, onnx_state = generator.empty_state(2), engine.empty_state(2)
    with torch.no_grad():
        for token_id in prompt:
            tokens = torch.tensor([token_id, prompt[0]])
            torch_logits, torch_state = generator.step(tokens, torch_state, cond)
            onnx_logits, onnx_state = engine.step(tokens.numpy(), onnx_state, engine.head, cond.numpy())
            assert np.abs(onnx_logits - torch_logits.numpy()).max() <= TOLERANCE
    assert np.allclose(onnx_state, torch_state.numpy(), rtol=TOLERANCE, atol=TOLERANCE)


def test_prefill_agrees_with_torch_and_with_stepping(engine, region):
    generator, _ = load_torch_models(engine.bundle)
    prompt = region.ilm_ids()
    prompt = prompt[:3 * engine.chunk_tokens + 5]  # whole chunks and a remainder
    cond = np.random.default_rng(1).standard_normal((1, generator.config.cond_in_dim)).astype(np.float32)
    logits, state = engine.prefill(prompt, engine.head, cond)
    with torch.no_grad():
        torch_logits, torch_state = generator(torch.tensor([prompt]), cond=torch.from_numpy(cond))
    assert np.abs(logits[0] - torch_logits[0, -1].numpy()).max() <= TOLERANCE
    assert np.allclose(state, torch_state.numpy(), rtol=TOLERANCE, atol=TOLERANCE)
    step_state = engine.empty_state(1)
    for token_id in prompt:
        step_logits, step_state = engine.step(np.array([token_id]), step_state, engine.head, cond)
    assert np.abs(step_logits - logits).max() <= TOLERANCE
    assert np.allclose(step_state, state, rtol=TOLERANCE, atol=TOLERANCE)


def full_window_regions(engine: Engine) -> list:
    """Regions of one-bar blanks of the POP909 fixtures, each with a full window of context."""
    regions = []
    for path in POP909_FIXTURES:
        song = read_midi(path)
        for bar in FULL_WINDOW_BARS:
            region = engine.region(song, *song.meter.bar_range_qn(bar, bar), [0])
            assert len(region.prefix_ids) + len(region.suffix_ids) >= (
                FULL_WINDOW_FRACTION * engine.bundle.tokenizer.context_tokens), f"{path.name} bar {bar}"
            regions.append(region)
    return regions


def jepa_graph_errors(engine: Engine, region) -> tuple[float, float]:
    """Largest differences of the encoder graph's representations and of the engine's conditioning
    vector from the torch JEPA's (training's fused attention) for the region."""
    _, jepa = load_torch_models(engine.bundle)
    n_blank = region.expected_answer_tokens()
    context_ids, context_positions, _ = blank_positions(region, n_blank)
    valid = np.ones((1, len(context_ids)), dtype=bool)
    (representations,) = engine.encoder_session.run(None, {"token_ids": context_ids[None],
                                                           "positions": context_positions[None], "valid": valid})
    with torch.no_grad():
        torch_representations = jepa.context_encoder(torch.from_numpy(context_ids[None]),
                                                     torch.from_numpy(context_positions[None]), torch.from_numpy(valid))
        token_ids = torch.tensor([region.prefix_ids + [300] * n_blank + region.suffix_ids])
        target_mask = torch.zeros_like(token_ids, dtype=torch.bool)
        target_mask[0, len(region.prefix_ids):len(region.prefix_ids) + n_blank] = True
        torch_cond = jepa.conditioning(token_ids, ~target_mask, target_mask)
    return (float(np.abs(representations - torch_representations.numpy()).max()),
            float(np.abs(engine.conditioning(region, n_blank) - torch_cond.numpy()).max()))


def test_encoder_and_predictor_graphs_agree_with_torch(engine, region):
    assert max(jepa_graph_errors(engine, region)) <= JEPA_TOLERANCE


@pytest.mark.slow
def test_the_default_models_jepa_graphs_agree_with_torch_at_full_windows():
    engine = Engine(default_model_dir())
    for region in full_window_regions(engine):
        assert max(jepa_graph_errors(engine, region)) <= JEPA_TOLERANCE


def conditioning_rise_mib() -> float:
    """Run in a fresh process: how much conditioning twice at each full window adds to its resident memory
    once the default model's engine is built."""
    engine = Engine(default_model_dir())
    regions = full_window_regions(engine)
    before = process_rss_bytes(os.getpid())
    for region in regions + regions:  # a shape's second run is where a memory pattern is allocated
        engine.conditioning(region, region.expected_answer_tokens())
    return (process_rss_bytes(os.getpid()) - before) / 2 ** 20


@pytest.mark.slow
def test_conditioning_at_full_windows_costs_little_memory():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rise_mib = pool.apply(conditioning_rise_mib)
    assert rise_mib < FULL_WINDOW_CONDITIONING_MIB


@pytest.fixture
def bundle_copy(tmp_path, tmp_path_factory):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle_dir(tmp_path_factory), copy)
    return copy


@pytest.mark.parametrize("name", [STEP_GRAPH, GENERATOR_WEIGHTS, JEPA_WEIGHTS])
def test_a_changed_file_is_refused_by_its_hash(bundle_copy, name):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=f"{name} does not match its sha256"):
        load_bundle(bundle_copy)


def test_a_missing_file_is_refused(bundle_copy):
    (bundle_copy / PREDICTOR_GRAPH).unlink()
    with pytest.raises(BundleError, match=f"missing file {PREDICTOR_GRAPH}"):
        load_bundle(bundle_copy)
    shutil.rmtree(bundle_copy)
    with pytest.raises(BundleError, match="no such folder"):
        Engine(bundle_copy)


def test_a_bundle_from_before_the_conditioning_standardisation_loads_without_it(bundle_copy):
    path = bundle_copy / GENERATOR_WEIGHTS
    weights = {k: v for k, v in load_file(str(path)).items() if k not in ("cond_mean", "cond_inv_std")}
    save_file(weights, str(path), metadata={"weights_dtype": "float16"})
    manifest_path = bundle_copy / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][GENERATOR_WEIGHTS] = sha256_of(path)
    manifest_path.write_text(json.dumps(manifest))
    generator, _ = load_torch_models(load_bundle(bundle_copy))
    assert torch.count_nonzero(generator.cond_mean) == 0 and torch.all(generator.cond_inv_std == 1)
    del weights["head.weight"]
    save_file(weights, str(path), metadata={"weights_dtype": "float16"})
    manifest["files"][GENERATOR_WEIGHTS] = sha256_of(path)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="missing \\['head.weight'\\]"):
        load_torch_models(load_bundle(bundle_copy))


@pytest.mark.parametrize("version", ["cmi-bundle-1", "cmi-bundle-99"])
def test_an_older_or_unknown_format_version_is_refused(bundle_copy, version):
    manifest_path = bundle_copy / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = version
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"{MANIFEST_NAME} has format version '{version}', this cmi-daemon reads "
                                          f"'{BUNDLE_FORMAT}' \\(export the model again"):
        load_bundle(bundle_copy)


def test_a_bundle_exported_before_the_graph_weights_were_recorded_is_refused(bundle_copy, tmp_path_factory):
    manifest_path = bundle_copy / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    del manifest[GRAPH_WEIGHTS_FIELD]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"{MANIFEST_NAME} gives no {GRAPH_WEIGHTS_FIELD} for context_encoder.onnx "
                                          ".*export the model again"):
        Engine(bundle_copy)
    unconditioned = tmp_path_factory.mktemp("unconditioned") / "bundle"
    shutil.copytree(tiny_bundle_dir(tmp_path_factory, conditioned=False), unconditioned)
    manifest = json.loads((unconditioned / MANIFEST_NAME).read_text())
    del manifest[GRAPH_WEIGHTS_FIELD]
    (unconditioned / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert not load_bundle(unconditioned).conditioned, "a generator alone replaces no weights: no map needed"


def test_another_weights_dtype_is_refused(bundle_copy):
    manifest_path = bundle_copy / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["weights_dtype"] = "float32"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="weights dtype 'float32', expected 'float16'"):
        load_bundle(bundle_copy)


@pytest.mark.slow
def test_training_checkpoints_export_with_their_jepa_and_data_summary(tmp_path, capsys):
    config = preset("tiny")
    jepa = randomized(JEPA(config.encoder, config.predictor), 3)
    torch.save({"format": "cmi-train-1", "stage": "jepa", "model_config": config.to_dict(),
                "model": jepa.state_dict(), "step": 10}, tmp_path / "best.pt")
    generator = randomized(RWKVGenerator(config.generator), 4)
    torch.save({"format": "cmi-train-1", "stage": "generator", "model_config": config.to_dict(),
                "train_config": {"jepa_dir": str(tmp_path)}, "model": generator.state_dict(), "step": 20,
                "best_dev": 3.5}, tmp_path / "generator.pt")
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"vocab_id": "x", "sources": [{"name": "pop909"}], "seed": 1}))
    arguments = [str(tmp_path / "generator.pt"), "--out", str(tmp_path / "bundle"), "--shards", str(shards)]
    assert export_main(arguments) == 0
    training = load_bundle(tmp_path / "bundle").training
    assert training["step"] == 20 and training["jepa"]["step"] == 10
    assert training["data"]["sources"] == [{"name": "pop909"}]
    assert export_main([str(tmp_path / "best.pt"), "--out", str(tmp_path / "other")]) == 2
    assert "stage-1" in capsys.readouterr().err


def test_an_unconditioned_model_exports_and_infills_without_jepa_files(tmp_path_factory):
    engine = Engine(tiny_bundle_dir(tmp_path_factory, conditioned=False))
    assert engine.encoder_session is None and not (engine.bundle.path / PREDICTOR_GRAPH).exists()
    song = read_midi(POP909_FIXTURES[1])
    start_qn, end_qn = song.meter.bar_range_qn(5, 6)
    result = engine.infill(song, start_qn, end_qn, [0])
    assert result.candidates[0].answer_ids[-1] == 20098
