"""Command line of the exporter: `python -m export CHECKPOINT --out DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cmi_daemon.inference.bundle import load_bundle
from export.bundle import write_bundle
from export.checkpoint import CheckpointError, read_checkpoint, shard_summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export",
                                     description="Turn a training checkpoint into a model bundle folder.")
    parser.add_argument("checkpoint", type=Path, help="training.train's best.pt (stage 2) or the simple dict")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (replaced if it exists)")
    parser.add_argument("--jepa", type=Path, help="stage-1 checkpoint (default: the one named in the checkpoint)")
    parser.add_argument("--shards", type=Path,
                        help="token shard folder whose manifest.json describes the training data")
    parser.add_argument("--context-tokens", type=int, help="context window in tokens (default: the training window)")
    args = parser.parse_args(argv)
    try:
        checkpoint = read_checkpoint(args.checkpoint, args.jepa)
        summary = shard_summary(args.shards) if args.shards else None
    except CheckpointError as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    out_dir = write_bundle(checkpoint, args.out, args.context_tokens, summary, source=args.checkpoint.name)
    bundle = load_bundle(out_dir)
    sizes = ", ".join(f"{name} {bundle.file(name).stat().st_size / 1e6:.1f} MB"
                      for name in sorted(bundle.manifest["files"]))
    print(f"wrote {out_dir}: {sizes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
