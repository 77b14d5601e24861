"""What `cmi-daemon infill` shares offline and with `--daemon`: its generation flags (argparse types,
help with each default, checked by the daemon's own option validation against the same limits, so
a bad value gets the daemon's message with the flag's name) and the summary or `--json` report.

Offline, the limits are the daemon's configured ones (`[limits]` of the config file); with
`--daemon`, the ones the running daemon reports in `hello`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from . import schema
from .errors import CMIError
from .protocol import Limits, ProtocolError
from .sampling import SamplingOptions
from .tokens import Note, Song

OPTION_NAMES = ("candidates", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "profile")
"""The infill options of docs/protocol.md 5.2 that are flags: --candidates, --top-p, ..."""
_FLAGS_PATH = "options"


def whole_number(text: str) -> int:
    """argparse type: an integer, or a one-line reason."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 3)") from None


def finite_number(text: str) -> float:
    """argparse type: a finite number, or a one-line reason."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 0.8)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def flag(option_name: str) -> str:
    return "--" + option_name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """The generation flags, each defaulting to None (the engine's default, named in its help)."""
    defaults, limits = SamplingOptions(), Limits()
    parser.add_argument(flag("candidates"), type=whole_number, metavar="N",
                        help=f"how many alternatives to write, 1..max_candidates ({limits.max_candidates} unless "
                             "the config file's [limits] says otherwise; default 1)")
    parser.add_argument(flag("temperature"), type=finite_number, metavar="T",
                        help=f"sampling temperature, 0..{schema.MAX_TEMPERATURE:g}: 0 always takes the most likely "
                             f"token, higher is more adventurous (default {defaults.temperature:g})")
    parser.add_argument(flag("top_p"), type=finite_number, metavar="P",
                        help="nucleus sampling: draw only among the most likely tokens that together hold this "
                             f"probability, 0 < P <= 1 (default {defaults.top_p:g})")
    parser.add_argument(flag("top_k"), type=whole_number, metavar="K",
                        help=f"draw only among the K most likely tokens, 0..{schema.MAX_TOP_K}; 0: no cut "
                             f"(default {defaults.top_k})")
    parser.add_argument(flag("repetition_penalty"), type=finite_number, metavar="R",
                        help="lower the score of a note the answer already played by R per earlier use, "
                             f"0..{schema.MAX_REPETITION_PENALTY:g}; 0: off (default {defaults.repetition_penalty:g})")
    parser.add_argument(flag("seed"), type=whole_number, metavar="N",
                        help=f"same seed, same notes: 0..{schema.MAX_SEED} (default: a random one, printed); "
                             "candidate k is drawn with seed + k - 1, which alone gives it again")
    parser.add_argument(flag("profile"), metavar="NAME",
                        help=f"the DIL profile whose learned taste conditions the infill (default "
                             f"{schema.DEFAULT_PROFILE!r}); offline it is only read, the daemon also learns")


def wire_options(args) -> dict:
    """The flags given, as an infill's `options` map (docs/protocol.md 5.2)."""
    return {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name) is not None}


def checked_options(args, limits: Limits) -> schema.InfillOptions:
    """The flags checked exactly as the daemon checks an infill's options; CMIError naming the flag."""
    try:
        return schema.parse_options(wire_options(args), limits, [], path=_FLAGS_PATH)
    except ProtocolError as error:
        name = (error.field or "").rsplit(".", 1)[-1]
        raise CMIError(error.message.replace(error.field, flag(name)) if error.field else error.message) from None


def limits_from_hello(hello: dict) -> Limits:
    """The Limits a running daemon reported in its `hello` reply (defaults for any it left out)."""
    reported = hello.get("limits") or {}
    return Limits(**{f.name: reported[f.name] for f in dataclasses.fields(Limits) if f.name in reported})


def report(args, song: Song, bars: tuple[int, int], range_qn: tuple[float, float], targets: Sequence[int],
           model_line: str, seed: Optional[int], candidates: Sequence[Mapping[int, Sequence[Note]]],
           seeds: Sequence[Optional[int]], paths: Sequence[Path], timings_ms: dict) -> None:
    """Print what was written: a summary (on stderr with --json), and with --json the new notes on stdout."""
    out = sys.stderr if args.json else sys.stdout
    (first_bar, last_bar), (start_qn, end_qn) = bars, range_qn
    print(f"{args.file}: bars {first_bar}-{last_bar} (QN {start_qn:g}-{end_qn:g}), tracks "
          + ", ".join(f"{t + 1} {song.tracks[t].name}" for t in targets), file=out)
    print(f"{model_line}, seed {seed}, {timings_ms.get('total', float('nan')):.0f} ms", file=out)
    for index, (notes, candidate_seed, path) in enumerate(zip(candidates, seeds, paths), start=1):
        counts = ", ".join(f"track {t + 1}: {len(track_notes)}" for t, track_notes in notes.items())
        print(f"candidate {index} (seed {candidate_seed}): notes {counts} -> {path}", file=out)
    if args.json:
        from .offline import notes_json

        print(json.dumps({
            "file": str(args.file), "bars": [first_bar, last_bar], "start_qn": start_qn, "end_qn": end_qn,
            "tracks": [t + 1 for t in targets], "seed": seed, "timings_ms": timings_ms,
            "candidates": [{"index": index, "seed": candidate_seed, "output": str(path),
                            "tracks": {str(t + 1): notes_json(track_notes) for t, track_notes in notes.items()}}
                           for index, (notes, candidate_seed, path) in enumerate(zip(candidates, seeds, paths),
                                                                                 start=1)]}, indent=1))
