"""Validation of request messages (docs/protocol.md sections 4-5): explicit checks, field paths in every error.

Each `parse_*` function takes a decoded msgpack value and returns plain validated data, or raises
ProtocolError naming the offending field. Unknown map keys are collected as warnings, not errors.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import CMIError, TimeMapError
from ..inference import controls as track_controls
from ..inference.sampling import MAX_SEED
from ..music.notes import Note, normalize_notes
from ..music.tempo import Meter, TempoMap
from ..music.tokens import Song, Track
from .protocol import MESSAGE_TYPES, PROTOCOL_VERSION, Limits, ProtocolError, version_compatible

MAX_ID_CHARS = 64
MAX_SESSION_CHARS = 256
MAX_NAME_CHARS = 256
MAX_TOP_K = 100_000
MAX_TEMPERATURE = 5.0
MAX_REPETITION_PENALTY = 10.0
"""In logit units per earlier use of a note-on: beyond about 10 a repeated note is never drawn anyway."""
MAX_PROFILE_CHARS = 64
MAX_METER_NUMERATOR = 64
METER_DENOMINATORS = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_PROFILE = "default"
PROFILE_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")
VERDICTS = ("accept", "reject")


@dataclass(frozen=True)
class Envelope:
    request_id: str
    message_type: str
    content: dict
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class InfillRequestOptions:
    """An infill request's validated `options` (docs/protocol.md 5.2): what the musician set, None for
    what they left to the engine (engine_backend.engine_options turns them into engine.InfillOptions)."""

    candidates: int = 1
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    seed: Optional[int] = None
    profile: str = DEFAULT_PROFILE
    controls: tuple[tuple[int, track_controls.ControlRequest], ...] = ()
    """(track index, what the request sets of its controls), at most one per target track."""
    follow_repeat: Optional[float] = None
    """0..1: how closely the infill follows the song's own repeat of the range (since 1.2)."""


@dataclass(frozen=True)
class InfillRequest:
    """A validated infill: the song, the half-open range in QN, the target track indices, options."""

    session: str
    song: Song
    start_qn: float
    end_qn: float
    target_tracks: tuple[int, ...]
    options: InfillRequestOptions = field(default_factory=InfillRequestOptions)
    timeout_ms: Optional[int] = None


class _Reader:
    """Reads the fields of one map, remembering which keys were used to warn about the rest."""

    def __init__(self, value: Any, path: str, warnings: list[str]):
        if not isinstance(value, dict):
            raise ProtocolError("invalid_field", f"{path} must be a map, not {_type_name(value)}", path)
        self.mapping = value
        self.path = path
        self.warnings = warnings
        self.known: set = set()

    def child(self, key: str) -> str:
        return f"{self.path}.{key}"

    def get(self, key: str, required: bool) -> Any:
        self.known.add(key)
        if key not in self.mapping or self.mapping[key] is None:
            if required:
                raise ProtocolError("invalid_field", f"{self.child(key)} is missing", self.child(key))
            return None
        return self.mapping[key]

    def string(self, key: str, required: bool = True, max_chars: int = MAX_NAME_CHARS, min_chars: int = 1,
               default: Optional[str] = None, pattern: Optional[re.Pattern] = None) -> Optional[str]:
        value = self.get(key, required)
        if value is None:
            return default
        return check_string(value, self.child(key), min_chars, max_chars, pattern)

    def integer(self, key: str, low: int, high: int, required: bool = True,
                default: Optional[int] = None) -> Optional[int]:
        value = self.get(key, required)
        return default if value is None else check_int(value, self.child(key), low, high)

    def number(self, key: str, low: float, high: float, low_open: bool = False, required: bool = True,
               default: Optional[float] = None) -> Optional[float]:
        value = self.get(key, required)
        return default if value is None else check_number(value, self.child(key), low, high, low_open)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, False)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ProtocolError("invalid_field", f"{self.child(key)} must be true or false", self.child(key))
        return value

    def array(self, key: str, max_items: int, required: bool = True, min_items: int = 0) -> Optional[list]:
        value = self.get(key, required)
        return None if value is None else check_list(value, self.child(key), max_items, min_items)

    def finish(self) -> None:
        for key in self.mapping:
            if key not in self.known:
                self.warnings.append(f"{self.path}.{key}: unknown field, ignored")


def _type_name(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a map", bytes: "binary data", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_string(value: Any, path: str, min_chars: int, max_chars: int,
                 pattern: Optional[re.Pattern] = None) -> str:
    if not isinstance(value, str):
        raise ProtocolError("invalid_field", f"{path} must be a string, not {_type_name(value)}", path)
    if not min_chars <= len(value) <= max_chars:
        raise ProtocolError("invalid_field", f"{path} must have {min_chars}..{max_chars} characters", path)
    if pattern is not None and not pattern.match(value):
        raise ProtocolError("invalid_field", f"{path} has characters outside {pattern.pattern}", path)
    return value


def check_int(value: Any, path: str, low: int, high: int) -> int:
    if type(value) is not int:
        raise ProtocolError("invalid_field", f"{path} must be an integer, not {_type_name(value)}", path)
    if not low <= value <= high:
        raise ProtocolError("invalid_field", f"{path} = {value} is outside {low}..{high}", path)
    return value


def check_number(value: Any, path: str, low: float, high: float, low_open: bool = False) -> float:
    if type(value) not in (int, float):
        raise ProtocolError("invalid_field", f"{path} must be a number, not {_type_name(value)}", path)
    number = float(value)
    if not math.isfinite(number):
        raise ProtocolError("invalid_field", f"{path} must be finite, not {number}", path)
    if number > high or number < low or (low_open and number == low):
        bracket = "(" if low_open else "["
        raise ProtocolError("invalid_field", f"{path} = {number} is outside {bracket}{low:g}, {high:g}]", path)
    return number


def check_list(value: Any, path: str, max_items: int, min_items: int = 0) -> list:
    if not isinstance(value, list):
        raise ProtocolError("invalid_field", f"{path} must be a list, not {_type_name(value)}", path)
    if len(value) > max_items:
        raise ProtocolError("too_large", f"{path} has {len(value)} items; the limit is {max_items}", path)
    if len(value) < min_items:
        raise ProtocolError("invalid_field", f"{path} needs at least {min_items} item(s)", path)
    return value


def peek_request_id(body: Any) -> Optional[str]:
    """The request id, if the body has a usable one: error replies echo it when they can."""
    if isinstance(body, dict):
        value = body.get("id")
        if isinstance(value, str) and 1 <= len(value) <= MAX_ID_CHARS:
            return value
    return None


def parse_envelope(body: Any) -> Envelope:
    """Check the envelope (protocol, id, type, content) of a decoded request body."""
    if not isinstance(body, dict):
        raise ProtocolError("bad_message", f"the body must be a msgpack map, not {_type_name(body)}")
    warnings: list[str] = []
    reader = _Reader(body, "message", warnings)
    version = reader.get("protocol", False)
    if not isinstance(version, str):
        raise ProtocolError("bad_message", "message.protocol is missing or not a string", "message.protocol")
    if not version_compatible(version):
        raise ProtocolError("unsupported_version",
                            f"protocol {version!r} is not supported; this daemon speaks {PROTOCOL_VERSION}",
                            "message.protocol")
    request_id = reader.get("id", False)
    if not isinstance(request_id, str) or not 1 <= len(request_id) <= MAX_ID_CHARS:
        raise ProtocolError("bad_message", f"message.id must be a string of 1..{MAX_ID_CHARS} characters",
                            "message.id")
    message_type = reader.get("type", False)
    if not isinstance(message_type, str):
        raise ProtocolError("bad_message", "message.type is missing or not a string", "message.type")
    if message_type not in MESSAGE_TYPES:
        raise ProtocolError("unknown_type", f"unknown message type {message_type[:40]!r}; "
                            f"known: {', '.join(MESSAGE_TYPES)}", "message.type")
    content = reader.get("content", False)
    if not isinstance(content, dict):
        raise ProtocolError("bad_message", "message.content is missing or not a map", "message.content")
    reader.finish()
    return Envelope(request_id, message_type, content, tuple(warnings))


def parse_infill(content: dict, limits: Limits, warnings: list[str]) -> InfillRequest:
    """Validate an infill's content and build the Song the engine reads."""
    reader = _Reader(content, "content", warnings)
    session = reader.string("session", max_chars=MAX_SESSION_CHARS)
    track_values = reader.array("tracks", limits.max_tracks, min_items=1)
    budget = [limits.max_notes]
    tracks = [_parse_track(value, f"content.tracks[{i}]", limits, budget, warnings)
              for i, value in enumerate(track_values)]
    tempo_map = _parse_tempo(reader, limits)
    meter = _parse_meter(reader, limits)
    start_qn, end_qn = _parse_range(reader, limits)
    targets = _parse_targets(reader, len(tracks), limits)
    options = parse_options(reader.get("options", False), limits, warnings)
    for index, (track, _) in enumerate(options.controls):
        if track not in targets:
            path = f"content.options.controls[{index}].track"
            raise ProtocolError("invalid_field", f"{path} = {track} is not one of the targets {list(targets)}", path)
    timeout_ms = reader.integer("timeout_ms", 1, limits.max_timeout_ms, required=False)
    reader.finish()
    song = Song(tracks=tracks, tempo_map=tempo_map, meter=meter)
    return InfillRequest(session, song, start_qn, end_qn, targets, options, timeout_ms)


def _parse_track(value: Any, path: str, limits: Limits, note_budget: list[int], warnings: list[str]) -> Track:
    reader = _Reader(value, path, warnings)
    name = reader.string("name", required=False, min_chars=0, default="")
    program = reader.integer("program", 0, 127)
    is_drum = reader.boolean("drum", default=False)
    channel = reader.integer("channel", 0, 15, required=False)
    note_values = reader.array("notes", note_budget[0])
    note_budget[0] -= len(note_values)
    notes = [_parse_note(note, f"{path}.notes[{i}]", limits.max_position_qn) for i, note in enumerate(note_values)]
    reader.finish()
    return Track(name=name, program=program, is_drum=is_drum, notes=normalize_notes(notes)[0], channel=channel)


def _parse_note(value: Any, path: str, max_position_qn: float) -> Note:
    if not isinstance(value, list) or len(value) != 4:
        raise ProtocolError("invalid_field", f"{path} must be [start_qn, duration_qn, pitch, velocity]", path)
    start_qn = check_number(value[0], f"{path}[0]", 0.0, max_position_qn)
    duration_qn = check_number(value[1], f"{path}[1]", 0.0, max_position_qn)
    pitch = check_int(value[2], f"{path}[2]", 0, 127)
    velocity = check_int(value[3], f"{path}[3]", 1, 127)
    return Note(start_qn, duration_qn, pitch, velocity)


def _parse_changes(reader: _Reader, key: str, limits: Limits, fields: tuple[str, ...], parse_change, build,
                   default):
    """A time map from the list under key: each change a list of len(fields) values read by
    parse_change(change, path), the map built by build(changes) (default() when the key is absent)."""
    values = reader.array(key, limits.max_tempo_changes, required=False)
    if values is None:
        return default()
    path = reader.child(key)
    changes = []
    for i, change in enumerate(values):
        item = f"{path}[{i}]"
        if not isinstance(change, list) or len(change) != len(fields):
            raise ProtocolError("invalid_field", f"{item} must be [{', '.join(fields)}]", item)
        changes.append(parse_change(change, item))
    try:
        return build(changes)
    except TimeMapError as error:
        raise ProtocolError("invalid_field", f"{path}: {error}", path) from None


def _parse_tempo(reader: _Reader, limits: Limits) -> TempoMap:
    def change(value: list, item: str) -> tuple[float, float]:
        return (check_number(value[0], f"{item}[0]", 0.0, limits.max_position_qn),
                check_number(value[1], f"{item}[1]", 1.0, 1000.0))

    return _parse_changes(reader, "tempo", limits, ("qn", "bpm"), change, TempoMap.from_changes, TempoMap.constant)


def _parse_meter(reader: _Reader, limits: Limits) -> Meter:
    def change(value: list, item: str) -> tuple[float, int, int]:
        qn = check_number(value[0], f"{item}[0]", 0.0, limits.max_position_qn)
        numerator = check_int(value[1], f"{item}[1]", 1, MAX_METER_NUMERATOR)
        denominator = check_int(value[2], f"{item}[2]", 1, METER_DENOMINATORS[-1])
        if denominator not in METER_DENOMINATORS:
            raise ProtocolError("invalid_field", f"{item}[2] = {denominator} is not a power of two", f"{item}[2]")
        return qn, numerator, denominator

    return _parse_changes(reader, "time_signatures", limits, ("qn", "numerator", "denominator"), change,
                          Meter.from_changes, Meter.constant)


def _parse_range(reader: _Reader, limits: Limits) -> tuple[float, float]:
    values = reader.get("range", True)
    path = reader.child("range")
    if not isinstance(values, list) or len(values) != 2:
        raise ProtocolError("invalid_field", f"{path} must be [start_qn, end_qn]", path)
    start_qn = check_number(values[0], f"{path}[0]", 0.0, limits.max_position_qn)
    end_qn = check_number(values[1], f"{path}[1]", 0.0, limits.max_position_qn)
    if end_qn <= start_qn:
        raise ProtocolError("invalid_field", f"{path} [{start_qn:g}, {end_qn:g}) is empty: its end must "
                            "come after its start", path)
    if end_qn - start_qn > limits.max_range_qn:
        raise ProtocolError("too_large", f"{path} spans {end_qn - start_qn:g} QN; the limit is "
                            f"{limits.max_range_qn:g} QN", path)
    return start_qn, end_qn


def _parse_targets(reader: _Reader, n_tracks: int, limits: Limits) -> tuple[int, ...]:
    values = reader.array("targets", limits.max_tracks, min_items=1)
    path = reader.child("targets")
    targets = tuple(check_int(v, f"{path}[{i}]", 0, n_tracks - 1) for i, v in enumerate(values))
    if len(set(targets)) != len(targets):
        raise ProtocolError("invalid_field", f"{path} names a track more than once", path)
    return targets


def parse_options(value: Any, limits: Limits, warnings: list[str],
                  path: str = "content.options") -> InfillRequestOptions:
    """An infill's options map; also what `cmi-daemon infill` checks its flags with, offline too."""
    if value is None:
        return InfillRequestOptions()
    reader = _Reader(value, path, warnings)
    options = InfillRequestOptions(
        candidates=reader.integer("candidates", 1, limits.max_candidates, required=False, default=1),
        temperature=reader.number("temperature", 0.0, MAX_TEMPERATURE, required=False),
        top_p=reader.number("top_p", 0.0, 1.0, low_open=True, required=False),
        top_k=reader.integer("top_k", 0, MAX_TOP_K, required=False),
        repetition_penalty=reader.number("repetition_penalty", 0.0, MAX_REPETITION_PENALTY, required=False),
        seed=reader.integer("seed", 0, MAX_SEED, required=False),
        profile=reader.string("profile", required=False, max_chars=MAX_PROFILE_CHARS, pattern=PROFILE_PATTERN,
                              default=DEFAULT_PROFILE),
        controls=_parse_controls(reader, limits, warnings),
        follow_repeat=reader.number("follow_repeat", 0.0, 1.0, required=False),
    )
    reader.finish()
    return options


def _parse_controls(options: _Reader, limits: Limits, warnings: list[str]) -> tuple:
    """`options.controls`: a list of per-track control maps (docs/protocol.md 5.2)."""
    values = options.array("controls", limits.max_tracks, required=False) or []
    parsed, seen = [], set()
    for index, value in enumerate(values):
        reader = _Reader(value, f"{options.child('controls')}[{index}]", warnings)
        track = reader.integer("track", 0, limits.max_tracks - 1)
        if track in seen:
            raise ProtocolError("invalid_field", f"{reader.child('track')} = {track} has controls twice",
                                reader.child("track"))
        seen.add(track)
        grid = reader.string("grid", required=False, max_chars=16, default="auto")
        try:
            request = track_controls.ControlRequest(
                density_per_qn=reader.number("density_per_qn", 0.0, track_controls.MAX_DENSITY_PER_QN,
                                             low_open=True, required=False),
                max_polyphony=reader.integer("max_polyphony", 1, track_controls.MAX_POLYPHONY, required=False),
                pitch_range=_pair(reader, "pitch_range", 0, 127),
                note_length_qn=reader.number("note_length_qn", 0.0, track_controls.MAX_NOTE_LENGTH_QN,
                                             low_open=True, required=False),
                velocity_range=_pair(reader, "velocity_range", 1, 127),
                grid=track_controls.parse_grid(grid))
        except CMIError as error:  # the grid's name
            raise ProtocolError("invalid_field", f"{reader.child('grid')}: {error}", reader.child("grid")) from None
        reader.finish()
        parsed.append((track, request))
    return tuple(parsed)


def _pair(reader: _Reader, key: str, low: int, high: int) -> Optional[tuple[int, int]]:
    """An optional [low, high] of integers in low..high, low <= high."""
    values = reader.array(key, 2, required=False)
    if values is None:
        return None
    path = reader.child(key)
    if len(values) != 2:
        raise ProtocolError("invalid_field", f"{path} must be [low, high], not {len(values)} numbers", path)
    pair = (check_int(values[0], f"{path}[0]", low, high), check_int(values[1], f"{path}[1]", low, high))
    if pair[0] > pair[1]:
        raise ProtocolError("invalid_field", f"{path}: low {pair[0]} is above high {pair[1]}", path)
    return pair


def fixed_limits() -> dict:
    """The bounds the protocol fixes (no config key changes them), reported by `hello` with the Limits."""
    return {"max_session_chars": MAX_SESSION_CHARS, "max_track_name_chars": MAX_NAME_CHARS,
            "max_profile_chars": MAX_PROFILE_CHARS, "max_meter_numerator": MAX_METER_NUMERATOR,
            "max_temperature": MAX_TEMPERATURE, "max_top_k": MAX_TOP_K,
            "max_repetition_penalty": MAX_REPETITION_PENALTY, "max_seed": MAX_SEED}


def parse_feedback(content: dict, warnings: list[str]) -> tuple[str, str, int]:
    reader = _Reader(content, "content", warnings)
    session = reader.string("session", max_chars=MAX_SESSION_CHARS)
    verdict = reader.string("verdict", max_chars=16)
    if verdict not in VERDICTS:
        raise ProtocolError("invalid_field", f"content.verdict must be one of {', '.join(VERDICTS)}",
                            "content.verdict")
    candidate = reader.integer("candidate", 0, 1_000_000, required=False, default=0)
    reader.finish()
    return session, verdict, candidate


def parse_cancel(content: dict, warnings: list[str]) -> str:
    reader = _Reader(content, "content", warnings)
    request_id = reader.string("request", max_chars=MAX_ID_CHARS)
    reader.finish()
    return request_id


def parse_profiles(content: dict, warnings: list[str]) -> tuple[str, Optional[str]]:
    reader = _Reader(content, "content", warnings)
    action = reader.string("action", required=False, max_chars=16, default="list")
    if action not in ("list", "reset"):
        raise ProtocolError("invalid_field", "content.action must be list or reset", "content.action")
    name = reader.string("name", required=action == "reset", max_chars=MAX_PROFILE_CHARS,
                         pattern=PROFILE_PATTERN)
    reader.finish()
    return action, name


def parse_empty(content: dict, warnings: list[str], optional_strings: tuple[str, ...] = ()) -> dict:
    """Content of hello / status / shutdown: no fields, or a few optional strings."""
    reader = _Reader(content, "content", warnings)
    values = {key: reader.string(key, required=False, max_chars=64) for key in optional_strings}
    reader.finish()
    return values
