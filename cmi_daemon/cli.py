"""The `cmi-daemon` command: one entry point whose subcommands musicians and developers run."""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from . import __version__, vocab
from .errors import CMIError
from .tokens import read_midi, tokenize


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60.0)
    return f"{int(minutes)}:{seconds:04.1f}"


def command_tokens(args) -> int:
    """Print a MIDI file's tokens (text form or ids), their counts and the song's duration."""
    song = read_midi(args.file)
    encoding = tokenize(song)
    ids = encoding.ids
    counts = Counter("wait" if vocab.is_wait(t) else
                     ("note-on" if vocab.note_fields(t)[2] else "note-off") for t in ids)
    duration_s = sum(vocab.wait_steps(t) for t in ids) * vocab.WAIT_STEP_MS / 1000.0
    if not args.summary:
        shown = ids if args.limit is None else ids[:args.limit]
        print(" ".join(str(t) for t in shown) if args.ids else vocab.ids_to_text(shown))
    out = sys.stderr if not args.summary else sys.stdout
    print(f"file: {args.file}", file=out)
    print(f"tracks: {len(song.tracks)}  notes: {len(encoding.notes)}  "
          f"duration: {_format_duration(duration_s)} (first to last event)", file=out)
    print(f"tokens: {len(ids)}  note-on: {counts['note-on']}  note-off: {counts['note-off']}  "
          f"wait: {counts['wait']}", file=out)
    for reason, count in sorted(encoding.drops.items()):
        print(f"dropped: {count} notes, {reason}", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmi-daemon",
        description="CMI, the Collaborative Music Inpainter: infill selected bars of MIDI from your DAW.")
    parser.add_argument("--version", action="version", version=f"cmi-daemon {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    tokens = commands.add_parser("tokens", help="show the tokens of a MIDI file",
                                 description=command_tokens.__doc__)
    tokens.add_argument("file", help="a .mid file")
    tokens.add_argument("--ids", action="store_true", help="print token ids instead of their text form")
    tokens.add_argument("--limit", type=int, metavar="N", help="print only the first N tokens")
    tokens.add_argument("--summary", action="store_true", help="print only the counts, on stdout")
    tokens.set_defaults(run=command_tokens)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CMIError as error:
        print(f"cmi-daemon: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
