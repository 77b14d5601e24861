"""The daemon's settings: defaults, overridden by the TOML config file, overridden by command-line flags.

Config file (paths.config_file(), e.g. ~/.config/cmi/config.toml), every key optional:

    [daemon]
    bind_address = "127.0.0.1"   # anything but loopback needs the [curve] keys
    port = 47110                 # ROUTER port; PUB uses port + 1; 0 picks two free ports
    queue_size = 8               # infills waiting for the worker before `busy`
    request_timeout_ms = 60000   # default per-infill timeout, queue wait included
    shutdown_grace_ms = 5000     # how long a stopping daemon lets the running infill finish
    session_memory_mib = 32      # what the remembered sessions (for repeats and feedback) may hold
    model = ""                   # model bundle folder; empty = the shipped default model
    device = "auto"              # auto, cpu, cuda or mps
    log_level = "INFO"           # DEBUG, INFO, WARNING or ERROR

    [limits]                     # docs/protocol.md section 8
    max_message_bytes = 8388608
    max_tracks = 64
    max_notes = 100000
    max_range_qn = 256
    max_position_qn = 1000000
    max_candidates = 8
    max_tempo_changes = 10000
    max_timeout_ms = 600000

    [curve]                      # CurveZMQ, required to bind off loopback
    secret_key_file = ""         # file holding the daemon's Z85 secret key (40 characters)

    [dil]                        # learning from "again" and "keep" (DEVELOPERS.md, DIL)
    enabled = true               # false: learn nothing, serve the base model to every profile
    steps_per_signal = 2         # gradient steps per signal, 1..16
    lr = 0.0001
    loss = "cosine"              # cosine (the paper) or distance (the authors' code)
    margin = 0.1
"""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..dil.settings import DILSettings
from ..errors import CMIError
from ..inference.device import DEVICES
from .protocol import Limits

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

DEFAULT_PORT = 47110
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(CMIError):
    """The config file or a flag holds a value the daemon cannot use."""


@dataclass(frozen=True)
class Settings:
    bind_address: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    queue_size: int = 8
    request_timeout_ms: int = 60_000
    shutdown_grace_ms: int = 5_000
    session_memory_mib: int = 32
    model: str = ""
    device: str = "auto"
    log_level: str = "INFO"
    curve_secret_key_file: str = ""
    limits: Limits = field(default_factory=Limits)
    dil: DILSettings = field(default_factory=DILSettings)

    def __post_init__(self):
        # "[::1]", as an IPv6 address is written in a URL, is the address ::1.
        if self.bind_address.startswith("[") and self.bind_address.endswith("]"):
            object.__setattr__(self, "bind_address", self.bind_address[1:-1])

    @property
    def loopback(self) -> bool:
        return is_loopback(self.bind_address)


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


_DAEMON_KEYS = {"bind_address": str, "port": int, "queue_size": int, "request_timeout_ms": int,
                "shutdown_grace_ms": int, "session_memory_mib": int, "model": str, "device": str, "log_level": str}
_LIMIT_KEYS = {f.name: f.type for f in dataclasses.fields(Limits)}
_DIL_KEYS = {"enabled": bool, "steps_per_signal": int, "lr": float, "loss": str, "margin": float}


def load_settings(path: Optional[Path], overrides: dict[str, Any]) -> Settings:
    """Defaults, then the config file at path (if it exists), then the non-None overrides."""
    values: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    dil: dict[str, Any] = {}
    if path is not None and path.exists():
        values, limits, dil = _read_config(path)
    values.update({key: value for key, value in overrides.items() if value is not None})
    try:
        dil_settings = DILSettings(**dil)
    except ValueError as error:
        raise ConfigError(f"{path}: [dil] {error}") from None
    settings = Settings(**values, limits=Limits(**limits), dil=dil_settings)
    _check(settings, path)
    return settings


def _read_config(path: Path) -> tuple[dict, dict, dict]:
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error})") from None
    values: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    dil: dict[str, Any] = {}
    for section, table in document.items():
        if section not in ("daemon", "limits", "curve", "dil") or not isinstance(table, dict):
            raise ConfigError(f"{path}: unknown section [{section}]; known: [daemon], [limits], [curve], [dil]")
        for key, value in table.items():
            if section == "daemon":
                values[key] = _typed(path, section, key, value, _DAEMON_KEYS)
            elif section == "limits":
                limits[key] = _typed(path, section, key, value, _LIMIT_KEYS)
            elif section == "dil":
                dil[key] = _typed(path, section, key, value, _DIL_KEYS)
            else:
                values["curve_" + key] = _typed(path, section, key, value, {"secret_key_file": str})
    return values, limits, dil


def _typed(path: Path, section: str, key: str, value: Any, known: dict) -> Any:
    if key not in known:
        raise ConfigError(f"{path}: unknown key {key!r} in [{section}]; known: {', '.join(sorted(known))}")
    wanted = known[key]
    wanted = {"int": int, "float": float, "str": str, "bool": bool}.get(wanted, wanted)
    if wanted is float and type(value) is int:
        value = float(value)
    if type(value) is not wanted:
        raise ConfigError(f"{path}: [{section}] {key} must be a {wanted.__name__}, not {value!r}")
    return value


def _check(settings: Settings, path: Optional[Path]) -> None:
    where = f"{path}: " if path is not None and path.exists() else ""
    if not 0 <= settings.port <= 65534:
        raise ConfigError(f"{where}port {settings.port} is outside 0..65534 (the PUB socket uses port + 1)")
    if (settings.queue_size < 1 or settings.request_timeout_ms < 1 or settings.session_memory_mib < 1
            or settings.shutdown_grace_ms < 0):
        raise ConfigError(f"{where}queue_size, request_timeout_ms and session_memory_mib must be positive, "
                          "shutdown_grace_ms not negative")
    if settings.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(f"{where}log_level {settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if settings.device not in DEVICES:
        raise ConfigError(f"{where}device {settings.device!r} is not one of {', '.join(DEVICES)}")
    if any(value <= 0 for value in settings.limits.as_dict().values()):
        raise ConfigError(f"{where}every [limits] value must be positive")
