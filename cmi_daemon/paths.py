"""Where the daemon keeps its files (appdirs, or everything under $CMI_HOME), the connection file,
and whether the process it names runs (psutil).

Imports appdirs only when a default folder is needed and psutil only when a process is looked at,
so importing the client needs nothing beyond pyzmq and msgpack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .errors import CMIError
from .files import write_private_atomic

APP_NAME = "cmi"
HOME_ENV = "CMI_HOME"
CONNECTION_FILE_NAME = "connection.json"
LOCK_FILE_NAME = "daemon.lock"
CONFIG_FILE_NAME = "config.toml"
LOG_FILE_NAME = "daemon.log"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "models" / "default"
"""The model bundle shipped inside the package: what the daemon and `cmi-daemon infill` load without --model."""


def default_model_dir() -> Path:
    """The bundle shipped inside the package; a clear error while none is installed."""
    if not (DEFAULT_MODEL_DIR / "manifest.json").is_file():
        raise CMIError(f"no default model is installed ({DEFAULT_MODEL_DIR} holds no bundle): pass --model DIR, "
                       "a bundle folder made with `python -m export CHECKPOINT --out DIR`")
    return DEFAULT_MODEL_DIR


def _home() -> Optional[Path]:
    home = os.environ.get(HOME_ENV)
    return Path(home) if home else None


def config_dir() -> Path:
    home = _home()
    if home is not None:
        return home / "config"
    import appdirs
    return Path(appdirs.user_config_dir(APP_NAME))


def state_dir() -> Path:
    """Runtime files: the connection file and the lock."""
    home = _home()
    if home is not None:
        return home / "state"
    import appdirs
    return Path(appdirs.user_state_dir(APP_NAME))


def log_dir() -> Path:
    home = _home()
    if home is not None:
        return home / "logs"
    import appdirs
    return Path(appdirs.user_log_dir(APP_NAME))


def data_dir() -> Path:
    """User data the daemon keeps across runs (profiles, DIL state)."""
    home = _home()
    if home is not None:
        return home / "data"
    import appdirs
    return Path(appdirs.user_data_dir(APP_NAME))


def cache_dir() -> Path:
    """Files that can be rebuilt at any time (compiled kernels)."""
    home = _home()
    if home is not None:
        return home / "cache"
    import appdirs
    return Path(appdirs.user_cache_dir(APP_NAME))


def connection_file() -> Path:
    return state_dir() / CONNECTION_FILE_NAME


def lock_file() -> Path:
    return state_dir() / LOCK_FILE_NAME


def config_file() -> Path:
    return config_dir() / CONFIG_FILE_NAME


def log_file() -> Path:
    return log_dir() / LOG_FILE_NAME


def bridge_dir(daw: str, required_files: tuple[str, ...]) -> Path:
    """The bridge files for `daw` ("reaper" or "ableton"): installed with the package (a wheel
    ships bridges/<daw> as cmi_daemon.bridges.<daw>), else bridges/<daw> of the source checkout
    this package runs from (a clone or an editable install)."""
    package = Path(__file__).resolve().parent
    candidates = (package / "bridges" / daw, package.parent / "bridges" / daw)
    for folder in candidates:
        if all((folder / name).is_file() for name in required_files):
            return folder
    raise CMIError(f"the {daw} bridge files ({', '.join(required_files)}) are not installed with CMI "
                   f"(looked in {', '.join(map(str, candidates))}); reinstall CMI with pip")


def write_connection_file(path: Path, info: dict) -> None:
    """Atomically, readable by the owner only: it holds the signing key."""
    write_private_atomic(path, json.dumps(info, indent=2).encode("utf-8"))


def read_connection_file(path: Path) -> dict:
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise CMIError(f"{path}: unreadable connection file ({error}); "
                       "stop the daemon with `cmi-daemon stop` or delete the file") from None
    required = ("pid", "request_endpoint", "event_endpoint", "key", "protocol")
    if not isinstance(info, dict) or any(key not in info for key in required):
        raise CMIError(f"{path}: connection file lacks one of {', '.join(required)}; delete it and "
                       "start the daemon again")
    return info


def pid_alive(pid: int) -> bool:
    """Whether a process with this id is running (it may belong to another user, whose process's
    state we may not read: alive). Zombies, ended but not yet reaped, count as dead."""
    import psutil

    if pid <= 0:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess included, where the platform raises it
        return False
    except psutil.AccessDenied:
        return True
