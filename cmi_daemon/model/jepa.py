"""JEPA half of JEP-AGA: context encoder, EMA target encoder, predictor, loss and conditioning.

Shapes: B sequences of N tokens; E = encoder width; positions index into the full sequence.
- The context encoder sees only context tokens, gathered to the front with their true
  positions (a sinusoidal position embedding is added, which the authors' code forgot).
- The predictor maps encoder outputs to its own width, appends a learned mask token (plus
  position embedding) for each target position, and projects back to E at those positions.
- Loss (I-JEPA): smooth-L1 per target position between the predictor outputs and the
  LayerNorm-ed target-encoder outputs of the whole sequence; the target encoder follows the
  context encoder by EMA.
- The generator's conditioning vector is the mean of predictor outputs over the blank.
Padding is PAD_ID and never attended to.

Attention is torch's fused scaled_dot_product_attention, except in the exported graphs, which
compute it one head at a time (SelfAttention.one_head_at_a_time): traced to ONNX, the fused
call becomes (B, heads, N, N) float scores and their copies (mask added, softmax), which held
120-188 MiB of ONNX Runtime's arena at full windows of the default model; head by head, ONNX
Runtime reuses one head's buffers for the next (13 MiB; docs/measurements.md).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from cmi_daemon.model.config import EncoderConfig, PredictorConfig
from cmi_daemon.music.vocab import PAD_ID

EMA_MOMENTUM_START = 0.996
EMA_MOMENTUM_END = 1.0


def sinusoid_table(max_len: int, dim: int) -> torch.Tensor:
    """(max_len, dim) fixed position embeddings: sin on even, cos on odd channels."""
    position = torch.arange(max_len, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class SelfAttention(nn.Module):
    def __init__(self, dim: int, n_head: int):
        super().__init__()
        if dim % n_head:
            raise ValueError(f"width {dim} is not divisible by {n_head} heads")
        self.n_head = n_head
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.one_head_at_a_time = False
        """Attend with attention_one_head_at_a_time instead of the fused kernel (set while exporting)."""

    def forward(self, x, key_valid):
        """x (B, N, D); key_valid (B, N) bool: which tokens may be attended to."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)
        # A sequence with no valid token at all attends to everything instead of producing NaN.
        key_valid = key_valid | ~key_valid.any(dim=1, keepdim=True)
        if self.one_head_at_a_time:
            y = attention_one_head_at_a_time(q, k, v, key_valid)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :])
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


def attention_one_head_at_a_time(q, k, v, key_valid):
    """scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :]) for q, k, v
    (B, H, N, d) and key_valid (B, N) with a valid key in every row, each head's (B, N, N) scores
    computed, softmaxed and applied to its values before the next head's."""
    masked = torch.zeros_like(key_valid, dtype=q.dtype).masked_fill(~key_valid, float("-inf"))[:, None, :]
    scale = q.shape[-1] ** -0.5
    heads = [torch.softmax((q[:, head] * scale) @ k[:, head].transpose(1, 2) + masked, dim=-1) @ v[:, head]
             for head in range(q.shape[1])]
    return torch.stack(heads, dim=1)


class MLP(nn.Module):
    def __init__(self, dim: int, ffn_ratio: int):
        super().__init__()
        self.fc = nn.Linear(dim, ffn_ratio * dim)
        self.proj = nn.Linear(ffn_ratio * dim, dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-LN Transformer layer."""

    def __init__(self, dim: int, n_head: int, ffn_ratio: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, n_head)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, ffn_ratio)

    def forward(self, x, key_valid):
        x = x + self.attn(self.ln1(x), key_valid)
        return x + self.mlp(self.ln2(x))


class ContextEncoder(nn.Module):
    """Token embedding + position embedding + Transformer; also the target encoder's shape."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.register_buffer("pos_table", sinusoid_table(config.max_len, config.n_embd), persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(config.n_embd, config.n_head, config.ffn_ratio)
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)

    def forward(self, token_ids, positions=None, valid=None):
        """token_ids (B, N) at positions (B, N) (default 0..N-1); valid (B, N) (default: not PAD).

        Returns (B, N, E). Outputs at invalid slots are meaningless.
        """
        if positions is None:
            positions = torch.arange(token_ids.shape[1], device=token_ids.device).expand_as(token_ids)
        if valid is None:
            valid = token_ids != PAD_ID
        x = self.tok_emb(token_ids) + self.pos_table[positions]
        for block in self.blocks:
            x = block(x, valid)
        return self.ln_f(x)


class Predictor(nn.Module):
    """Predicts encoder-space representations at target positions from context representations."""

    def __init__(self, config: PredictorConfig, enc_dim: int, max_len: int):
        super().__init__()
        self.config = config
        self.in_proj = nn.Linear(enc_dim, config.n_embd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        self.register_buffer("pos_table", sinusoid_table(max_len, config.n_embd), persistent=False)
        self.blocks = nn.ModuleList(TransformerBlock(config.n_embd, config.n_head, config.ffn_ratio)
                                    for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.out_proj = nn.Linear(config.n_embd, enc_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, context_repr, context_positions, context_valid, target_positions, target_valid):
        """context_repr (B, Nc, E) with positions/valid (B, Nc); targets (B, Nt) -> (B, Nt, E)."""
        context = self.in_proj(context_repr) + self.pos_table[context_positions]
        targets = self.mask_token + self.pos_table[target_positions]
        x = torch.cat([context, targets.to(context.dtype)], dim=1)
        valid = torch.cat([context_valid, target_valid], dim=1)
        for block in self.blocks:
            x = block(x, valid)
        return self.out_proj(self.ln_f(x[:, context_repr.shape[1]:]))


def gather_positions(mask):
    """Positions where mask (B, N) is True, moved to the front: (positions (B, M), valid (B, M)).

    M is the largest count in the batch; slots past a row's count are invalid (position 0).
    """
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.numel() else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    return torch.where(valid, order, torch.zeros_like(order)), valid


def conditioning_vector(predicted, target_valid):
    """Mean of predictor outputs (B, Nt, E) over the valid target slots -> (B, E)."""
    weights = target_valid.to(predicted.dtype)[..., None]
    return (predicted * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def ema_momentum(step: int, total_steps: int, start: float = EMA_MOMENTUM_START,
                 end: float = EMA_MOMENTUM_END) -> float:
    """Target-encoder momentum, linear from start at step 0 to end at total_steps."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return start + (end - start) * progress


class JEPA(nn.Module):
    """Context encoder + predictor (trained) and target encoder (EMA of the context encoder).

    Masks are (B, N) bool over the full token sequence: context_mask marks the visible context,
    target_mask the positions to predict (the blank). Tokens at target positions are never
    read by predict(), so a daemon may put anything there (e.g. for an empty selection).
    """

    def __init__(self, encoder_config: EncoderConfig, predictor_config: PredictorConfig):
        super().__init__()
        self.context_encoder = ContextEncoder(encoder_config)
        self.predictor = Predictor(predictor_config, encoder_config.n_embd, encoder_config.max_len)
        self.target_encoder = copy.deepcopy(self.context_encoder)
        self.target_encoder.requires_grad_(False)

    def encode_context(self, token_ids, context_mask):
        """-> (representations (B, Nc, E), positions (B, Nc), valid (B, Nc)) of the context only."""
        positions, valid = gather_positions(context_mask & (token_ids != PAD_ID))
        context_tokens = torch.where(valid, torch.gather(token_ids, 1, positions),
                                     torch.full_like(positions, PAD_ID))
        return self.context_encoder(context_tokens, positions, valid), positions, valid

    def predict(self, token_ids, context_mask, target_mask):
        """-> (predicted (B, Nt, E), target positions (B, Nt), target valid (B, Nt))."""
        context_repr, context_positions, context_valid = self.encode_context(token_ids, context_mask)
        target_positions, target_valid = gather_positions(target_mask)
        predicted = self.predictor(context_repr, context_positions, context_valid,
                                   target_positions, target_valid)
        return predicted, target_positions, target_valid

    def conditioning(self, token_ids, context_mask, target_mask):
        """The generator's conditioning vector (B, E): mean prediction over the blank."""
        predicted, _, target_valid = self.predict(token_ids, context_mask, target_mask)
        return conditioning_vector(predicted, target_valid)

    @torch.no_grad()
    def target_representations(self, token_ids):
        """Target-encoder outputs for whole sequences, LayerNorm-ed without affine: (B, N, E)."""
        encoded = self.target_encoder(token_ids)
        return F.layer_norm(encoded, (encoded.shape[-1],))

    def loss(self, token_ids, context_mask, target_mask):
        """I-JEPA loss: smooth-L1 per target position, averaged over valid target positions."""
        predicted, target_positions, target_valid = self.predict(
            token_ids, context_mask, target_mask & (token_ids != PAD_ID))
        targets = self.target_representations(token_ids)
        targets = torch.gather(targets, 1, target_positions[..., None].expand(-1, -1, targets.shape[-1]))
        per_position = F.smooth_l1_loss(predicted.float(), targets.float(), reduction="none").mean(-1)
        weights = target_valid.float()
        return (per_position * weights).sum() / weights.sum().clamp(min=1.0)

    @torch.no_grad()
    def update_target(self, momentum: float):
        """target <- momentum * target + (1 - momentum) * context, parameter by parameter."""
        for target, context in zip(self.target_encoder.parameters(), self.context_encoder.parameters()):
            target.mul_(momentum).add_(context.detach(), alpha=1.0 - momentum)
