"""Running the daemon as a user service: one per user (a PID lock), logging, signals, detaching, stopping.

`daemon_commands` calls these for `cmi-daemon start|stop|status`; it sits above the daemon and its
client, which it uses to stop a running daemon.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

from .. import paths
from ..client import DaemonClient, DaemonNotRunning, load_connection, wait_for_exit
from ..errors import CMIError
from ..files import open_private, private_folder, remove_temporaries
from ..daemon.settings import Settings

LOG_FILE_BYTES = 1_000_000
LOG_FILE_BACKUPS = 3
DETACH_START_TIMEOUT_S = 120.0
STOP_TIMEOUT_MARGIN_S = 10.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("cmi_daemon.cli.service")
T = TypeVar("T")


class AlreadyRunning(CMIError):
    """Another daemon of this user holds the lock."""


class DaemonLock:
    """An exclusive OS lock on the lock file, holding our PID. The OS drops the lock when the
    process dies, however it dies, so a lock left by a killed daemon is taken over at once."""

    def __init__(self, path: Path):
        self.path = path
        self._file = None

    def acquire(self) -> None:
        lock_file = os.fdopen(open_private(self.path, os.O_RDWR | os.O_CREAT), "r+")
        if not _try_lock(lock_file):
            lock_file.close()
            raise AlreadyRunning(_running_message(self.path))
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._file = lock_file

    def release(self) -> None:
        if self._file is not None:
            self.path.unlink(missing_ok=True)
            self._file.close()
            self._file = None


def _try_lock(lock_file) -> bool:
    if os.name == "nt":
        import msvcrt
        try:
            msvcrt.locking(lock_file.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl
    try:
        fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _running_message(lock_path: Path) -> str:
    try:
        pid = lock_path.read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    try:
        endpoint = paths.read_connection_file(paths.connection_file())["request_endpoint"]
    except (OSError, CMIError):
        endpoint = "not yet listening"
    return (f"a CMI daemon is already running for this user (PID {pid}, {endpoint}); "
            "stop it with `cmi-daemon stop` first")


def setup_logging(level: str, console: bool) -> Path:
    """Log to a rotating file in the user log folder, and to stderr when console is true."""
    path = paths.log_file()
    root = logging.getLogger("cmi_daemon")
    root.setLevel(level.upper())
    root.handlers.clear()
    handlers: list[logging.Handler] = [PrivateRotatingFileHandler(
        path, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_BACKUPS, encoding="utf-8")]
    if console:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(OneLineFormatter(LOG_FORMAT))
        root.addHandler(handler)
    return path


_CONTROL_ESCAPES = {**{code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))},
                    ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def escape_controls(text: str) -> str:
    """text with every control character (C0, DEL, C1, line and paragraph separators) written as an
    escape (`\\n`, `\\x00`), so what a client sends cannot start a log line or make the log binary."""
    return text.translate(_CONTROL_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """Log records that cannot be forged: a record's message is one line (control characters escaped,
    whatever a client put in it), and the lines of a traceback are escaped the same way and indented,
    so every line starting with a time is a record the daemon wrote."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)

    def formatException(self, exc_info) -> str:
        return _indented(super().formatException(exc_info))

    def formatStack(self, stack_info: str) -> str:
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("    " + escape_controls(line) for line in text.split("\n"))


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """The log file and each one that replaces it at rotation made 0600 in a 0700 folder."""

    def _open(self):
        os.close(open_private(self.baseFilename))
        return super()._open()


def model_dir(settings: Settings) -> Path:
    """The model folder to load: --model / config, or the shipped default model."""
    path = Path(settings.model).expanduser() if settings.model else paths.DEFAULT_MODEL_DIR
    if not path.is_dir():
        if settings.model:
            raise CMIError(f"model folder {path} does not exist; pass a model bundle with --model DIR")
        raise CMIError(f"the default model is not installed at {path}; pass a model bundle with "
                       "--model DIR (make one with `python -m export`)")
    return path


def read_curve_secret_key(settings: Settings) -> Optional[bytes]:
    if not settings.curve_secret_key_file:
        return None
    path = Path(settings.curve_secret_key_file).expanduser()
    try:
        key = path.read_text(encoding="ascii").strip().encode("ascii")
    except (OSError, UnicodeDecodeError) as error:
        raise CMIError(f"{path}: cannot read the Curve secret key ({error})") from None
    if len(key) != 40:
        raise CMIError(f"{path}: a Curve secret key is 40 Z85 characters, this file holds {len(key)}")
    return key


def run_foreground(settings: Settings, backend_factory: Callable[[Path, Settings], object],
                   console: bool = True) -> int:
    """Hold the lock, load the model, serve until a signal or `shutdown`, then clean up."""
    from ..daemon.server import Daemon

    log_path = setup_logging(settings.log_level, console)
    lock = DaemonLock(paths.lock_file())
    lock.acquire()
    connection_path = paths.connection_file()
    try:
        for folder in (paths.state_dir(), paths.data_dir()):  # the DIL learner cleans its own folders
            remove_temporaries(private_folder(folder))
        curve_key = read_curve_secret_key(settings)
        model_path = model_dir(settings)
        log.info("loading the model from %s", model_path)
        backend = on_own_thread(lambda: backend_factory(model_path, settings))
        daemon = Daemon(backend, settings, profiles_path=paths.data_dir() / "profiles.json",
                        curve_secret_key=curve_key)
        _install_signal_handlers(daemon.request_stop)
        paths.write_connection_file(connection_path, daemon.connection_info())
        log.info("CMI daemon PID %d ready: %s; connection file %s; log %s", os.getpid(),
                 daemon.request_endpoint, connection_path, log_path)
        daemon.serve()
    finally:
        _remove_own_connection_file(connection_path)
        lock.release()
    log.info("stopped")
    return 0


def on_own_thread(build: Callable[[], T]) -> T:
    """build() run on a thread of its own that then ends; what it raises is raised here.

    The daemon builds its backend so: ONNX Runtime's `session.set_denormal_as_zero` (the engine's
    SessionOptions) turns on the CPU's flush-to-zero and denormals-are-zero modes in the thread that
    creates the process's first session, for good. That must not be the thread that validates what
    clients send (options.top_p = 5e-324 compared as 0.0), nor the worker that runs the engine (it
    refused the same top_p as 0). Threads started by build (the DIL learner's) inherit the modes;
    ONNX Runtime's own pool threads get them from the option.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = build()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, name="cmi-backend-build", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _install_signal_handlers(stop: Callable[[], None]) -> None:
    def handler(signum, frame):
        log.info("received signal %d", signum)
        stop()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _remove_own_connection_file(path: Path) -> None:
    try:
        if int(paths.read_connection_file(path)["pid"]) == os.getpid():
            path.unlink(missing_ok=True)
    except (OSError, CMIError, ValueError):
        pass


def start_detached(argv: list[str]) -> int:
    """Start `cmi-daemon start` again as a new background process; wait until it listens."""
    log_path = paths.log_file()
    output_path = log_path.with_name("daemon-output.log")
    command = [sys.executable, "-m", "cmi_daemon.cli.main", "start", *argv, "--detached-child"]
    with os.fdopen(open_private(output_path), "ab") as output:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                                 start_new_session=True, close_fds=True)
    deadline_s = time.monotonic() + DETACH_START_TIMEOUT_S
    while time.monotonic() < deadline_s:
        if child.poll() is not None:
            raise CMIError(f"the daemon exited at start (code {child.returncode}): "
                           f"{_last_line(output_path)} (full output in {output_path})")
        try:
            info = load_connection()
        except (DaemonNotRunning, CMIError):
            info = None
        if info is not None and int(info["pid"]) == child.pid:
            print(f"CMI daemon started in the background: PID {child.pid}, {info['request_endpoint']}")
            print(f"log: {log_path}")
            return 0
        time.sleep(0.2)
    raise CMIError(f"the daemon (PID {child.pid}) did not start listening within "
                   f"{DETACH_START_TIMEOUT_S:g} s; see {log_path}")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


def stop(timeout_ms: int) -> int:
    info = load_connection()
    with DaemonClient(connection=info, timeout_ms=timeout_ms) as client:
        client.shutdown()
    pid = int(info["pid"])
    if not wait_for_exit(pid, timeout_ms / 1000.0 + STOP_TIMEOUT_MARGIN_S):
        raise CMIError(f"the daemon (PID {pid}) acknowledged the shutdown but is still running")
    print(f"CMI daemon (PID {pid}) stopped")
    return 0


def format_status(status: dict, connection: dict) -> str:
    model = status.get("model") or {}
    profiles = status.get("profiles") or []
    rss = status.get("rss_bytes")
    lines = [
        f"state: {status.get('state')}  (PID {status.get('pid')}, {connection.get('request_endpoint')})",
        f"model: {model.get('name', '?')}  ({model.get('path', '?')})",
        f"device: {status.get('device')}  (ONNX Runtime providers: {', '.join(model.get('providers') or ['?'])}; "
        f"DIL learns on: {model.get('dil_device') or 'nothing, DIL is off'})",
        f"uptime: {float(status.get('uptime_s', 0)):.0f} s",
        f"queue: {status.get('queue_length')} / {status.get('queue_capacity')}  running: {status.get('running')}",
        f"requests served: {status.get('requests_served')}  failed: {status.get('requests_failed')}  "
        f"messages rejected: {status.get('messages_rejected')}",
        f"memory: {rss / 1e6:.0f} MB" if rss else "memory: unknown",
        "profiles: " + (", ".join(f"{p['name']} (+{p['accepted']} -{p['rejected']} repeat {p['repeated']}; "
                                  f"learned from {(p.get('learned') or {}).get('signals', 0)})"
                                  for p in profiles) or "none"),
    ]
    return "\n".join(lines)
