"""The `cmi-daemon` command: one entry point whose subcommands musicians and developers run."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import CMIError
from ..inference.device import DEVICES
from ..music import vocab
from ..music.timeunit import TimeUnit
from ..music.tokens import read_midi, tokenize
from . import infill as infill_cli
from .daemon_commands import add_daemon_commands, infill_via_daemon


def _format_duration(seconds: float) -> str:
    minutes, seconds = divmod(seconds, 60.0)
    return f"{int(minutes)}:{seconds:04.1f}"


def command_tokens(args) -> int:
    """Print a MIDI file's tokens (text form or ids), their counts and the song's duration."""
    song = read_midi(args.file)
    unit = TimeUnit(args.steps_per_qn)
    token_song = unit.token_song(song)
    encoding = tokenize(token_song)
    ids = encoding.ids
    counts = Counter("wait" if vocab.is_wait(t) else ("note-on" if vocab.is_note_on(t) else "note-off") for t in ids)
    first_ms = min((n.start_ms for n in encoding.notes), default=0.0)
    last_ms = max((n.start_ms + n.duration_ms for n in encoding.notes), default=0.0)
    duration_s = float(np.diff(song.tempo_map.ms_at(token_song.tempo_map.qn_at([first_ms, last_ms])))[0]) / 1000.0
    if not args.summary:
        shown = ids if args.limit is None else ids[:args.limit]
        print(" ".join(str(t) for t in shown) if args.ids else vocab.ids_to_text(shown))
    out = sys.stderr if not args.summary else sys.stdout
    print(f"file: {args.file}", file=out)
    print(f"tracks: {len(song.tracks)}  notes: {len(encoding.notes)}  "
          f"duration: {_format_duration(duration_s)} (first to last event)", file=out)
    print(f"time unit: {unit.describe()}", file=out)
    print(f"tokens: {len(ids)}  note-on: {counts['note-on']}  note-off: {counts['note-off']}  "
          f"wait: {counts['wait']}", file=out)
    for reason, count in sorted(encoding.drops.items()):
        print(f"dropped: {count} notes, {reason}", file=out)
    return 0


def command_play(args) -> int:
    """Play a MIDI file, or some of its bars, on a MIDI output (Ctrl-C stops, releasing every note)."""
    from . import offline, playback

    if args.list_ports:
        names = playback.output_names()
        print("\n".join(names) if names else "no MIDI outputs")
        return 0
    if args.file is None:
        raise CMIError("play needs a .mid file (or --list-ports)")
    song = read_midi(args.file)
    if song.end_qn <= 0:
        raise CMIError(f"{args.file}: no notes to play")
    start_qn, end_qn = 0.0, song.end_qn
    if args.bars is not None:
        if args.context_bars < 0:
            raise CMIError(f"--context-bars {args.context_bars}: give 0 or more bars")
        first_bar, last_bar, _, _ = offline.parse_bars(args.bars, song)
        start_qn, bars_end_qn = song.meter.bar_range_qn(max(1, first_bar - args.context_bars),
                                                        last_bar + args.context_bars)
        end_qn = min(bars_end_qn, song.end_qn)
    messages = playback.schedule(song, start_qn, end_qn)
    port = playback.open_output(args.port)
    print(f"playing {args.file} ({start_qn:g}-{end_qn:g} QN) on {port.name}; Ctrl-C stops")
    try:
        playback.play(messages, port)
    except KeyboardInterrupt:
        pass
    finally:
        port.close()
    return 0


def command_infill(args) -> int:
    """Infill bars of a MIDI file with the model, in this process (no daemon needed) or with --daemon."""
    from ..daemon.engine_backend import engine_options, load_engine
    from ..daemon.settings import load_settings
    from ..inference.device import onnx_device
    from ..paths import config_file, data_dir, default_model_dir
    from . import offline

    midi, song = offline.read_input(args.file)
    if args.list_tracks:
        print("\n".join(offline.track_lines(song)))
        return 0
    if args.bars is None or args.output is None:
        raise CMIError("infill needs --bars and -o OUT.mid (or --list-tracks to see the tracks)")
    first_bar, last_bar, start_qn, end_qn = offline.parse_bars(args.bars, song)
    targets = offline.parse_tracks(args.tracks, song)
    if args.daemon:
        return infill_via_daemon(args, midi, song, (first_bar, last_bar), (start_qn, end_qn), targets)
    settings = load_settings(config_file(), {"device": args.device})
    options = infill_cli.checked_options(args, settings.limits, targets)
    paths = offline.output_paths(args.file, args.output, options.candidates, args.force)
    engine = load_engine(args.model or default_model_dir(), settings.device, warn=_warn)
    if settings.dil.enabled and engine.bundle.conditioned and (data_dir() / "dil").is_dir():
        from ..dil.learner import serve_saved_profiles
        serve_saved_profiles(engine, data_dir() / "dil")
    result = engine.infill(song, start_qn, end_qn, targets, engine_options(options), profile=options.profile)
    offline.write_candidates(midi, str(args.file), start_qn, end_qn, [c.notes for c in result.candidates], paths)
    infill_cli.report(args, song, (first_bar, last_bar), (start_qn, end_qn), targets,
                      f"model {engine.bundle.path} on {onnx_device(engine.providers)}, "
                      f"{result.n_prompt_tokens} prompt tokens", result.seed,
                      [c.notes for c in result.candidates], [c.seed for c in result.candidates], paths,
                      result.timings_ms, None if result.repeat is None else result.repeat.as_wire())
    return 0


def _warn(message: str) -> None:
    print(f"cmi-daemon: warning: {message}", file=sys.stderr)


def command_bench(args) -> int:
    """Speed and memory of the model on this machine: prefill, decode, infill latency, vs the rwkv package."""
    from ..paths import default_model_dir
    from . import bench

    bench.run(args.model or default_model_dir(), args.songs, args.repeats)
    return 0


def command_install_ableton(args) -> int:
    """Copy the CMI Max for Live device into Live's User Library (or remove it with --uninstall)."""
    from . import install_ableton

    user_library = Path(args.path).expanduser() if args.path else install_ableton.default_user_library()
    if args.uninstall:
        target = install_ableton.uninstall(user_library)
        print(f"removed the CMI device from {target}" if target else
              f"the CMI device is not installed in {user_library}")
        return 0
    source = Path(args.source) if args.source else install_ableton.default_source()
    target = install_ableton.install(user_library, source, run_npm=not args.no_npm)
    print(install_ableton.usage(target))
    if args.no_npm:
        print(f"Before first use, run `npm ci --omit=dev` in {target} (the device's Node modules).")
    return 0


def command_install_reaper(args) -> int:
    """Install the CMI actions in REAPER (scripts, action list, its Python settings), or --uninstall them."""
    from . import install_reaper

    resource_dir = Path(args.path).expanduser() if args.path else None
    lines = (install_reaper.uninstall if args.uninstall else install_reaper.install)(resource_dir)
    print("\n".join(lines))
    if not args.uninstall:
        print("Start the daemon (`cmi-daemon start --detach`) and REAPER; the actions are in Actions > "
              "Show action list (search \"CMI:\").")
    return 0


def command_profiles(args) -> int:
    """List the DIL profiles, or reset one to the base model: through the running daemon when one
    answers, else directly in the user data folder."""
    from .. import paths
    from ..client import DaemonClient, DaemonNotRunning, load_connection
    from ..daemon.profiles import ProfileBook
    from ..dil.store import ProfileStore

    try:
        connection = load_connection()
    except DaemonNotRunning:
        connection = None
    if connection is not None:
        with DaemonClient(connection=connection, timeout_ms=args.timeout_ms) as client:
            listing = client.profiles(reset=args.reset)["profiles"]
        names = [entry["name"] for entry in listing]
    else:
        store = ProfileStore(paths.data_dir() / "dil", base_id="")
        book = ProfileBook(paths.data_dir() / "profiles.json")
        if args.reset is not None:
            known = args.reset in store.profiles() or args.reset in book.profiles
            if not known:
                raise CMIError(f"no profile named {args.reset!r}")
            store.reset(args.reset)
            book.reset(args.reset)
        names = sorted(set(store.profiles()) | set(book.profiles))
    if args.reset is not None:
        print(f"profile {args.reset} reset to the base model")
    print("\n".join(names) if names else "no profiles")
    return 0


def add_install_commands(commands) -> None:
    """`cmi-daemon install TARGET`: put a DAW bridge where its DAW finds it, one subcommand per DAW."""
    install = commands.add_parser("install", help="install a DAW bridge (ableton, ...)",
                                  description=add_install_commands.__doc__)
    targets = install.add_subparsers(dest="target", metavar="TARGET")
    targets.required = True

    ableton = targets.add_parser("ableton", help="the Max for Live device, into Live's User Library",
                                 description=command_install_ableton.__doc__)
    ableton.add_argument("--path", metavar="USER_LIBRARY",
                         help="Live's User Library (default: ~/Music/Ableton/User Library on macOS, "
                              "%%USERPROFILE%%\\Documents\\Ableton\\User Library on Windows; required elsewhere)")
    ableton.add_argument("--uninstall", action="store_true", help="remove the device instead")
    ableton.add_argument("--source", metavar="DIR", help="the device's files (default: the ones installed with CMI)")
    ableton.add_argument("--no-npm", action="store_true",
                         help="copy the files only, without running `npm ci --omit=dev` in the device folder")
    ableton.set_defaults(run=command_install_ableton)

    reaper = targets.add_parser("reaper", help="the actions \"CMI: Infill selection\" and \"CMI: Accept infill\"",
                                description=command_install_reaper.__doc__)
    reaper.add_argument("--path", metavar="RESOURCE_DIR",
                        help="REAPER's resource folder (default: ~/.config/REAPER on Linux, ~/Library/Application "
                             "Support/REAPER on macOS, %%APPDATA%%\\REAPER on Windows)")
    reaper.add_argument("--uninstall", action="store_true",
                        help="remove the actions and restore reaper.ini's Python settings from its backup")
    reaper.set_defaults(run=command_install_reaper)


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
    tokens.add_argument("--steps-per-qn", type=int, metavar="N",
                        help="count waits in 1/N quarter note through the tempo map (default: 8 ms steps)")
    tokens.set_defaults(run=command_tokens)

    infill = commands.add_parser("infill", help="infill bars of a MIDI file (in this process, or by the daemon)",
                                 description=command_infill.__doc__)
    infill.add_argument("file", help="a .mid file")
    infill.add_argument("--bars", help="bars to infill, counted from 1: 9-12 or 9")
    infill.add_argument("--tracks",
                        help="tracks to infill, numbered from 1 as --list-tracks shows (default: all with notes)")
    infill.add_argument("-o", "--output", help="output .mid; candidate k > 1 goes to OUT-k.mid")
    infill.add_argument("--force", action="store_true",
                        help="overwrite output files that exist (the input file too); refused without it")
    infill_cli.add_option_flags(infill)
    infill.add_argument("--model", help="model bundle folder (default: the one shipped in the package; "
                        "not with --daemon)")
    infill.add_argument("--device", choices=DEVICES,
                        help="where the model runs (default: the config file's, else auto: CUDA when usable, else "
                             "the CPU); one that cannot be used falls back to the CPU with a warning; "
                             "not with --daemon")
    infill.add_argument("--json", action="store_true",
                        help="print the new notes as JSON on stdout (the summary goes to stderr)")
    infill.add_argument("--list-tracks", action="store_true", help="print the numbered tracks and exit")
    infill.add_argument("--daemon", action="store_true",
                        help="ask the running daemon (`cmi-daemon start`) instead of loading the model here")
    infill.set_defaults(run=command_infill)

    play = commands.add_parser("play", help="play a MIDI file or some of its bars on a MIDI output",
                               description=command_play.__doc__)
    play.add_argument("file", nargs="?", help="a .mid file")
    play.add_argument("--bars", help="bars to play, counted from 1: 9-12 or 9 (default: the whole file)")
    play.add_argument("--context-bars", type=int, default=1,
                      help="bars played before and after --bars, to hear the infill in context (default 1)")
    play.add_argument("--port", help="MIDI output name, as --list-ports prints it (default: the first)")
    play.add_argument("--list-ports", action="store_true", help="print the MIDI outputs and exit")
    play.set_defaults(run=command_play)

    bench = commands.add_parser("bench", help="measure the model's speed and memory on this machine",
                                description=command_bench.__doc__)
    bench.add_argument("--model", help="model bundle folder (default: the one shipped in the package)")
    bench.add_argument("--songs", type=Path, help="folder searched for .mid files for the latency runs "
                       "(default: the two POP909 songs shipped in the package, cmi_daemon/data/bench_songs)")
    bench.add_argument("--repeats", type=infill_cli.whole_number, default=3,
                       help="timed runs per figure; the fastest counts (default 3)")
    bench.set_defaults(run=command_bench)

    profiles = commands.add_parser("profiles", help="list the DIL profiles or reset one to the base model",
                                   description=command_profiles.__doc__)
    profiles.add_argument("--reset", metavar="NAME", help="forget what DIL learned for this profile")
    profiles.add_argument("--timeout-ms", type=int, default=10_000, help="how long to wait for the daemon's reply")
    profiles.set_defaults(run=command_profiles)

    add_daemon_commands(commands)
    add_install_commands(commands)
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
