"""`cmi-daemon bench`: the loaded model's speed and memory on this machine, with real songs.

Reports prefill tokens/s, decode tokens/s (one graph call per step, batch 1 and 4, over the
rows one piano track allows and over the whole head), end-to-end latency p50/p95 of 2- and
4-bar infills with 8 bars of context each side, the peak resident memory, and BlinkDL's `rwkv`
package decoding the same generator weights when it is installed. Every figure is the fastest
of several runs (the machine may be shared); the load average is printed with the machine.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort

from ..errors import CMIError
from ..inference.controls import CONTEXT_BARS
from ..inference.engine import Engine, InfillOptions
from ..inference.measure import BENCH_SONGS_DIR, cpu_model, fastest_s, latency_requests, peak_rss_mb, song_files
from ..inference.sampling import AnswerRows
from ..music.annotations import bar_lines_qn
from ..music.tokens import read_midi, tokenize

BLANK_WIDTHS_BARS = (2, 4)
PREFILL_TOKENS = 1024
DECODE_STEPS = 64
LATENCY_SEED = 1


def rwkv_package_decode(engine: Engine, token_ids: list[int], repeats: int) -> Optional[tuple[str, float]]:
    """(version, decode tokens/s at batch 1) of rwkv.model.RWKV on the bundle's generator weights, or None."""
    try:
        from importlib.metadata import version

        from safetensors.torch import load_file

        from ..model.rwkv import rwkv_package_model
        model = rwkv_package_model(load_file(str(engine.bundle.file("generator.safetensors"))))
    except ImportError:
        return None

    def decode():
        state = None
        for token_id in token_ids:
            _, state = model.forward([token_id], state)

    return version("rwkv"), len(token_ids) / fastest_s(decode, repeats)


def run(model_dir, songs_dir: Optional[Path], repeats: int) -> None:
    started = time.perf_counter()
    engine = Engine(model_dir)
    load_s = time.perf_counter() - started
    generator = engine.config.generator
    print(f"command: cmi-daemon {' '.join(sys.argv[1:])}")
    print(f"machine: {cpu_model()}, {os.cpu_count()} logical cores, load average {os.getloadavg()[0]:.1f}, "
          f"python {platform.python_version()}, onnxruntime {ort.__version__} ({engine.providers[0]}, "
          f"{engine.intra_op_threads} intra-op threads)")
    print(f"model: {engine.bundle.path} ({generator.n_layer} x {generator.n_embd} generator, "
          f"{'conditioned' if engine.bundle.conditioned else 'unconditioned'}), loaded in {load_s:.2f} s")
    print(f"timings: fastest of {repeats} runs after a warm-up")

    songs_dir = songs_dir or BENCH_SONGS_DIR
    paths = song_files(songs_dir)
    if not paths:
        raise CMIError(f"no .mid files under {songs_dir}: pass --songs DIR, a folder of .mid files")
    songs = [read_midi(path) for path in paths]
    real_ids = [t for song in songs for t in tokenize(engine.bundle.tokenizer.model_song(song)).ids]
    cond = np.zeros((1, generator.cond_in_dim), np.float32) if engine.bundle.conditioned else None
    rows = AnswerRows([8])
    piano_rows = np.ascontiguousarray(engine.head[rows.token_ids])

    prompt = real_ids[:PREFILL_TOKENS]
    prefill_s = fastest_s(lambda: engine.prefill(prompt, piano_rows, cond), repeats)
    print(f"prefill ({len(prompt)} real tokens, chunks of {engine.chunk_tokens}): "
          f"{len(prompt) / prefill_s:,.0f} tokens/s")

    decode_ids = real_ids[PREFILL_TOKENS:PREFILL_TOKENS + DECODE_STEPS]
    decode_tokens_per_s = {}
    for head_name, head_rows in (("piano rows", piano_rows), ("whole head", engine.head)):
        for batch_size in (1, 4):
            batch_cond = None if cond is None else np.repeat(cond, batch_size, axis=0)

            def decode():
                state = engine.empty_state(batch_size)
                for token_id in decode_ids:
                    _, state = engine.step(np.full(batch_size, token_id), state, head_rows, batch_cond)

            tokens_per_s = batch_size * len(decode_ids) / fastest_s(decode, repeats)
            decode_tokens_per_s[head_name, batch_size] = tokens_per_s
            print(f"decode step, {head_name} ({len(head_rows):,} rows), batch {batch_size}: "
                  f"{tokens_per_s:,.0f} tokens/s")

    bar_lines = [bar_lines_qn(song, path)[0] for song, path in zip(songs, paths)]
    for width in BLANK_WIDTHS_BARS:
        for n_candidates in ((1, 4) if width == max(BLANK_WIDTHS_BARS) else (1,)):
            compare = width == max(BLANK_WIDTHS_BARS) and n_candidates == 1
            totals_ms, free_totals_ms, answer_tokens, decode_ms = [], [], 0, 0.0
            for song, lines in zip(songs, bar_lines):
                for window, start_qn, end_qn in latency_requests(song, lines, width):
                    targets = [i for i, track in enumerate(window.tracks) if track.notes]
                    options = InfillOptions(n_candidates=n_candidates, seed=LATENCY_SEED)
                    result = engine.infill(window, start_qn, end_qn, targets, options)
                    totals_ms.append(result.timings_ms["total"])
                    answer_tokens += sum(c.n_tokens for c in result.candidates)
                    decode_ms += result.timings_ms["decode"]
                    if compare:  # the same request without the per-track controls, right after it
                        free = engine.infill(window, start_qn, end_qn, targets, replace(options, controls=None))
                        free_totals_ms.append(free.timings_ms["total"])
            if not totals_ms:
                print(f"{width}-bar infill: no song has {width + 2 * CONTEXT_BARS} bars")
                continue
            p50, p95 = np.percentile(totals_ms, [50, 95])
            print(f"{width}-bar infill, {CONTEXT_BARS} bars of context each side, {n_candidates} candidate(s), "
                  f"{len(totals_ms)} infills on {len(songs)} songs: p50 {p50:,.0f} ms, p95 {p95:,.0f} ms "
                  f"(decoding incl. sampling {answer_tokens / (decode_ms / 1000):,.0f} tokens/s)")
            if free_totals_ms:
                free_p50 = float(np.percentile(free_totals_ms, 50))
                print(f"  the same infills without per-track controls: p50 {free_p50:,.0f} ms; with / without "
                      f"{p50 / free_p50:.2f}")
    print(f"peak memory (RSS high-water mark): {peak_rss_mb():,.0f} MB")

    peer = rwkv_package_decode(engine, decode_ids, repeats)
    if peer is None:
        print("rwkv package: not installed (pip install rwkv) — no comparison")
        return
    rwkv_version, rwkv_tokens_per_s = peer
    ours = {head_name: tokens_per_s for (head_name, batch_size), tokens_per_s in decode_tokens_per_s.items()
            if batch_size == 1}
    print(f"rwkv package {rwkv_version} ('cpu fp32', JIT {os.environ['RWKV_JIT_ON']}, same generator weights "
          f"without conditioning), batch 1: {rwkv_tokens_per_s:,.0f} tokens/s; ratio ours/rwkv: "
          f"{ours['piano rows'] / rwkv_tokens_per_s:.2f} (piano rows), {ours['whole head'] / rwkv_tokens_per_s:.2f} "
          f"(whole head, same work)")
