"""RWKV-4 generator with JEP conditioning, in the public RWKV-4 checkpoint layout.

One definition runs two ways that compute the same function:
- `forward`: a whole (B, T) batch at once, for training and prompt prefill. On the CPU the WKV
  recurrence runs in a C++ kernel (wkv_kernel, wkv_cpu.cpp) with its own backward; elsewhere,
  when the kernel cannot be built, under ONNX export and when gradients must reach the carried-in
  state, it is evaluated chunk by chunk: inside a chunk with (T x T) log-space weights, across
  chunks through the carried state. No Python loop per token either way.
- `step`: one token per sequence, (B,) -> (B, V), for decoding; plain tensors in and out so
  it exports to ONNX.

The recurrent state is one tensor (n_layer, 5, B, C): per layer the previous ln1 output (time
mix token shift), aa, bb, pp (the WKV numerator, denominator and their shared log-scale, as in
BlinkDL's implementation: numerator = aa * exp(pp)), and the previous ln2 output (channel mix
token shift). It is always float32.

Conditioning (JEP-AGA): the conditioning vector (B, cond_in_dim) is projected to cond_dim,
concatenated to every token embedding and projected back to n_embd before the first block.
The embedding is fused after block 0's ln0, at unit scale: RWKV's embeddings start at 1e-4,
so fused before ln0 any conditioning would drown the tokens and ln0 would amplify its
gradients ten-thousandfold. The back-projection starts as [I | 0], so a freshly conditioned
generator computes exactly what the unconditioned one does (and a public checkpoint loads
unchanged). The conditioning vector is standardised first, per dimension, with the mean and
std of the training data's vectors (buffers `cond_mean`, `cond_inv_std`, set once before
stage 2 by `standardize_conditioning`): JEPA vectors of different blanks share most of their
direction (cosine ~0.99), and unstandardised their differences are too small for the
generator to learn to read in a short run.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from cmi_daemon.model import wkv_kernel
from cmi_daemon.model.config import GeneratorConfig
from cmi_daemon.music.vocab import PUBLIC_VOCAB_SIZE, VOCAB_SIZE

WKV_CHUNK_LEN = 16
"""Tokens per chunk of the parallel WKV: memory grows with B * T * chunk * C."""
N_STATE_FIELDS = 5
ATT_X, ATT_AA, ATT_BB, ATT_PP, FFN_X = range(N_STATE_FIELDS)
EMPTY_LOG_SCALE = -1e30
"""pp of an empty state: exp(pp) is 0, so aa and bb contribute nothing."""
COND_STD_FLOOR_FRACTION = 0.1
"""Each conditioning dimension's std is floored at this fraction of the mean std over dimensions,
so a dimension that hardly varies in the training data is not amplified without bound (DIL moves
the vectors in directions the data may not)."""
NEW_TOKEN_NOISE_STD = 0.01
"""Std of the noise on new infilling-token rows, relative to the existing rows' per-column std."""


def wkv_step(w, u, k, v, aa, bb, pp):
    """One token of the WKV recurrence for (B, C) inputs; w = -exp(time_decay), u = time_first.

    Returns (wkv, aa, bb, pp) with the state advanced past this token.
    """
    now = u + k
    scale = torch.maximum(pp, now)
    e_past, e_now = torch.exp(pp - scale), torch.exp(now - scale)
    wkv = (e_past * aa + e_now * v) / (e_past * bb + e_now)
    decayed = w + pp
    new_pp = torch.maximum(decayed, k)
    e_past, e_now = torch.exp(decayed - new_pp), torch.exp(k - new_pp)
    return wkv, e_past * aa + e_now * v, e_past * bb + e_now, new_pp


def wkv_chunked(w, u, k, v, aa, bb, pp, chunk_len: int = WKV_CHUNK_LEN):
    """WKV over a sequence: k, v (B, T, C) float32, state (B, C) -> (wkv (B, T, C), aa, bb, pp).

    Output t of a chunk is sum_i exp(logw[t, i]) v_i / sum_i exp(logw[t, i]) over the chunk's
    earlier tokens i (logw = w * (t - 1 - i) + k_i), the token itself (u + k_t) and the carried
    state (w * t + pp, weights aa / bb). Each row is scaled by its own maximum before exp, the
    same stabilisation as the recurrent form, so nothing overflows for any decay.
    """
    chunk_len = min(chunk_len, k.shape[1])
    pos = torch.arange(chunk_len, device=k.device, dtype=k.dtype)
    lag = (pos[:, None] - pos[None, :] - 1)[..., None]              # (t, i, 1): t - 1 - i
    # Log-weight of token i in output t, before adding k_i; a shorter chunk uses the top-left.
    pair_logw = torch.where(lag >= 0, w * lag, torch.where(lag == -1, u, torch.full_like(u, -math.inf)))
    outputs = []
    for start in range(0, k.shape[1], chunk_len):
        k_chunk, v_chunk = k[:, start:start + chunk_len], v[:, start:start + chunk_len]
        n_tokens = k_chunk.shape[1]
        pos = pos[:n_tokens]
        logw = pair_logw[:n_tokens, :n_tokens] + k_chunk[:, None]   # (B, t, i, C)
        state_logw = w * pos[:, None] + pp[:, None]                  # (B, t, C)
        scale = torch.maximum(logw.amax(2), state_logw).detach()
        e_pairs, e_state = torch.exp(logw - scale[:, :, None]), torch.exp(state_logw - scale)
        numerator = (e_pairs * v_chunk[:, None]).sum(2) + e_state * aa[:, None]
        denominator = e_pairs.sum(2) + e_state * bb[:, None]
        outputs.append(numerator / denominator)

        end_logw = w * (n_tokens - 1 - pos)[:, None] + k_chunk       # (B, i, C)
        carry_logw = w * n_tokens + pp
        new_pp = torch.maximum(end_logw.amax(1), carry_logw).detach()
        e_tokens, e_carry = torch.exp(end_logw - new_pp[:, None]), torch.exp(carry_logw - new_pp)
        aa = (e_tokens * v_chunk).sum(1) + e_carry * aa
        bb = e_tokens.sum(1) + e_carry * bb
        pp = new_pp
    return torch.cat(outputs, dim=1), aa, bb, pp


def token_shift(xx, x_prev):
    """The previous token's input: x_prev for a step (B, C); shifted sequence for (B, T, C)."""
    if xx.dim() == 2:
        return x_prev
    return torch.cat([x_prev[:, None].to(xx.dtype), xx[:, :-1]], dim=1)


def lerp_mix(xx, shifted, mix):
    """xx * mix + shifted * (1 - mix), mix shaped (1, 1, C) as in the checkpoints."""
    mix = mix.view(-1)
    return xx * mix + shifted * (1 - mix)


class TimeMix(nn.Module):
    """RWKV-4 'att': token-shifted r, k, v and the WKV weighted average with per-channel decay."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.time_mix_v = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.time_decay = nn.Parameter(torch.zeros(n_embd))  # raw: log decay per step is -exp()
        self.time_first = nn.Parameter(torch.zeros(n_embd))  # log-weight bonus of the current token
        self.key = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(n_embd, n_embd, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.output = nn.Linear(n_embd, n_embd, bias=False)
        self.use_kernel = True  # sequences go through the CPU WKV kernel where it applies

    def forward(self, xx, x_prev, aa, bb, pp, chunk_len: int = WKV_CHUNK_LEN):
        """xx: ln1 output, (B, T, C) or one step (B, C). Returns (out, last xx, aa, bb, pp)."""
        shifted = token_shift(xx, x_prev)
        r = torch.sigmoid(self.receptance(lerp_mix(xx, shifted, self.time_mix_r)))
        k = self.key(lerp_mix(xx, shifted, self.time_mix_k)).float()
        v = self.value(lerp_mix(xx, shifted, self.time_mix_v)).float()
        w, u = -torch.exp(self.time_decay.float()), self.time_first.float()
        if xx.dim() == 2:
            wkv, aa, bb, pp = wkv_step(w, u, k, v, aa, bb, pp)
            last_xx = xx
        else:
            with torch.autocast(device_type=xx.device.type, enabled=False):
                if self.use_kernel and wkv_kernel.applicable(k, aa, bb, pp):
                    wkv, aa, bb, pp = wkv_kernel.WKV.apply(w, u, k, v, aa, bb, pp)
                else:
                    wkv, aa, bb, pp = wkv_chunked(w, u, k, v, aa, bb, pp, chunk_len)
            last_xx = xx[:, -1]
        return self.output(r * wkv.to(r.dtype)), last_xx, aa, bb, pp


class ChannelMix(nn.Module):
    """RWKV-4 'ffn': token-shifted squared-ReLU MLP (hidden 4C) gated by a sigmoid receptance."""

    def __init__(self, n_embd: int):
        super().__init__()
        self.time_mix_k = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.time_mix_r = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.key = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.receptance = nn.Linear(n_embd, n_embd, bias=False)
        self.value = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, xx, x_prev):
        """xx: ln2 output, (B, T, C) or (B, C). Returns (out, last xx)."""
        shifted = token_shift(xx, x_prev)
        hidden = torch.relu(self.key(lerp_mix(xx, shifted, self.time_mix_k))) ** 2
        r = torch.sigmoid(self.receptance(lerp_mix(xx, shifted, self.time_mix_r)))
        return r * self.value(hidden), (xx if xx.dim() == 2 else xx[:, -1])


class Block(nn.Module):
    """One RWKV-4 layer; block 0 also owns ln0, which the generator applies to the embedding."""

    def __init__(self, n_embd: int, layer_id: int):
        super().__init__()
        self.ln0 = nn.LayerNorm(n_embd) if layer_id == 0 else None
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.att = TimeMix(n_embd)
        self.ffn = ChannelMix(n_embd)

    def forward(self, x, layer_state, chunk_len: int = WKV_CHUNK_LEN):
        """x (B, T, C) or (B, C); layer_state (5, B, C) -> (x, new layer_state)."""
        att_out, att_x, aa, bb, pp = self.att(self.ln1(x), layer_state[ATT_X], layer_state[ATT_AA],
                                              layer_state[ATT_BB], layer_state[ATT_PP], chunk_len)
        x = x + att_out
        ffn_out, ffn_x = self.ffn(self.ln2(x), layer_state[FFN_X])
        x = x + ffn_out
        new_state = torch.stack([att_x.float(), aa, bb, pp, ffn_x.float()])
        return x, new_state


class RWKVGenerator(nn.Module):
    """RWKV-4 language model over the 20,099-id vocabulary, optionally JEP-conditioned."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        c = config.n_embd
        self.emb = nn.Embedding(config.vocab_size, c)
        if config.conditioned:
            self.register_buffer("cond_mean", torch.zeros(config.cond_in_dim))
            self.register_buffer("cond_inv_std", torch.ones(config.cond_in_dim))
            self.cond_proj = nn.Linear(config.cond_in_dim, config.cond_dim)
            self.cond_fuse = nn.Linear(c + config.cond_dim, c)
        self.blocks = nn.ModuleList(Block(c, layer_id) for layer_id in range(config.n_layer))
        self.ln_out = nn.LayerNorm(c)
        self.head = nn.Linear(c, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """Fresh weights in the spirit of BlinkDL's RWKV-4 init; fusion as the identity."""
        n_layer, c = self.config.n_layer, self.config.n_embd
        channel = torch.arange(c, dtype=torch.float32) / c
        for layer_id, block in enumerate(self.blocks):
            depth = layer_id / max(n_layer - 1, 1)          # 0 at the bottom .. 1 at the top
            shallowness = 1.0 - layer_id / n_layer          # 1 at the bottom .. ~0 at the top
            att, ffn = block.att, block.ffn
            with torch.no_grad():
                # Decay rates spread from slow to fast over channels; more fast ones higher up.
                att.time_decay.copy_(-5 + 8 * (torch.arange(c) / max(c - 1, 1)) ** (0.7 + 1.3 * depth))
                zigzag = ((torch.arange(c) + 1) % 3 - 1) * 0.5
                att.time_first.copy_(math.log(0.3) + zigzag)
                att.time_mix_k.copy_((channel ** shallowness).view(1, 1, c))
                att.time_mix_v.copy_((channel ** shallowness + 0.3 * depth).view(1, 1, c))
                att.time_mix_r.copy_((channel ** (0.5 * shallowness)).view(1, 1, c))
                ffn.time_mix_k.copy_((channel ** shallowness).view(1, 1, c))
                ffn.time_mix_r.copy_((channel ** shallowness).view(1, 1, c))
            for linear in (att.key, att.receptance, att.output, ffn.receptance, ffn.value):
                nn.init.zeros_(linear.weight)
            for linear in (att.value, ffn.key):
                nn.init.orthogonal_(linear.weight)
        nn.init.uniform_(self.emb.weight, -1e-4, 1e-4)
        nn.init.orthogonal_(self.head.weight, gain=0.5 * math.sqrt(self.config.vocab_size / c))
        if self.config.conditioned:
            self.reset_fusion()

    def reset_fusion(self):
        """Back-projection [I | 0] with zero bias: conditioning starts with no effect at all."""
        c = self.config.n_embd
        with torch.no_grad():
            self.cond_fuse.weight.zero_()
            self.cond_fuse.weight[:, :c].copy_(torch.eye(c))
            self.cond_fuse.bias.zero_()

    @torch.no_grad()
    def standardize_conditioning(self, vectors: torch.Tensor) -> None:
        """Set the standardisation from sample conditioning vectors (N, cond_in_dim) of training data."""
        std = vectors.std(dim=0)
        self.cond_mean.copy_(vectors.mean(dim=0))
        self.cond_inv_std.copy_(1.0 / std.clamp(min=COND_STD_FLOOR_FRACTION * float(std.mean())))

    def use_wkv_kernel(self, enabled: bool) -> "RWKVGenerator":
        """Whether sequences use the CPU WKV kernel where it applies (default) or always wkv_chunked."""
        for block in self.blocks:
            block.att.use_kernel = enabled
        return self

    def empty_state(self, batch_size: int, device=None) -> torch.Tensor:
        """State before any token: zeros, and pp = EMPTY_LOG_SCALE."""
        state = torch.zeros(self.config.n_layer, N_STATE_FIELDS, batch_size, self.config.n_embd,
                            device=device if device is not None else self.emb.weight.device)
        state[:, ATT_PP] = EMPTY_LOG_SCALE
        return state

    def embed(self, token_ids, cond=None):
        """Layer-normed token embeddings, fused with the projected conditioning vector (B, cond_in_dim)."""
        x = self.blocks[0].ln0(self.emb(token_ids))
        if not self.config.conditioned:
            return x
        if cond is None:
            raise ValueError("this generator is conditioned: pass cond, the (B, cond_in_dim) "
                             "mean of predictor outputs over the blank (jepa.conditioning_vector)")
        projected = self.cond_proj((cond - self.cond_mean) * self.cond_inv_std)
        if x.dim() == 3:
            projected = projected[:, None].expand(-1, x.shape[1], -1)
        return self.cond_fuse(torch.cat([x, projected.to(x.dtype)], dim=-1))

    def hidden(self, token_ids, state, cond=None, chunk_len: int = WKV_CHUNK_LEN):
        """The generator without its head: token_ids (B,) or (B, T) -> (ln_out output, new state).

        Training applies the head itself (training.losses), to the positions it trains on.
        """
        x = self.embed(token_ids, cond)
        new_states = []
        for layer_id, block in enumerate(self.blocks):
            x, layer_state = block(x, state[layer_id], chunk_len)
            new_states.append(layer_state)
        return self.ln_out(x), torch.stack(new_states)

    def forward(self, token_ids, state=None, cond=None, chunk_len: int = WKV_CHUNK_LEN):
        """Parallel mode: token_ids (B, T) -> (logits (B, T, V), state after the last token).

        state: (n_layer, 5, B, C) to continue from (None: empty); cond: (B, cond_in_dim).
        """
        if state is None:
            state = self.empty_state(token_ids.shape[0], token_ids.device)
        hidden, state = self.hidden(token_ids, state, cond, chunk_len)
        return self.head(hidden), state

    def step(self, token_ids, state, cond=None):
        """Recurrent mode: token_ids (B,) -> (logits (B, V), new state)."""
        hidden, state = self.hidden(token_ids, state, cond)
        return self.head(hidden), state


def load_blinkdl_checkpoint(path, conditioned: bool = False, cond_in_dim: int = 512,
                            cond_dim: int = 32, ctx_len: int = 4096, seed: int = 0) -> RWKVGenerator:
    """A generator from a public RWKV-4 (music) `.pth` in BlinkDL's layout.

    Weights are read with torch.load(weights_only=True) and converted to float32. Sizes come
    from the tensors. The public vocabulary has 20,096 rows; the three infilling tokens
    (<mask>, <sep>, <ans>) get new rows in emb and head: the mean of the existing rows plus
    Gaussian noise of NEW_TOKEN_NOISE_STD times the rows' per-column std (seeded by `seed`), so
    they start as "an average token", distinct from each other. A conditioned generator
    starts with [I | 0] fusion and so computes exactly the public model's logits.
    """
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    weights = {name: tensor.float() for name, tensor in checkpoint.items()}
    n_vocab_rows, n_embd = weights["emb.weight"].shape
    n_layer = 1 + max(int(name.split(".")[1]) for name in weights if name.startswith("blocks."))
    if n_vocab_rows != PUBLIC_VOCAB_SIZE:
        raise ValueError(f"{path}: emb has {n_vocab_rows} rows, expected {PUBLIC_VOCAB_SIZE} "
                         "(a public RWKV-4-MIDI checkpoint); is this the right file?")
    generator = torch.Generator().manual_seed(seed)
    n_new = VOCAB_SIZE - PUBLIC_VOCAB_SIZE
    for name in ("emb.weight", "head.weight"):
        rows = weights[name]
        noise = torch.randn(n_new, n_embd, generator=generator) * rows.std(0) * NEW_TOKEN_NOISE_STD
        weights[name] = torch.cat([rows, rows.mean(0, keepdim=True) + noise])
    config = GeneratorConfig(n_layer=n_layer, n_embd=n_embd, ctx_len=ctx_len, conditioned=conditioned,
                             cond_in_dim=cond_in_dim, cond_dim=cond_dim)
    model = RWKVGenerator(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not name.startswith("cond_")]
    if missing or unexpected:
        raise ValueError(f"{path} is not an RWKV-4 checkpoint in BlinkDL's layout: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def rwkv_package_model(weights: dict):
    """BlinkDL's `rwkv` package (rwkv.model.RWKV, 'cpu fp32') running these generator weights
    (BlinkDL's layout, as float32; the conditioning weights, which it has no place for, left out):
    the reference the generator is checked and timed against. ImportError when the package is not
    installed. The package reads its switches from the environment when rwkv.model is first
    imported: its TorchScript path unless RWKV_JIT_ON says otherwise, never its CUDA kernel, and no
    layer rescaling (the music models run without)."""
    os.environ.setdefault("RWKV_JIT_ON", "1")
    os.environ["RWKV_CUDA_ON"] = "0"
    os.environ["RWKV_RESCALE_LAYER"] = "999"
    from rwkv.model import RWKV

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "generator.pth"
        torch.save({name: tensor.float().cpu() for name, tensor in weights.items() if not name.startswith("cond_")},
                   path)
        return RWKV(str(path), "cpu fp32", verbose=False)
