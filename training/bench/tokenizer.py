"""Tokenizer throughput: notes/s and files/s reading, tokenizing and decoding a folder of MIDI files.

    python -m training.bench_tokenizer [--data ../shared/data/pop909/dev]

Reports against a reference measured in the same run: mido alone parsing the same files.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
from pathlib import Path

import mido

from cmi_daemon.inference.measure import cpu_model, fastest_s
from cmi_daemon.music.tokens import decode_ids, read_midi, tokenize

DEFAULT_DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "pop909" / "dev"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder searched for *.mid")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after a warm-up; the fastest is reported")
    args = parser.parse_args(argv)
    files = sorted(args.data.rglob("*.mid"))
    if not files:
        raise SystemExit(f"no .mid files under {args.data}")
    contents = [f.read_bytes() for f in files]

    mido_s = fastest_s(lambda: [mido.MidiFile(file=io.BytesIO(c)) for c in contents], args.repeats)
    read_s = fastest_s(lambda: [read_midi(c) for c in contents], args.repeats)
    songs = [read_midi(c) for c in contents]
    encode_s = fastest_s(lambda: [tokenize(s) for s in songs], args.repeats)
    encodings = [tokenize(s) for s in songs]
    decode_s = fastest_s(lambda: [decode_ids(e.ids) for e in encodings], args.repeats)
    n_notes = sum(len(e.notes) for e in encodings)
    n_tokens = sum(len(e.ids) for e in encodings)

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: python -m training.bench_tokenizer --data {args.data}")
    print(f"data: {len(files)} files, {n_notes} notes, {n_tokens} tokens (best of {args.repeats})")
    total_s = read_s + encode_s
    print(f"file -> tokens: {len(files) / total_s:8.1f} files/s {n_notes / total_s:10.0f} notes/s "
          f"({read_s:.2f} s read + {encode_s:.2f} s tokenize)")
    print(f"tokens -> notes: {n_tokens / decode_s:10.0f} tokens/s {n_notes / decode_s:10.0f} notes/s")
    print(f"reference, mido parsing alone: {mido_s:.2f} s; file -> tokens takes {total_s / mido_s:.2f}x that")


if __name__ == "__main__":
    main()
