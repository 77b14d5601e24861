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
import re
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..daemon import schema
from ..daemon.protocol import Limits, ProtocolError
from ..errors import CMIError
from ..inference.sampling import SamplingOptions
from ..music.tokens import Note, Song

OPTION_NAMES = ("candidates", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "profile",
                "follow_repeat")
"""The infill options of docs/protocol.md 5.2 that are flags: --candidates, --top-p, ..."""
CONTROL_FLAGS = {"density_per_qn": "--density", "max_polyphony": "--polyphony", "pitch_range": "--pitch-range",
                 "note_length_qn": "--note-length", "velocity_range": "--velocity-range", "grid": "--grid"}
"""Per-track control (a key of options.controls[i]) -> its flag; each takes VALUE for every target
track or TRACK=VALUE,... for some (tracks numbered from 1, as --tracks)."""
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
    for_tracks = " (VALUE for every target track, or TRACK=VALUE,... for some)"
    parser.add_argument("--density", metavar="VALUE", dest="density_per_qn",
                        help="notes per quarter note the infill aims for, 0 < d <= 64" + for_tracks +
                             "; default: the track's rate in its context bars")
    parser.add_argument("--polyphony", metavar="VALUE", dest="max_polyphony",
                        help="most notes sounding at once, 1..64" + for_tracks + "; default: the most in the "
                             "track's context bars")
    parser.add_argument("--pitch-range", metavar="VALUE", dest="pitch_range",
                        help="lowest-highest MIDI pitch new notes may have, e.g. 60-84" + for_tracks +
                             "; default: the track's range in its context bars")
    parser.add_argument("--note-length", metavar="VALUE", dest="note_length_qn",
                        help="typical note length in quarter notes, 0 < l <= 64" + for_tracks +
                             "; default: the track's median in its context bars")
    parser.add_argument("--velocity-range", metavar="VALUE", dest="velocity_range",
                        help="lowest-highest velocity of new notes, 1..127, e.g. 60-100" + for_tracks +
                             "; default: the track's range in its context bars")
    parser.add_argument("--grid", metavar="VALUE", dest="grid",
                        help="where new notes start and end: auto (the grid of the track's context bars, none "
                             "when it is played freely), off, or 1/4, 1/8, 1/8T, 1/16, 1/16T, 1/32, 1/32T, 1/64"
                             + for_tracks + "; default auto")
    parser.add_argument(flag("follow_repeat"), type=finite_number, metavar="F",
                        help="how closely the infill follows the song's own repeat of the bars (a verse or chorus "
                             "played again elsewhere whose surroundings match), 0..1; 0: the model alone (default 1)")
    parser.add_argument(flag("profile"), metavar="NAME",
                        help=f"the DIL profile whose learned taste conditions the infill (default "
                             f"{schema.DEFAULT_PROFILE!r}); offline it is only read, the daemon also learns")


def wire_options(args, targets: Sequence[int]) -> dict:
    """The flags given, as an infill's `options` map (docs/protocol.md 5.2) for these target tracks."""
    options = {name: getattr(args, name) for name in OPTION_NAMES if getattr(args, name) is not None}
    controls: dict[int, dict] = {}
    for key, flag_name in CONTROL_FLAGS.items():
        text = getattr(args, key, None)
        if text is not None:
            for track, value in _per_track(flag_name, text, targets).items():
                controls.setdefault(track, {"track": track})[key] = _control_value(flag_name, key, value)
    if controls:
        options["controls"] = [controls[track] for track in sorted(controls)]
    return options


def _per_track(flag_name: str, text: str, targets: Sequence[int]) -> dict[int, str]:
    """"VALUE" -> every target track's; "2=VALUE,3=VALUE" -> those tracks' (numbered from 1)."""
    values: dict[int, str] = {}
    for part in (p.strip() for p in text.split(",")):
        number, equals, value = part.rpartition("=")
        if not equals:
            values.update(dict.fromkeys(targets, part))
            continue
        try:
            track = int(number) - 1
        except ValueError:
            raise CMIError(f"{flag_name} {text!r}: write VALUE or TRACK=VALUE,... with track numbers") from None
        if track not in targets:
            raise CMIError(f"{flag_name} {text!r}: track {track + 1} is not being infilled (tracks "
                           + ", ".join(str(t + 1) for t in targets) + ")")
        values[track] = value
    return values


def _control_value(flag_name: str, key: str, value: str):
    """A control's text as the wire carries it: a number, a [low, high] pair or a grid name."""
    try:
        if key in ("pitch_range", "velocity_range"):
            low, high = value.split("-")
            return [int(low), int(high)]
        if key == "max_polyphony":
            return int(value)
        if key == "grid":
            return value
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        return number
    except ValueError:
        example = {"pitch_range": "60-84", "velocity_range": "60-100", "max_polyphony": "2"}.get(key, "1.5")
        raise CMIError(f"{flag_name} {value!r}: not a value it takes (e.g. {example})") from None


def checked_options(args, limits: Limits, targets: Sequence[int]) -> schema.InfillRequestOptions:
    """The flags checked exactly as the daemon checks an infill's options; CMIError naming the flag."""
    try:
        return schema.parse_options(wire_options(args, targets), limits, [], path=_FLAGS_PATH)
    except ProtocolError as error:
        name = re.sub(r"\[\d+\]$", "", (error.field or "").rsplit(".", 1)[-1])
        flag_name = CONTROL_FLAGS.get(name, flag(name))
        raise CMIError(error.message.replace(error.field, flag_name) if error.field else error.message) from None


def limits_from_hello(hello: dict) -> Limits:
    """The Limits a running daemon reported in its `hello` reply (defaults for any it left out)."""
    reported = hello.get("limits") or {}
    return Limits(**{f.name: reported[f.name] for f in dataclasses.fields(Limits) if f.name in reported})


def report(args, song: Song, bars: tuple[int, int], range_qn: tuple[float, float], targets: Sequence[int],
           model_line: str, seed: Optional[int], candidates: Sequence[Mapping[int, Sequence[Note]]],
           seeds: Sequence[Optional[int]], paths: Sequence[Path], timings_ms: dict,
           repeat: Optional[Mapping] = None) -> None:
    """Print what was written: a summary (on stderr with --json), and with --json the new notes on
    stdout; repeat is the song's repeat that guided the infill (the reply's `repeat`), if any."""
    out = sys.stderr if args.json else sys.stdout
    (first_bar, last_bar), (start_qn, end_qn) = bars, range_qn
    print(f"{args.file}: bars {first_bar}-{last_bar} (QN {start_qn:g}-{end_qn:g}), tracks "
          + ", ".join(f"{t + 1} {song.tracks[t].name}" for t in targets), file=out)
    print(f"{model_line}, seed {seed}, {timings_ms.get('total', float('nan')):.0f} ms", file=out)
    if repeat is not None:
        print(f"following the song's repeat of these bars at QN {start_qn + repeat['offset_qn']:g}-"
              f"{end_qn + repeat['offset_qn']:g} (similarity {repeat['similarity']:.2f}; --follow-repeat 0 "
              "leaves the model to itself)", file=out)
    for index, (notes, candidate_seed, path) in enumerate(zip(candidates, seeds, paths), start=1):
        counts = ", ".join(f"track {t + 1}: {len(track_notes)}" for t, track_notes in notes.items())
        print(f"candidate {index} (seed {candidate_seed}): notes {counts} -> {path}", file=out)
    if args.json:
        from .offline import notes_json

        print(json.dumps({
            "file": str(args.file), "bars": [first_bar, last_bar], "start_qn": start_qn, "end_qn": end_qn,
            "tracks": [t + 1 for t in targets], "seed": seed, "timings_ms": timings_ms, "repeat": repeat,
            "candidates": [{"index": index, "seed": candidate_seed, "output": str(path),
                            "tracks": {str(t + 1): notes_json(track_notes) for t, track_notes in notes.items()}}
                           for index, (notes, candidate_seed, path) in enumerate(zip(candidates, seeds, paths),
                                                                                 start=1)]}, indent=1))
