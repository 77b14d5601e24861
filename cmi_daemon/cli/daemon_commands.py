"""The daemon's subcommands of `cmi-daemon`: start, stop, status, and `infill --daemon`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import paths
from ..client import DaemonClient, infill_content, load_connection
from ..errors import CMIError
from ..inference.device import DEVICES

STATUS_TIMEOUT_MS = 3_000
STOP_TIMEOUT_MS = 10_000


def command_start(args) -> int:
    """Run the daemon: in the foreground (Ctrl-C stops it), or in the background with --detach."""
    from .service import run_foreground, start_detached
    from ..daemon.settings import load_settings

    overrides = {"model": args.model, "port": args.port, "bind_address": args.bind, "queue_size": args.queue_size,
                 "request_timeout_ms": args.timeout_ms, "device": args.device, "log_level": args.log_level}
    settings = load_settings(paths.config_file(), overrides)
    if args.detach:
        return start_detached(_forwarded_flags(args))
    from ..daemon.engine_backend import load_engine_backend
    return run_foreground(settings, load_engine_backend, console=not args.detached_child)


def _forwarded_flags(args) -> list[str]:
    flags = []
    for name in ("model", "port", "bind", "queue_size", "timeout_ms", "device", "log_level"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(Path(value).resolve()) if name == "model" else str(value)]
    return flags


def command_stop(args) -> int:
    """Ask the running daemon to finish its current request and exit."""
    from .service import stop

    return stop(args.timeout_ms)


def command_status(args) -> int:
    """Show what the daemon is doing; exit code 2 when no daemon answers."""
    from .service import format_status

    connection = load_connection()
    with DaemonClient(connection=connection, timeout_ms=args.timeout_ms) as client:
        status = client.status()
    print(format_status(status, connection))
    return 0


def infill_via_daemon(args, midi, song, bars: tuple[int, int], range_qn: tuple[float, float], targets) -> int:
    """`cmi-daemon infill --daemon`: the running daemon infills the file (read, with the bars and tracks
    named, by command_infill) instead of this process. The flags are checked as offline (so the output
    paths can be checked before any daemon is asked), then against the limits the daemon reports."""
    from ..daemon.settings import load_settings
    from ..music.tokens import Note
    from . import infill as infill_cli, offline

    for name in ("model", "device"):
        if getattr(args, name):
            raise CMIError(f"--{name} does not apply with --daemon: the daemon uses the {name} it was started "
                           "with (`cmi-daemon status` shows it)")
    start_qn, end_qn = range_qn
    options = infill_cli.checked_options(args, load_settings(paths.config_file(), {}).limits, targets)
    output_paths = offline.output_paths(args.file, args.output, options.candidates, args.force)
    with DaemonClient() as client:
        hello = client.hello()
        infill_cli.checked_options(args, infill_cli.limits_from_hello(hello), targets)
        content = infill_content(song, start_qn, end_qn, targets, f"{Path(args.file).name}:{start_qn:g}-{end_qn:g}",
                                 infill_cli.wire_options(args, targets))
        reply = client.infill(content)
    candidates = [{entry["track"]: [Note(*note) for note in entry["notes"]] for entry in candidate["tracks"]}
                  for candidate in reply["candidates"]]
    output_paths = output_paths[:len(candidates)]
    offline.write_candidates(midi, str(args.file), start_qn, end_qn, candidates, output_paths)
    infill_cli.report(args, song, bars, range_qn, targets,
                      f"infilled by the daemon ({reply['model']}) on {hello.get('device')}", reply.get("seed"),
                      candidates, [candidate.get("seed") for candidate in reply["candidates"]], output_paths,
                      reply["timings_ms"], reply.get("repeat"))
    return 0


def add_daemon_commands(commands) -> None:
    """Register start / stop / status on the `cmi-daemon` subparsers."""
    start = commands.add_parser("start", help="run the daemon the DAW bridges talk to",
                                description=command_start.__doc__)
    start.add_argument("--model", help="model bundle folder (default: the one shipped in the package)")
    start.add_argument("--port", type=int, help="request port; events use port + 1; 0 picks free ports "
                       "(default 47110)")
    start.add_argument("--bind", help="address to listen on (default 127.0.0.1; others need CurveZMQ keys)")
    start.add_argument("--queue-size", type=int, help="infills that may wait before `busy` (default 8)")
    start.add_argument("--timeout-ms", type=int, help="default per-infill timeout (default 60000)")
    start.add_argument("--device", choices=DEVICES,
                       help="where the model runs (default auto: CUDA when usable, else the CPU); a device that "
                            "cannot be used falls back to the CPU with a warning, and `status` shows the one in use")
    start.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    start.add_argument("--detach", action="store_true", help="run in the background, logging to the log file")
    start.add_argument("--detached-child", action="store_true", help=argparse.SUPPRESS)
    start.set_defaults(run=command_start)

    stop = commands.add_parser("stop", help="stop the running daemon", description=command_stop.__doc__)
    stop.add_argument("--timeout-ms", type=int, default=STOP_TIMEOUT_MS, help="how long to wait for its reply")
    stop.set_defaults(run=command_stop)

    status = commands.add_parser("status", help="show the running daemon's state (exit code 2 if none)",
                                 description=command_status.__doc__)
    status.add_argument("--timeout-ms", type=int, default=STATUS_TIMEOUT_MS, help="how long to wait for its reply")
    status.set_defaults(run=command_status)
