"""Speed of the generator on this machine: training, prefill and decoding, against BlinkDL's `rwkv`.

    python -m training.bench_model [--preset small] [--batch 4] [--ctx 256]

Reports forward+backward training tokens/s, parallel prefill tokens/s, recurrent decode tokens/s
at batch 1 and 4, and the `rwkv` package's decode tokens/s on identical weights (its own
ScriptModule path, 'cpu fp32'), plus the ratio ours / rwkv.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
from torch.nn import functional as F

from cmi_daemon.inference.measure import cpu_model, fastest_s
from cmi_daemon.inference.device import choose_device, flush_denormals_in_this_thread
from cmi_daemon.model.config import preset
from cmi_daemon.model.rwkv import RWKVGenerator, rwkv_package_model
from cmi_daemon.music.vocab import FIRST_NOTE_ID, PUBLIC_VOCAB_SIZE


def perturb_(model, seed: int = 0):
    """Fresh init leaves several matrices at zero; noise makes every path do real work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator).to(p.device))
    return model


def bench_training(config, batch_size: int, ctx_len: int, repeats: int, device) -> float:
    model = perturb_(RWKVGenerator(config)).to(device).train()
    token_ids = torch.randint(FIRST_NOTE_ID, PUBLIC_VOCAB_SIZE, (batch_size, ctx_len + 1), device=device)
    cond = torch.randn(batch_size, config.cond_in_dim, device=device)

    def forward_backward():
        logits, _ = model(token_ids[:, :-1], cond=cond)
        loss = F.cross_entropy(logits.flatten(0, 1), token_ids[:, 1:].flatten())
        model.zero_grad(set_to_none=True)
        loss.backward()

    return batch_size * ctx_len / fastest_s(forward_backward, repeats)


def bench_prefill(model, n_tokens: int, device) -> float:
    token_ids = torch.randint(FIRST_NOTE_ID, PUBLIC_VOCAB_SIZE, (1, n_tokens), device=device)
    with torch.inference_mode():
        return n_tokens / fastest_s(lambda: model(token_ids), 3)


def bench_decode(model, batch_size: int, n_tokens: int, device) -> float:
    token_ids = torch.randint(FIRST_NOTE_ID, PUBLIC_VOCAB_SIZE, (n_tokens, batch_size), device=device)

    def decode():
        state = model.empty_state(batch_size, device)
        for t in range(n_tokens):
            _, state = model.step(token_ids[t], state)

    with torch.inference_mode():
        return batch_size * n_tokens / fastest_s(decode, 3)


def bench_rwkv_package(model, n_tokens: int) -> tuple[float, float]:
    """(decode tokens/s of rwkv.model.RWKV on the same weights, max |logit difference|)."""
    peer = rwkv_package_model(model.state_dict())
    token_ids = torch.randint(FIRST_NOTE_ID, PUBLIC_VOCAB_SIZE, (n_tokens,)).tolist()

    def decode():
        state = None
        for token in token_ids:
            logits, state = peer.forward([token], state)
        return logits

    seconds = fastest_s(decode, 3)
    with torch.inference_mode():
        state = model.empty_state(1, torch.device("cpu"))
        for token in token_ids:
            ours, state = model.cpu().step(torch.tensor([token]), state)
    difference = (ours[0] - decode()).abs().max().item()
    return n_tokens / seconds, difference


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="model preset (default: small)")
    parser.add_argument("--batch", type=int, default=4, help="training batch size")
    parser.add_argument("--ctx", type=int, default=256, help="training sequence length in tokens")
    parser.add_argument("--train-repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=1024)
    parser.add_argument("--decode-tokens", type=int, default=100)
    args = parser.parse_args(argv)

    device = choose_device()
    flush_denormals_in_this_thread(device)
    config = preset(args.preset).generator
    print(f"command: python -m training.bench_model {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}, device {device}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("timings: fastest of 3 runs after a warm-up")
    print(f"generator '{args.preset}': {config.n_layer} layers x {config.n_embd}, "
          f"{sum(p.numel() for p in RWKVGenerator(config).parameters()) / 1e6:.1f}M parameters")

    tokens_per_s = bench_training(config, args.batch, args.ctx, args.train_repeats, device)
    print(f"training (forward+backward, conditioned, fp32), batch {args.batch} x {args.ctx}: "
          f"{tokens_per_s:,.0f} tokens/s")

    config.conditioned = False  # identical weights to what the rwkv package can load
    model = perturb_(RWKVGenerator(config)).to(device).eval()
    print(f"prefill (parallel, batch 1 x {args.prefill_tokens}): "
          f"{bench_prefill(model, args.prefill_tokens, device):,.0f} tokens/s")
    ours = {}
    for batch_size in (1, 4):
        ours[batch_size] = bench_decode(model, batch_size, args.decode_tokens, device)
        print(f"decode (recurrent step), batch {batch_size}: {ours[batch_size]:,.0f} tokens/s")
    theirs, difference = bench_rwkv_package(model, args.decode_tokens)
    print(f"rwkv package {_rwkv_version()} decode, batch 1, 'cpu fp32', JIT {os.environ['RWKV_JIT_ON']}: "
          f"{theirs:,.0f} tokens/s (max |logit diff| vs ours {difference:.1e})")
    print(f"ratio ours/rwkv at batch 1: {ours[1] / theirs:.2f}")


def _rwkv_version() -> str:
    from importlib.metadata import version
    return version("rwkv")


if __name__ == "__main__":
    main()
