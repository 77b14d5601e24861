"""JEPA: context isolation, padding, EMA, loss that learns, conditioning vector, the exported graphs'
attention against training's; configs; device."""

from __future__ import annotations

import json

import pytest
import torch

from cmi_daemon.inference.bundle import load_bundle, load_torch_jepa
from cmi_daemon.inference.device import choose_device
from cmi_daemon.model.config import ModelConfig, preset
from cmi_daemon.model.jepa import JEPA, SelfAttention, conditioning_vector, ema_momentum, gather_positions
from cmi_daemon.music.tokens import read_midi, tokenize
from cmi_daemon.music.vocab import FIRST_NOTE_ID, PAD_ID, PUBLIC_VOCAB_SIZE
from cmi_daemon.paths import default_model_dir
from conftest import POP909_FIXTURES
from export.graphs import heads_one_at_a_time

EXPORTED_ATTENTION_TOLERANCE = 1e-5


def tiny_jepa(seed: int = 0) -> JEPA:
    torch.manual_seed(seed)
    config = preset("tiny")
    return JEPA(config.encoder, config.predictor).eval()


def batch_with_blank(lengths=(60, 45), blank=(20, 35)):
    """Token ids padded with PAD_ID to the longest length, and context/target masks."""
    generator = torch.Generator().manual_seed(1)
    token_ids = torch.full((len(lengths), max(lengths)), PAD_ID)
    for row, length in enumerate(lengths):
        token_ids[row, :length] = torch.randint(FIRST_NOTE_ID, PUBLIC_VOCAB_SIZE, (length,), generator=generator)
    target_mask = torch.zeros_like(token_ids, dtype=torch.bool)
    target_mask[:, blank[0]:blank[1]] = True
    context_mask = ~target_mask & (token_ids != PAD_ID)
    return token_ids, context_mask, target_mask


def test_context_encoding_ignores_masked_tokens():
    jepa = tiny_jepa()
    token_ids, context_mask, target_mask = batch_with_blank()
    changed = torch.where(target_mask, torch.randint_like(token_ids, FIRST_NOTE_ID, PUBLIC_VOCAB_SIZE), token_ids)
    assert not torch.equal(changed, token_ids)
    with torch.no_grad():
        before, positions, valid = jepa.encode_context(token_ids, context_mask)
        after, _, _ = jepa.encode_context(changed, context_mask)
        predicted_before, _, _ = jepa.predict(token_ids, context_mask, target_mask)
        predicted_after, _, _ = jepa.predict(changed, context_mask, target_mask)
    assert torch.equal(before[valid], after[valid])
    assert torch.equal(predicted_before, predicted_after)
    # Context tokens keep their true positions in the full sequence.
    assert positions[0, 19].item() == 19 and positions[0, 20].item() == 35


def test_padding_does_not_change_a_sequence_encoding():
    jepa = tiny_jepa()
    token_ids, context_mask, target_mask = batch_with_blank()
    with torch.no_grad():
        batched, _, valid = jepa.encode_context(token_ids, context_mask)
        alone, _, _ = jepa.encode_context(token_ids[1:, :45], context_mask[1:, :45])
        batched_cond = jepa.conditioning(token_ids, context_mask, target_mask)
        alone_cond = jepa.conditioning(token_ids[1:, :45], context_mask[1:, :45], target_mask[1:, :45])
    n_valid = int(valid[1].sum())
    assert torch.allclose(batched[1, :n_valid], alone[0, :n_valid], atol=1e-5)
    assert torch.allclose(batched_cond[1], alone_cond[0], atol=1e-5)


def test_conditioning_vector_is_the_mean_over_the_blank():
    jepa = tiny_jepa()
    token_ids, context_mask, target_mask = batch_with_blank()
    with torch.no_grad():
        predicted, target_positions, target_valid = jepa.predict(token_ids, context_mask, target_mask)
        cond = jepa.conditioning(token_ids, context_mask, target_mask)
    assert predicted.shape == (2, 15, preset("tiny").encoder.n_embd)
    assert torch.equal(target_positions[0], torch.arange(20, 35))
    assert torch.allclose(cond, predicted.mean(dim=1), atol=1e-6)
    half_valid = torch.tensor([[True] * 5 + [False] * 10] * 2)
    assert torch.allclose(conditioning_vector(predicted, half_valid), predicted[:, :5].mean(dim=1), atol=1e-6)


def test_the_exported_graphs_attention_one_head_at_a_time_is_trainings_fused_attention():
    """The default model on a real song's tokens: rows of 900 and 500 tokens (padding) with a blank
    each, and a row with no context at all (it attends to everything); encodings and predictions
    with the heads one at a time (as exported) match torch's fused attention."""
    bundle = load_bundle(default_model_dir())
    jepa = load_torch_jepa(bundle)
    song_ids = tokenize(bundle.tokenizer.model_song(read_midi(POP909_FIXTURES[0]))).ids
    rows = ((song_ids[1000:1900], (400, 450)), (song_ids[3000:3500], (100, 300)), (song_ids[:200], (0, 200)))
    token_ids = torch.full((len(rows), 900), PAD_ID)
    target_mask = torch.zeros_like(token_ids, dtype=torch.bool)
    for row, (ids, (blank_start, blank_end)) in enumerate(rows):
        token_ids[row, :len(ids)] = torch.tensor(ids)
        target_mask[row, blank_start:blank_end] = True
    context_mask = ~target_mask & (token_ids != PAD_ID)
    exported = (jepa.context_encoder, jepa.predictor)
    layers = [layer for module in exported for layer in module.modules() if isinstance(layer, SelfAttention)]
    with torch.no_grad():
        fused = jepa.encode_context(token_ids, context_mask)[0], jepa.predict(token_ids, context_mask, target_mask)[0]
        with heads_one_at_a_time(*exported):
            assert layers and all(layer.one_head_at_a_time for layer in layers)
            one_at_a_time = (jepa.encode_context(token_ids, context_mask)[0],
                             jepa.predict(token_ids, context_mask, target_mask)[0])
    assert not any(layer.one_head_at_a_time for layer in layers)
    for expected, got in zip(fused, one_at_a_time):
        assert float((got - expected).abs().max()) <= EXPORTED_ATTENTION_TOLERANCE


def test_gather_positions_pads_ragged_rows():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    positions, valid = gather_positions(mask)
    assert positions.tolist() == [[1, 2], [0, 0]]
    assert valid.tolist() == [[True, True], [True, False]]


def test_ema_moves_target_by_the_momentum():
    jepa = tiny_jepa()
    with torch.no_grad():
        for p in jepa.context_encoder.parameters():
            p.add_(torch.randn_like(p))
    context = [p.clone() for p in jepa.context_encoder.parameters()]
    target = [p.clone() for p in jepa.target_encoder.parameters()]
    jepa.update_target(0.9)
    for new, old, ctx in zip(jepa.target_encoder.parameters(), target, context):
        assert torch.allclose(new, 0.9 * old + 0.1 * ctx, atol=1e-6)
    assert not any(p.requires_grad for p in jepa.target_encoder.parameters())
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    assert ema_momentum(100, 100) == ema_momentum(500, 100) == pytest.approx(1.0)


def test_loss_decreases_on_a_fixed_batch():
    jepa = tiny_jepa().train()
    token_ids, context_mask, target_mask = batch_with_blank()
    optimizer = torch.optim.AdamW([p for p in jepa.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(8):
        loss = jepa.loss(token_ids, context_mask, target_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        jepa.update_target(ema_momentum(step, 8))
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert jepa.target_encoder.tok_emb.weight.grad is None


def test_model_config_round_trips_through_json():
    for name in ("paper", "small", "tiny"):
        config = preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_model_config_refuses_mismatched_widths():
    config = preset("tiny").to_dict()
    config["generator"]["cond_in_dim"] = 65
    with pytest.raises(ValueError, match="cond_in_dim"):
        ModelConfig.from_dict(config)


def test_choose_device_returns_a_usable_device():
    device = choose_device()
    assert torch.zeros(1, device=device).device.type == device.type
