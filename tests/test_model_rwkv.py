"""RWKV-4 generator: parallel == recurrent, agreement with BlinkDL's `rwkv` package, JEP fusion."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cmi_daemon.model import wkv_kernel
from cmi_daemon.model.config import GeneratorConfig, preset
from cmi_daemon.model.rwkv import RWKVGenerator, load_blinkdl_checkpoint, rwkv_package_model, wkv_chunked, wkv_step
from cmi_daemon.music.vocab import FIRST_NOTE_ID, LAST_NOTE_ID, LAST_WAIT_ID, PUBLIC_VOCAB_SIZE, VOCAB_SIZE
from conftest import FIXTURES, SHARED_DATA


def tiny_config(conditioned: bool) -> GeneratorConfig:
    config = preset("tiny").generator
    config.conditioned = conditioned
    return config


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere: decays from slow to very fast, random mixes and norms."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("time_decay"):
                p.copy_(torch.linspace(-6.0, 4.0, p.numel()) + 0.5 * noise)
            elif name.endswith("time_first"):
                p.copy_(noise)
            elif ".time_mix_" in name:
                p.copy_(torch.rand(p.shape, generator=generator))
            elif name.startswith("ln") or ".ln" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                p.copy_(noise / p.shape[-1] ** 0.5)
    return model


def recurrent_logits(model, token_ids, state=None, cond=None):
    state = model.empty_state(token_ids.shape[0]) if state is None else state
    logits = []
    for t in range(token_ids.shape[1]):
        step_logits, state = model.step(token_ids[:, t], state, cond)
        logits.append(step_logits)
    return torch.stack(logits, dim=1), state


@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("n_tokens", [1, 17, 512])
@pytest.mark.slow
def test_parallel_matches_recurrent(n_tokens, use_kernel):
    model = randomize_(RWKVGenerator(tiny_config(conditioned=False))).eval().use_wkv_kernel(use_kernel)
    token_ids = torch.randint(0, VOCAB_SIZE, (3, n_tokens), generator=torch.Generator().manual_seed(n_tokens))
    with torch.no_grad():
        parallel, parallel_state = model(token_ids)
        recurrent, recurrent_state = recurrent_logits(model, token_ids)
    assert parallel.shape == (3, n_tokens, VOCAB_SIZE)
    assert (parallel - recurrent).abs().max() <= 1e-4
    assert torch.allclose(parallel_state, recurrent_state, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_chunk_length_does_not_change_the_result():
    model = randomize_(RWKVGenerator(tiny_config(conditioned=False))).eval().use_wkv_kernel(False)
    token_ids = torch.randint(0, VOCAB_SIZE, (2, 45))
    with torch.no_grad():
        reference, _ = model(token_ids, chunk_len=64)
        for chunk_len in (1, 5, 16):
            logits, _ = model(token_ids, chunk_len=chunk_len)
            assert (logits - reference).abs().max() <= 1e-4


@pytest.mark.slow
def test_parallel_continues_from_a_state():
    model = randomize_(RWKVGenerator(tiny_config(conditioned=True)), seed=1).eval()
    token_ids = torch.randint(0, VOCAB_SIZE, (3, 90))
    cond = torch.randn(3, model.config.cond_in_dim)
    with torch.no_grad():
        whole, whole_state = model(token_ids, cond=cond)
        _, prefix_state = model(token_ids[:, :50], cond=cond)
        rest, rest_state = model(token_ids[:, 50:], state=prefix_state, cond=cond)
        stepped, _ = recurrent_logits(model, token_ids[:, 50:], prefix_state, cond)
    assert (rest - whole[:, 50:]).abs().max() <= 1e-4
    assert (stepped - whole[:, 50:]).abs().max() <= 1e-4
    assert torch.allclose(rest_state, whole_state, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_bf16_autocast_stays_finite_and_close():
    model = randomize_(RWKVGenerator(tiny_config(conditioned=False)))
    token_ids = torch.randint(0, VOCAB_SIZE, (2, 70))
    reference, _ = model(token_ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, state = model(token_ids)
        logits.float().logsumexp(-1).mean().backward()
    assert state.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (logits.float() - reference).abs().max() <= 0.05 * reference.abs().max()


@pytest.mark.slow
def test_zero_init_fusion_gives_unconditioned_logits_and_learns():
    conditioned = randomize_(RWKVGenerator(tiny_config(conditioned=True)), seed=2)
    conditioned.reset_fusion()
    plain = RWKVGenerator(tiny_config(conditioned=False))
    plain.load_state_dict({k: v for k, v in conditioned.state_dict().items() if not k.startswith("cond_")})
    token_ids = torch.randint(0, VOCAB_SIZE, (2, 20))
    cond = torch.randn(2, conditioned.config.cond_in_dim)
    logits, _ = conditioned(token_ids, cond=cond)
    with torch.no_grad():
        assert torch.equal(logits, plain(token_ids)[0])
        step_logits, _ = conditioned.step(token_ids[:, 0], conditioned.empty_state(2), cond)
        assert torch.equal(step_logits, plain.step(token_ids[:, 0], plain.empty_state(2))[0])

    optimizer = torch.optim.SGD(conditioned.parameters(), lr=0.1)
    logits.logsumexp(-1).mean().backward()
    c = conditioned.config.n_embd
    # The zero half of the back-projection gets a gradient at once ...
    assert conditioned.cond_fuse.weight.grad[:, c:].abs().sum() > 0
    optimizer.step()
    optimizer.zero_grad()
    # ... and once it is non-zero, so does the input projection (product of two factors).
    conditioned(token_ids, cond=cond)[0].logsumexp(-1).mean().backward()
    assert conditioned.cond_proj.weight.grad.abs().sum() > 0
    assert conditioned.cond_fuse.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_conditioning_is_standardized_with_the_training_vectors():
    model = randomize_(RWKVGenerator(tiny_config(conditioned=True)), seed=3)
    width = model.config.cond_in_dim
    generator = torch.Generator().manual_seed(0)
    # As JEPA vectors are: a large shared direction, small differences; one dimension never varies.
    sample = 0.6 + 0.05 * torch.randn(512, width, generator=generator)
    sample[:, 0] = 0.6
    model.standardize_conditioning(sample)
    standardized = (sample - model.cond_mean) * model.cond_inv_std
    torch.testing.assert_close(standardized[:, 1:].mean(0), torch.zeros(width - 1), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardized[:, 1:].std(0), torch.ones(width - 1), atol=1e-4, rtol=0)
    # The constant dimension is scaled like a typical one, not by 1 / 0.
    assert model.cond_inv_std[0] == pytest.approx(1 / (0.1 * float(sample[:, 1:].std(0).mean() * (width - 1) / width)),
                                                  rel=1e-3)
    # Two blanks' vectors that differ by the data's typical spread now move the logits as much as
    # vectors a unit apart did before standardisation.
    token_ids = torch.randint(0, VOCAB_SIZE, (1, 12), generator=generator)
    with torch.no_grad():
        a, b = sample[:1], sample[1:2]
        standardized_gap = (model(token_ids, cond=a)[0] - model(token_ids, cond=b)[0]).abs().max()
        model.cond_mean.zero_()
        model.cond_inv_std.fill_(1.0)
        raw_gap = (model(token_ids, cond=a)[0] - model(token_ids, cond=b)[0]).abs().max()
    assert standardized_gap > 5 * raw_gap


def test_conditioned_generator_needs_cond():
    model = RWKVGenerator(tiny_config(conditioned=True))
    with pytest.raises(ValueError, match="conditioned"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_paper_parameter_counts():
    from cmi_daemon.model.jepa import JEPA
    config = preset("paper")
    with torch.device("meta"):
        generator = RWKVGenerator(config.generator)
        jepa = JEPA(config.encoder, config.predictor)
    count = lambda module: sum(p.numel() for p in module.parameters())
    assert abs(count(generator) / 565e6 - 1) <= 0.02
    assert abs(count(jepa.context_encoder) / 29e6 - 1) <= 0.05
    assert abs(count(jepa.predictor) / 2.6e6 - 1) <= 0.05


def real_or_synthetic_tokens(n_tokens: int) -> list[int]:
    """A real tokenized MIDI file when the tokenizer and a file are at hand, else valid ids."""
    try:
        from cmi_daemon.music.tokens import encode_file
    except ImportError:
        encode_file = None
    candidates = sorted(FIXTURES.rglob("*.mid"))
    candidates += sorted((SHARED_DATA / "pop909" / "dev").rglob("*.mid"))
    if encode_file is not None and candidates:
        for path in candidates:
            token_ids = encode_file(path)
            if len(token_ids) >= n_tokens:
                return token_ids[:n_tokens]
    generator = torch.Generator().manual_seed(7)
    waits = torch.randint(3, LAST_WAIT_ID + 1, (n_tokens,), generator=generator)
    notes = torch.randint(FIRST_NOTE_ID, LAST_NOTE_ID + 1, (n_tokens,), generator=generator)
    return torch.where(torch.arange(n_tokens) % 3 == 2, waits, notes).tolist()


@pytest.mark.slow
def test_matches_the_rwkv_package(tmp_path: Path, monkeypatch):
    """A random checkpoint in BlinkDL's format through our loader and through rwkv.model.RWKV.

    The `rwkv` package folds ln0 into emb in the checkpoint's own dtype (bf16 arithmetic),
    which alone moves its logits by ~1e-2; it is given the same bf16 values stored as fp32,
    so both sides compute in fp32 on identical weights.
    """
    monkeypatch.setenv("RWKV_JIT_ON", "0")  # the package's plain torch path
    source = randomize_(RWKVGenerator(GeneratorConfig(n_layer=3, n_embd=64, ctx_len=256, conditioned=False)), 3)
    checkpoint = {name: (tensor[:PUBLIC_VOCAB_SIZE] if name in ("emb.weight", "head.weight") else tensor)
                  .to(torch.bfloat16).clone() for name, tensor in source.state_dict().items()}
    assert checkpoint["blocks.0.att.time_mix_k"].shape == (1, 1, 64)
    assert checkpoint["blocks.0.att.time_decay"].shape == (64,)
    assert checkpoint["blocks.0.ffn.key.weight"].shape == (256, 64)
    torch.save(checkpoint, tmp_path / "public_bf16.pth")

    ours = load_blinkdl_checkpoint(tmp_path / "public_bf16.pth", ctx_len=256)
    assert ours.emb.weight.shape == (VOCAB_SIZE, 64) and ours.head.weight.shape == (VOCAB_SIZE, 64)
    peer = rwkv_package_model(checkpoint)

    token_ids = real_or_synthetic_tokens(300)
    with torch.no_grad():
        our_logits, our_state = ours(torch.tensor([token_ids]))
        peer_logits, peer_state = peer.forward(token_ids, None, full_output=True)
        peer_state_after_sequence = torch.stack(peer_state)  # forward() updates the list in place
        our_step, _ = ours.step(torch.tensor([token_ids[-1]]), our_state)
        peer_step, _ = peer.forward([token_ids[-1]], peer_state)
    assert (our_logits[0, :, :PUBLIC_VOCAB_SIZE] - peer_logits).abs().max() <= 1e-3
    assert (our_step[0, :PUBLIC_VOCAB_SIZE] - peer_step).abs().max() <= 1e-3
    # Our state holds exactly the peer's five vectors per layer, in the same order.
    assert torch.allclose(our_state[:, :, 0].reshape(-1, 64), peer_state_after_sequence, rtol=1e-4, atol=1e-3)


def test_loader_refuses_a_checkpoint_of_another_vocabulary(tmp_path: Path):
    source = RWKVGenerator(GeneratorConfig(n_layer=1, n_embd=16, ctx_len=64, conditioned=False))
    torch.save(source.state_dict(), tmp_path / "ours.pth")  # 20,099 rows: not a public checkpoint
    with pytest.raises(ValueError, match="20096"):
        load_blinkdl_checkpoint(tmp_path / "ours.pth")


def test_loaded_conditioned_generator_is_the_public_model(tmp_path: Path):
    source = randomize_(RWKVGenerator(GeneratorConfig(n_layer=1, n_embd=16, ctx_len=64, conditioned=False)))
    torch.save({k: v[:PUBLIC_VOCAB_SIZE] if k in ("emb.weight", "head.weight") else v
                for k, v in source.state_dict().items()}, tmp_path / "public.pth")
    plain = load_blinkdl_checkpoint(tmp_path / "public.pth")
    conditioned = load_blinkdl_checkpoint(tmp_path / "public.pth", conditioned=True, cond_in_dim=24)
    token_ids = torch.randint(0, VOCAB_SIZE, (2, 10))
    with torch.no_grad():
        assert torch.equal(plain(token_ids)[0], conditioned(token_ids, cond=torch.randn(2, 24))[0])
    new_rows = plain.emb.weight[PUBLIC_VOCAB_SIZE:]
    assert torch.allclose(new_rows, plain.emb.weight[:PUBLIC_VOCAB_SIZE].mean(0).expand_as(new_rows), atol=0.01)
    assert not torch.equal(new_rows[0], new_rows[1])


class _Step(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token_ids, state, cond):
        return self.model.step(token_ids, state, cond)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.slow
def test_step_exports_to_onnx_and_agrees(tmp_path: Path):
    ort = pytest.importorskip("onnxruntime")
    model = randomize_(RWKVGenerator(tiny_config(conditioned=True)), seed=4).eval()
    state, cond = model.empty_state(2), torch.randn(2, model.config.cond_in_dim)
    batch_axis = {"token_ids": {0: "batch"}, "state": {2: "batch"}, "cond": {0: "batch"},
                  "logits": {0: "batch"}, "new_state": {2: "batch"}}
    torch.onnx.export(_Step(model), (torch.tensor([5, 900]), state, cond), str(tmp_path / "step.onnx"),
                      dynamo=False, input_names=["token_ids", "state", "cond"],
                      output_names=["logits", "new_state"], dynamic_axes=batch_axis, opset_version=17)
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    token_ids = torch.randint(0, VOCAB_SIZE, (6, 3))
    cond = torch.randn(3, model.config.cond_in_dim)
    torch_state, onnx_state = model.empty_state(3), model.empty_state(3).numpy()
    with torch.no_grad():
        for tokens in token_ids:
            torch_logits, torch_state = model.step(tokens, torch_state, cond)
            onnx_logits, onnx_state = session.run(None, {"token_ids": tokens.numpy(), "state": onnx_state,
                                                         "cond": cond.numpy()})
    assert abs(onnx_logits - torch_logits.numpy()).max() <= 1e-4
    assert abs(onnx_state - torch_state.numpy()).max() <= 1e-3


@pytest.mark.slow
def test_parallel_gradients_match_recurrent_gradients():
    """The chunked WKV (with its detached scales) differentiates like the plain recurrence."""
    model = randomize_(RWKVGenerator(tiny_config(conditioned=True)), seed=5).use_wkv_kernel(False)
    token_ids = torch.randint(0, VOCAB_SIZE, (2, 40))
    cond = torch.randn(2, model.config.cond_in_dim)
    gradients = []
    for logits_of in (lambda: model(token_ids, cond=cond, chunk_len=7)[0],
                      lambda: recurrent_logits(model, token_ids, cond=cond)[0]):
        model.zero_grad()
        logits_of().logsumexp(-1).mean().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, parallel_grad in gradients[0].items():
        assert torch.allclose(parallel_grad, gradients[1][name], rtol=1e-3, atol=1e-5), name


# --- the CPU WKV kernel ---------------------------------------------------------------------------


def wkv_inputs(dtype, batch: int, n_tokens: int, n_channels: int, seed: int = 0):
    """Decays from slow to very fast, large keys, and a carried-in state that is not empty."""
    generator = torch.Generator().manual_seed(seed)
    noise = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    decay = (torch.linspace(-6.0, 4.0, n_channels, dtype=dtype) + 0.5 * noise(n_channels)).requires_grad_()
    u = noise(n_channels).requires_grad_()
    k = (3 * noise(batch, n_tokens, n_channels)).requires_grad_()
    v = noise(batch, n_tokens, n_channels).requires_grad_()
    state = (noise(batch, n_channels), noise(batch, n_channels).abs() + 0.1, noise(batch, n_channels))
    return decay, u, k, v, state


def kernel_wkv(decay, u, k, v, state):
    return wkv_kernel.WKV.apply(-torch.exp(decay), u, k, v, *state)


def chunked_wkv(decay, u, k, v, state):
    return wkv_chunked(-torch.exp(decay), u, k, v, *state)


def values_and_gradients(wkv, inputs, grad_y):
    decay, u, k, v, state = inputs
    y, aa, bb, pp = wkv(decay, u, k, v, state)
    gradients = torch.autograd.grad((y * grad_y).sum(), (decay, u, k, v))
    # The state as the true numerator and denominator: the two paths may pick other scales.
    return (y.detach(), (aa * torch.exp(pp)).detach(), (bb * torch.exp(pp)).detach(), *gradients)


@pytest.fixture
def kernel():
    if wkv_kernel.library() is None:
        pytest.skip(f"the CPU WKV kernel cannot be built here: {wkv_kernel.problem()}")


def test_wkv_kernel_matches_the_chunked_torch_path_in_float64(kernel):
    inputs = wkv_inputs(torch.float64, 3, 70, 130)  # 130 channels: two full blocks of 64 and a partial one
    grad_y = torch.randn(inputs[2].shape, dtype=torch.float64)
    names = ("wkv", "numerator", "denominator", "d decay", "d u", "d k", "d v")
    for name, ours, reference in zip(names, values_and_gradients(kernel_wkv, inputs, grad_y),
                                     values_and_gradients(chunked_wkv, inputs, grad_y)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10 * float(reference.abs().max()), msg=name)


def test_wkv_kernel_gradients_match_finite_differences(kernel):
    decay, u, k, v, state = wkv_inputs(torch.float64, 2, 9, 5, seed=1)
    assert torch.autograd.gradcheck(lambda *x: kernel_wkv(*x, state)[0], (decay, u, k, v))


def stepped_wkv(decay, u, k, v, state):
    """The recurrence token by token with wkv_step, as decoding runs it."""
    w, (aa, bb, pp), outputs = -torch.exp(decay), state, []
    for t in range(k.shape[1]):
        y, aa, bb, pp = wkv_step(w, u, k[:, t], v[:, t], aa, bb, pp)
        outputs.append(y)
    return torch.stack(outputs, dim=1), aa, bb, pp


def test_wkv_kernel_in_float32_computes_the_decoders_recurrence(kernel):
    """In fp32 the kernel rounds as the token-by-token recurrence does (errors that grow with the
    sequence, 2-4e-5 of the largest value after 400 slowly decaying tokens, where the chunked path
    stays near 1e-6), and both stay within 1e-4 of the exact (float64) result."""
    exact = wkv_inputs(torch.float64, 2, 400, 96, seed=2)
    single = tuple(x.float().detach().requires_grad_() for x in exact[:4]) + (tuple(s.float() for s in exact[4]),)
    grad_y = torch.randn(exact[2].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    names = ("wkv", "numerator", "denominator", "d decay", "d u", "d k", "d v")
    for name, ours, stepped, reference in zip(names, values_and_gradients(kernel_wkv, single, grad_y.float()),
                                              values_and_gradients(stepped_wkv, single, grad_y.float()),
                                              values_and_gradients(chunked_wkv, exact, grad_y)):
        scale = float(reference.abs().max())
        # Gradients sum in another order than the stepped recurrence's: up to 2.8e-6 of the largest
        # value over 8 draws of grad_y (values 4e-8).
        torch.testing.assert_close(ours, stepped, rtol=0, atol=4e-6 * scale, msg=name)
        assert float((ours.double() - reference).abs().max()) <= 1e-4 * scale, name


def test_a_training_step_has_the_same_gradients_with_and_without_the_kernel(kernel):
    model = randomize_(RWKVGenerator(tiny_config(conditioned=True)), seed=6)
    token_ids = torch.randint(0, VOCAB_SIZE, (3, 150), generator=torch.Generator().manual_seed(6))
    cond = torch.randn(3, model.config.cond_in_dim)
    gradients = []
    for use_kernel in (True, False):
        model.use_wkv_kernel(use_kernel).zero_grad()
        logits, _ = model(token_ids, cond=cond)
        logits.logsumexp(-1).mean().backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, with_kernel in gradients[0].items():
        reference = gradients[1][name]
        torch.testing.assert_close(with_kernel, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()),
                                   msg=name)


def test_without_a_compiler_the_model_falls_back_to_the_torch_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached: a build is needed
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    model = randomize_(RWKVGenerator(tiny_config(conditioned=False)), seed=7)
    token_ids = torch.randint(0, VOCAB_SIZE, (2, 40))
    wkv_kernel.forget()
    try:
        with pytest.warns(RuntimeWarning, match="CPU WKV kernel is not available .*no-such-compiler"):
            logits, _ = model(token_ids)
        assert wkv_kernel.library() is None and "no-such-compiler" in wkv_kernel.problem()
        logits.logsumexp(-1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        with torch.no_grad():
            assert torch.equal(logits, model.use_wkv_kernel(False)(token_ids)[0])
    finally:
        wkv_kernel.forget()
    assert not list(tmp_path.glob("*.so"))
