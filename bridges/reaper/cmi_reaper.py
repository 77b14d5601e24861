"""Shared logic of the CMI actions in REAPER: read the selection, ask the daemon, write the answer.

The actions run in REAPER's embedded Python and talk to the daemon through cmi_daemon.client
(which needs only pyzmq, msgpack, psutil and the standard library) instead of a second copy of the
protocol here: one implementation of framing and signing, tested against the daemon. REAPER
loads a libpython whose sys.path usually lacks the environment CMI is installed in (a venv's
libpython belongs to its base interpreter), so `cmi-daemon install reaper` writes
cmi_python.json next to this file with that environment's import paths; they are appended to
sys.path before the client is imported.

Nothing here waits on the daemon: a request is sent, then an RPR_defer loop polls for the reply
without blocking, so REAPER's UI stays live while the model works. An infill starts with `hello`,
whose limits (tracks, notes, range, context bars, name lengths, timeout) shape the request.

REAPER's Python cannot validate a handle (RPR_ValidatePtr2 answers False for every pointer), so a
take deleted while the daemon works is recognised by its NULL results instead, and an edited one
by its MIDI hash (or, when REAPER's Python cannot decode that hash, by its notes).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields
from typing import Callable, Optional

import reaper_python as rpr

EXT_SECTION = "CMI"
LAST_SESSION_KEY = "last_session"
LAST_LABEL_KEY = "last_label"
PATHS_FILE_NAME = "cmi_python.json"
MESSAGE_TITLE = "CMI"
MB_OK = 0
UNDO_STATE_ITEMS = 4
CURRENT_PROJECT = 0

SHORT_REPLY_TIMEOUT_MS = 5_000
"""How long `hello` and `feedback`, which the daemon answers at once, may take."""
HASH_BUFFER_CHARS = 64
REPLY_MARGIN_MS = 5_000
STATUS_INTERVAL_S = 5.0
QN_EPSILON = 1e-6
QN_DECIMALS = 6
LINEAR_TEMPO_STEP_QN = 1.0
"""A gradual (linear) tempo ramp is sent as steps of this many quarter notes."""
DRUM_CHANNEL = 9
DRUM_NAME_WORDS = ("drum", "perc", "kit")
PROGRAM_CHANGE = 0xC0
POLL_CODE = "import cmi_reaper; cmi_reaper.poll_pending()"
ABANDON_CODE = "import cmi_reaper; cmi_reaper.abandon_pending()"

INFILL_ACTION = "CMI: Infill selection"
ACCEPT_ACTION = "CMI: Accept infill"
SETTINGS_ACTION = "CMI: Infill settings"
CONTROLS_KEY = "controls"
"""Project state (saved with the project) holding the infill settings as JSON."""
CONTROL_FIELDS = (
    ("density_per_qn", "Notes per quarter note", float),
    ("max_polyphony", "Most notes at once", int),
    ("pitch_range", "Pitch range (e.g. 48-72)", "range"),
    ("note_length_qn", "Note length (quarter notes)", float),
    ("velocity_range", "Velocity range (e.g. 60-110)", "range"),
    ("grid", "Grid (auto or off or 1/16 or 1/8T ...)", str),
)
"""The daemon's per-track controls (docs/protocol.md 5.2), a caption each; an empty field takes what
the track does around the selection."""
OPTION_FIELDS = (
    ("follow_repeat", "Follow the song's repeats (0-1)", "share"),
)
"""The request's own options in the dialog; an empty field takes the daemon's default."""
SETTING_FIELDS = CONTROL_FIELDS + OPTION_FIELDS
"""Every field of the settings dialog, in its order."""
USER_INPUT_CHARS = 512
START_COMMAND = "cmi-daemon start --detach"
CLIENT_NAME = "cmi-reaper"


class BridgeError(Exception):
    """Something the musician can fix; the message says what and how, and nothing was changed."""


@dataclass(frozen=True)
class DaemonLimits:
    """What the daemon's `hello` says a request may hold (docs/protocol.md section 8), and the context
    and timeout it asks bridges to use."""

    max_tracks: int
    max_notes: int
    max_range_qn: float
    max_session_chars: int
    max_track_name_chars: int
    context_bars: int
    request_timeout_ms: int


@dataclass
class RawNote:
    """A note as REAPER stores it in a take: positions in the take's ticks (ppq)."""

    selected: int
    muted: int
    start_ppq: float
    end_ppq: float
    channel: int
    pitch: int
    velocity: int


@dataclass
class Target:
    """One take to infill, with what it looked like when the request was sent."""

    take: str
    item: str
    name: str
    guid: str
    channel: int
    fingerprint: tuple


@dataclass
class Selection:
    start_qn: float
    end_qn: float
    label: str
    targets: list


@dataclass
class Pending:
    """The one request in flight: polled from the defer loop until it is answered or times out."""

    client: object
    request_id: str
    description: str
    on_reply: Callable[[dict], None]
    started_s: float
    deadline_s: float
    next_status_s: float


_pending: Optional[Pending] = None
_client_module = None


# ----- talking to the musician -----

def show_error(message: str) -> None:
    rpr.RPR_MB(message, MESSAGE_TITLE, MB_OK)


def show_status(message: str) -> None:
    rpr.RPR_ShowConsoleMsg(f"CMI: {message}\n")


def run_action(start: Callable[[], None]) -> None:
    """Run an action's first step; a BridgeError becomes a message box and nothing else happens."""
    try:
        start()
    except BridgeError as error:
        show_error(str(error))


# ----- the client, from the environment the installer recorded -----

def reaper_python_path() -> str:
    """The interpreter REAPER loaded. sys.executable is often REAPER itself, so when it is not a
    Python, the interpreter is derived from the library's prefix."""
    executable = sys.executable or ""
    if os.path.basename(executable).lower().startswith("python"):
        return executable
    if os.name == "nt":
        return os.path.join(sys.base_prefix, "python.exe")
    return os.path.join(sys.base_prefix, "bin", f"python{sys.version_info[0]}.{sys.version_info[1]}")


def add_install_paths() -> None:
    """Append the import paths `cmi-daemon install reaper` recorded (absent when not installed)."""
    paths_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), PATHS_FILE_NAME)
    try:
        with open(paths_file, encoding="utf-8") as file:
            recorded = json.load(file).get("sys_path", [])
    except (OSError, ValueError):
        return
    for path in recorded:
        if path not in sys.path:
            sys.path.append(path)


def load_client():
    """cmi_daemon.client, or a BridgeError that says how to make it importable."""
    global _client_module
    if _client_module is not None:
        return _client_module
    add_install_paths()
    python = reaper_python_path()
    for module_name, package in (("zmq", "pyzmq"), ("msgpack", "msgpack"), ("psutil", "psutil")):
        try:
            importlib.import_module(module_name)
        except ImportError:
            raise BridgeError(
                f"REAPER's Python ({python}) cannot import {package}, which CMI needs to reach its daemon.\n\n"
                f"Install it for that interpreter:\n    \"{python}\" -m pip install pyzmq msgpack psutil\n\n"
                "or point REAPER at the Python CMI is installed in: quit REAPER, run "
                "`cmi-daemon install reaper`, and start REAPER again.") from None
    try:
        _client_module = importlib.import_module("cmi_daemon.client")
    except ImportError:
        raise BridgeError(
            f"REAPER's Python ({python}) cannot import the CMI package. Quit REAPER, run "
            "`cmi-daemon install reaper` in the environment CMI is installed in, and start REAPER again.") from None
    return _client_module


def connect(client_module, timeout_ms: int):
    try:
        return client_module.DaemonClient(timeout_ms=timeout_ms, client_name=CLIENT_NAME)
    except client_module.DaemonNotRunning as error:
        raise BridgeError(f"{error}.\n\nIn a terminal: {START_COMMAND}") from None
    except ImportError:
        raise BridgeError("CMI cannot find its daemon's connection file from REAPER (appdirs is missing). "
                          "Quit REAPER, run `cmi-daemon install reaper`, and start REAPER again.") from None
    except client_module.CMIError as error:
        raise BridgeError(str(error)) from None


def daemon_limits(hello: dict) -> DaemonLimits:
    """The limits of a `hello` reply; a BridgeError when the daemon reports too few of them."""
    reported = hello.get("limits") or {}
    missing = [f.name for f in fields(DaemonLimits) if f.name not in reported]
    if missing:
        raise BridgeError(f"The CMI daemon does not report its limits {', '.join(missing)}: it is older than "
                          "these actions. Stop it (`cmi-daemon stop`) and start the one CMI's actions came "
                          f"with: {START_COMMAND}")
    return DaemonLimits(**{f.name: reported[f.name] for f in fields(DaemonLimits)})


# ----- the request in flight -----

def defer(code: str) -> None:
    sys.modules["__main__"].RPR_defer(code)


def start_pending(client, request_id: str, description: str, on_reply: Callable[[dict], None],
                  timeout_ms: int) -> None:
    global _pending
    now_s = time.monotonic()
    _pending = Pending(client, request_id, description, on_reply, now_s,
                       now_s + (timeout_ms + REPLY_MARGIN_MS) / 1000.0, now_s + STATUS_INTERVAL_S)
    sys.modules["__main__"].RPR_atexit(ABANDON_CODE)
    defer(POLL_CODE)


def finish_pending() -> Pending:
    global _pending
    pending, _pending = _pending, None
    pending.client.close()
    return pending


def poll_pending() -> None:
    """One tick of the defer loop: take the reply if it is there, else look again next tick."""
    pending = _pending
    if pending is None:
        return
    client_module = _client_module
    try:
        reply = pending.client.poll_reply(pending.request_id)
    except client_module.DaemonNotRunning as error:
        finish_pending()
        show_error(f"{error}.\n\nIn a terminal: {START_COMMAND}")
        return
    now_s = time.monotonic()
    if reply is None:
        if now_s > pending.deadline_s:
            finish_pending()
            show_error(f"No reply from the CMI daemon while {pending.description} "
                       f"({pending.deadline_s - pending.started_s:.0f} s); nothing was changed. "
                       "`cmi-daemon status` shows what it is doing.")
            return
        if now_s >= pending.next_status_s:
            pending.next_status_s = now_s + STATUS_INTERVAL_S
            show_status(f"still {pending.description} ({now_s - pending.started_s:.0f} s)")
        defer(POLL_CODE)
        return
    finish_pending()
    try:
        content = client_module.reply_content(reply)
    except client_module.DaemonError as error:
        show_error(f"The CMI daemon could not finish {pending.description}; nothing was changed.\n\n"
                   f"{error.code}: {error}")
        return
    run_action(lambda: pending.on_reply(content))


def abandon_pending() -> None:
    """REAPER ends the script (its defer loop was stopped): forget the request, close the socket."""
    if _pending is not None:
        finish_pending()


def refuse_if_busy() -> None:
    if _pending is not None:
        raise BridgeError(f"CMI is still {_pending.description}; wait for it to finish.")


# ----- reading the project -----

def is_null(handle) -> bool:
    text = str(handle)
    return "0x" not in text or int(text.rsplit("0x", 1)[1], 16) == 0


def time_to_qn(time_s: float) -> float:
    return rpr.RPR_TimeMap2_timeToQN(CURRENT_PROJECT, time_s)


def qn_to_time(qn: float) -> float:
    return rpr.RPR_TimeMap2_QNToTime(CURRENT_PROJECT, qn)


def measure_index(qn: float) -> int:
    """0-based measure containing qn (TimeMap_QNToMeasures counts from 1)."""
    return int(rpr.RPR_TimeMap_QNToMeasures(CURRENT_PROJECT, qn, 0, 0)[0]) - 1


def measure_info(index: int) -> tuple:
    """(qn_start, qn_end, numerator, denominator, bpm) of a 0-based measure."""
    _, _, _, qn_start, qn_end, numerator, denominator, bpm = rpr.RPR_TimeMap_GetMeasureInfo(
        CURRENT_PROJECT, index, 0, 0, 0, 0, 0)
    return qn_start, qn_end, numerator, denominator, bpm


def bars_label(start_qn: float, end_qn: float) -> str:
    first_bar = measure_index(start_qn) + 1
    last_bar = measure_index(max(start_qn, end_qn - QN_EPSILON)) + 1
    return f"bar {first_bar}" if first_bar == last_bar else f"bars {first_bar}-{last_bar}"


def read_time_selection() -> tuple:
    _, _, start_s, end_s, _ = rpr.RPR_GetSet_LoopTimeRange(0, 0, 0.0, 0.0, 0)
    if end_s <= start_s:
        raise BridgeError("Nothing to infill: make a time selection over the bars to rewrite, select their "
                          f"MIDI items (or tracks), then run {INFILL_ACTION} again.")
    return round(time_to_qn(start_s), QN_DECIMALS), round(time_to_qn(end_s), QN_DECIMALS)


def candidate_items() -> list:
    """The selected items, or, when none is selected, every item on the selected tracks."""
    n_selected = rpr.RPR_CountSelectedMediaItems(CURRENT_PROJECT)
    if n_selected:
        return [rpr.RPR_GetSelectedMediaItem(CURRENT_PROJECT, i) for i in range(n_selected)]
    items = []
    for t in range(rpr.RPR_CountSelectedTracks(CURRENT_PROJECT)):
        track = rpr.RPR_GetSelectedTrack(CURRENT_PROJECT, t)
        items += [rpr.RPR_GetTrackMediaItem(track, i) for i in range(rpr.RPR_CountTrackMediaItems(track))]
    return items


def item_bounds_qn(item) -> tuple:
    position_s = rpr.RPR_GetMediaItemInfo_Value(item, "D_POSITION")
    length_s = rpr.RPR_GetMediaItemInfo_Value(item, "D_LENGTH")
    return time_to_qn(position_s), time_to_qn(position_s + length_s)


def track_name(take) -> str:
    track = rpr.RPR_GetMediaItemTake_Track(take)
    return str(rpr.RPR_GetTrackName(track, "", 512)[2])


def take_guid(take) -> str:
    return str(rpr.RPR_GetSetMediaItemTakeInfo_String(take, "GUID", "", 0)[3])


def note_state(take) -> tuple:
    """What the take's notes are: ("hash", MIDI_GetHash of the notes) or, when REAPER's Python cannot
    decode that hash (its wrapper reads it as UTF-8, and the format is undocumented), ("notes", every
    note but its selection); ("gone",) when REAPER answers no hash (a deleted take reads as NULL).
    A hash that decoded before and does not now is a different hash: the notes changed."""
    try:
        ok, _, _, note_hash, _ = rpr.RPR_MIDI_GetHash(take, 1, "", HASH_BUFFER_CHARS)
    except UnicodeDecodeError:
        return ("notes", tuple((note.muted, note.start_ppq, note.end_ppq, note.channel, note.pitch, note.velocity)
                               for note in read_notes(take)))
    return ("hash", note_hash) if ok else ("gone",)


def take_fingerprint(take, item) -> tuple:
    """Changes when the take's notes or its item's place in time change."""
    return (note_state(take),) \
        + tuple(rpr.RPR_GetMediaItemInfo_Value(item, key) for key in ("D_POSITION", "D_LENGTH")) \
        + tuple(rpr.RPR_GetMediaItemTakeInfo_Value(take, key) for key in ("D_STARTOFFS", "D_PLAYRATE"))


def ppq_at(take, qn: float) -> float:
    return rpr.RPR_MIDI_GetPPQPosFromProjQN(take, qn)


def qn_at(take, ppq: float) -> float:
    return rpr.RPR_MIDI_GetProjQNFromPPQPos(take, ppq)


def read_notes(take) -> list:
    n_notes = rpr.RPR_MIDI_CountEvts(take, 0, 0, 0)[2]
    notes = []
    for index in range(n_notes):
        ok, _, _, selected, muted, start_ppq, end_ppq, channel, pitch, velocity = rpr.RPR_MIDI_GetNote(
            take, index, 0, 0, 0, 0, 0, 0, 0)
        if ok:
            notes.append(RawNote(selected, muted, start_ppq, end_ppq, channel, pitch, velocity))
    return notes


def read_program(take, start_ppq: float) -> Optional[int]:
    """The last program change at or before start_ppq, else the take's first one, else None."""
    n_ccs = rpr.RPR_MIDI_CountEvts(take, 0, 0, 0)[3]
    before, first = None, None
    for index in range(n_ccs):
        ok, _, _, _, _, ppq, message, _, program, _ = rpr.RPR_MIDI_GetCC(take, index, 0, 0, 0, 0, 0, 0, 0)
        if not ok or (message & 0xF0) != PROGRAM_CHANGE:
            continue
        first = program if first is None else first
        if ppq <= start_ppq:
            before = program
    return before if before is not None else first


def check_item(item, take, name: str, start_qn: float, end_qn: float) -> None:
    """Refuse items whose notes under the range cannot be edited as one pass of the take's source."""
    item_start_qn, item_end_qn = item_bounds_qn(item)
    if start_qn < item_start_qn - QN_EPSILON or end_qn > item_end_qn + QN_EPSILON:
        raise BridgeError(f"The time selection runs past an edge of the MIDI item on track \"{name}\"; "
                          "shorten the selection to lie inside the item (or extend the item) and try again.")
    if rpr.RPR_GetMediaItemTakeInfo_Value(take, "D_PLAYRATE") != 1.0:
        raise BridgeError(f"The MIDI item on track \"{name}\" plays at a rate other than 1.0; CMI only edits "
                          "items at their normal rate.")
    if rpr.RPR_GetMediaItemInfo_Value(item, "B_LOOPSRC") and item_loops(take, item_start_qn, item_end_qn):
        raise BridgeError(f"The MIDI item on track \"{name}\" loops its source, so an edit would repeat in "
                          "every loop. Glue the item (Item > Glue items) or turn off its \"Loop source\" "
                          "and try again.")


def item_loops(take, item_start_qn: float, item_end_qn: float) -> bool:
    """Whether the item plays past the end of its source (ticks count from the source's start)."""
    source = rpr.RPR_GetMediaItemTake_Source(take)
    length, _, length_is_qn = rpr.RPR_GetMediaSourceLength(source, 0)
    if not length_is_qn:
        return True
    ppq_per_qn = ppq_at(take, item_start_qn + 1.0) - ppq_at(take, item_start_qn)
    return ppq_at(take, item_end_qn) > length * ppq_per_qn + 0.5


def select_targets(start_qn: float, end_qn: float) -> list:
    items = candidate_items()
    midi = []
    for item in items:
        take = rpr.RPR_GetActiveTake(item)
        if not is_null(take) and rpr.RPR_TakeIsMIDI(take):
            midi.append((item, take))
    if not midi:
        raise BridgeError("Nothing to infill: select the MIDI items (or their tracks) under the time selection, "
                          f"then run {INFILL_ACTION} again.")
    overlapping = []
    for item, take in midi:
        item_start_qn, item_end_qn = item_bounds_qn(item)
        if item_start_qn < end_qn - QN_EPSILON and item_end_qn > start_qn + QN_EPSILON:
            overlapping.append((item, take))
    if not overlapping:
        raise BridgeError(f"The time selection ({bars_label(start_qn, end_qn)}) is outside the selected MIDI "
                          "items: move the time selection onto them, or select the items under it.")
    targets = []
    for item, take in overlapping:
        name = track_name(take)
        check_item(item, take, name, start_qn, end_qn)
        targets.append(Target(take, item, name, take_guid(take), 0, take_fingerprint(take, item)))
    return targets


def read_selection() -> Selection:
    start_qn, end_qn = read_time_selection()
    return Selection(start_qn, end_qn, bars_label(start_qn, end_qn), select_targets(start_qn, end_qn))


def check_selection(selection: Selection, limits: DaemonLimits) -> None:
    """Refuse a selection larger than the daemon takes, saying what to select instead."""
    length_qn = selection.end_qn - selection.start_qn
    if length_qn > limits.max_range_qn:
        raise BridgeError(f"The time selection is {length_qn:g} quarter notes long; the CMI daemon infills at most "
                          f"{limits.max_range_qn:g} at once. Select fewer bars.")
    if len(selection.targets) > limits.max_tracks:
        raise BridgeError(f"{len(selection.targets)} MIDI items are selected; the CMI daemon infills at most "
                          f"{limits.max_tracks} at once. Select fewer items.")


# ----- the request -----

def context_bounds_qn(start_qn: float, end_qn: float, context_bars: int) -> tuple:
    """context_bars of the project's own bars on each side of the range."""
    first = max(0, measure_index(start_qn) - context_bars)
    last = measure_index(max(start_qn, end_qn - QN_EPSILON)) + context_bars
    return max(measure_info(first)[0], 0.0), measure_info(last)[1]


def track_entry(target: Target, start_qn: float, context_start_qn: float, context_end_qn: float,
                max_name_chars: int) -> dict:
    """The protocol's track map for one take: its audible notes in the context window, in project QN."""
    take = target.take
    item_start_qn, item_end_qn = item_bounds_qn(target.item)
    raw_notes = read_notes(take)
    channels = Counter(note.channel for note in raw_notes)
    is_drum = channels[DRUM_CHANNEL] > 0 or any(word in target.name.lower() for word in DRUM_NAME_WORDS)
    if channels:
        target.channel = channels.most_common(1)[0][0]
    else:
        target.channel = DRUM_CHANNEL if is_drum else 0
    notes = []
    for note in raw_notes:
        note_start_qn = qn_at(take, note.start_ppq)
        note_end_qn = min(qn_at(take, note.end_ppq), item_end_qn)
        if note.muted or note_start_qn < item_start_qn - QN_EPSILON or note_start_qn >= item_end_qn:
            continue
        if note_start_qn >= context_end_qn or note_end_qn <= context_start_qn or note_end_qn < note_start_qn:
            continue  # a zero-length note is sent: the daemon's degenerate-note rule keeps it (docs/protocol.md)
        notes.append([round(max(note_start_qn, 0.0), QN_DECIMALS), round(note_end_qn - note_start_qn, QN_DECIMALS),
                      int(note.pitch), max(1, int(note.velocity))])
    program = read_program(take, ppq_at(take, start_qn))
    return {"name": target.name[:max_name_chars], "program": 0 if program is None else int(program),
            "drum": is_drum, "channel": target.channel, "notes": notes}


def linear_ramp(start_qn: float, end_qn: float) -> list:
    """[qn, bpm] steps that follow a gradual tempo change, each step's bpm from REAPER's own time map."""
    steps = []
    qn = start_qn
    while qn < end_qn - QN_EPSILON:
        step_qn = min(LINEAR_TEMPO_STEP_QN, end_qn - qn)
        duration_s = qn_to_time(qn + step_qn) - qn_to_time(qn)
        steps.append([round(qn, QN_DECIMALS), 60.0 * step_qn / duration_s])
        qn += step_qn
    return steps


def read_tempo_map(context_end_qn: float) -> tuple:
    """(tempo, time_signatures) of the protocol, from the project's markers up to the context's end."""
    _, _, numerator, denominator, bpm = measure_info(0)
    tempo = [[0.0, bpm]]
    signatures = [[0.0, int(numerator), int(denominator)]]
    markers = []
    for index in range(rpr.RPR_CountTempoTimeSigMarkers(CURRENT_PROJECT)):
        ok, _, _, time_s, _, _, marker_bpm, marker_numerator, marker_denominator, linear = \
            rpr.RPR_GetTempoTimeSigMarker(CURRENT_PROJECT, index, 0, 0, 0, 0, 0, 0, 0)
        if ok:
            markers.append((round(time_to_qn(time_s), QN_DECIMALS), marker_bpm, marker_numerator,
                            marker_denominator, linear))
    for index, (qn, marker_bpm, marker_numerator, marker_denominator, linear) in enumerate(markers):
        if qn > context_end_qn:
            break
        next_qn = markers[index + 1][0] if index + 1 < len(markers) else None
        if linear and next_qn is not None:
            tempo += linear_ramp(qn, min(next_qn, context_end_qn))
        else:
            tempo.append([qn, marker_bpm])
        if marker_numerator > 0:
            signatures.append([qn, int(marker_numerator), int(marker_denominator)])
    return tempo, signatures


def session_id(selection: Selection, max_chars: int) -> str:
    """Take GUIDs and the range: the same takes and bars give the same session (a repeat is "not this")."""
    span = f":{selection.start_qn:g}-{selection.end_qn:g}"
    guids = ",".join(sorted(target.guid for target in selection.targets))
    if len(guids) + len(span) > max_chars:
        guids = "takes-" + hashlib.sha256(guids.encode("utf-8")).hexdigest()[:40]
    return guids + span


def infill_content(selection: Selection, limits: DaemonLimits) -> dict:
    """The infill request for the selection, within the daemon's limits (a BridgeError when it cannot be)."""
    check_selection(selection, limits)
    context_start_qn, context_end_qn = context_bounds_qn(selection.start_qn, selection.end_qn, limits.context_bars)
    tracks = [track_entry(target, selection.start_qn, context_start_qn, context_end_qn, limits.max_track_name_chars)
              for target in selection.targets]
    n_notes = sum(len(track["notes"]) for track in tracks)
    if n_notes > limits.max_notes:
        raise BridgeError(f"The selected items hold {n_notes} notes in {selection.label} and the "
                          f"{limits.context_bars} bars around them; the CMI daemon takes at most {limits.max_notes} "
                          "at once. Select fewer items.")
    tempo, signatures = read_tempo_map(context_end_qn)
    return {"session": session_id(selection, limits.max_session_chars), "tracks": tracks, "tempo": tempo,
            "time_signatures": signatures, "range": [selection.start_qn, selection.end_qn],
            "targets": list(range(len(tracks))), "options": infill_options(len(tracks)),
            "timeout_ms": limits.request_timeout_ms}


# ----- settings -----

def saved_settings() -> dict:
    """The project's infill settings (setting name -> value: the per-track controls and the request
    options); {} when none were set."""
    size, _, _, _, text, _ = rpr.RPR_GetProjExtState(CURRENT_PROJECT, EXT_SECTION, CONTROLS_KEY, "",
                                                     USER_INPUT_CHARS)
    if not size:
        return {}
    try:
        controls = json.loads(text)
    except ValueError:
        return {}
    return {key: controls[key] for key, _, _ in SETTING_FIELDS if key in controls} if isinstance(controls, dict) else {}


def infill_options(n_tracks: int) -> dict:
    """The infill's options: one candidate, the project's request options, and its controls for every track."""
    settings = saved_settings()
    options = {"candidates": 1, **{key: settings[key] for key, _, _ in OPTION_FIELDS if key in settings}}
    controls = {key: settings[key] for key, _, _ in CONTROL_FIELDS if key in settings}
    if controls:
        options["controls"] = [dict(controls, track=index) for index in range(n_tracks)]
    return options


def control_text(value) -> str:
    """A setting as the dialog shows it: 48-72 for a range, 1.5 for a number, "" for none."""
    if value is None:
        return ""
    if isinstance(value, list):
        return f"{value[0]}-{value[1]}"
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_control(caption: str, kind, text: str):
    """A dialog field's text as the daemon takes it; None for an empty field; BridgeError naming the field."""
    text = text.strip()
    if not text:
        return None
    try:
        if kind == "range":
            low, high = (int(part) for part in text.split("-"))
            return [low, high]
        if kind == "share":
            value = float(text)
            if not 0.0 <= value <= 1.0:
                raise ValueError(text)
            return value
        return kind(text)
    except ValueError:
        raise BridgeError(f"{caption}: {text!r} is not a value it takes. Leave it empty for what the track "
                          "does around the selection.") from None


def start_settings() -> None:
    """Ask for the infill settings and keep them with the project."""
    current = saved_settings()
    captions = ",".join(caption for _, caption, _ in SETTING_FIELDS) + ",extrawidth=120"
    defaults = ",".join(control_text(current.get(key)) for key, _, _ in SETTING_FIELDS)
    ok, _, _, _, answer, _ = rpr.RPR_GetUserInputs(SETTINGS_ACTION, len(SETTING_FIELDS), captions, defaults,
                                                   USER_INPUT_CHARS)
    if not ok:
        return
    texts = answer.split(",")
    if len(texts) != len(SETTING_FIELDS):
        raise BridgeError(f"{SETTINGS_ACTION}: a field held a comma; write ranges as 48-72.")
    controls = {}
    for (key, caption, kind), text in zip(SETTING_FIELDS, texts):
        value = parse_control(caption, kind, text)
        if value is not None:
            controls[key] = value
    rpr.RPR_SetProjExtState(CURRENT_PROJECT, EXT_SECTION, CONTROLS_KEY, json.dumps(controls))
    show_status("infill settings for this project: " + (", ".join(f"{caption} {control_text(controls[key])}"
                                                                 for key, caption, _ in SETTING_FIELDS
                                                                 if key in controls)
                                                       or "all from each track's own bars") + ".")


# ----- writing the answer -----

def target_change(target: Target) -> Optional[str]:
    """"deleted" or "edited" when the take can no longer take the answer as it was, else None. A deleted
    take's handle reads as NULL (its item is the zero address); one whose memory REAPER gave to a new
    take has another GUID."""
    if is_null(rpr.RPR_GetMediaItemTake_Item(target.take)) or take_guid(target.take) != target.guid:
        return "deleted"
    if take_fingerprint(target.take, target.item) != target.fingerprint:
        return "edited"
    return None


def changed_targets(selection: Selection) -> list:
    """"TRACK (deleted)" or "TRACK (edited)" for every take that changed since the request was sent."""
    changes = [(target.name, target_change(target)) for target in selection.targets]
    return [f"{name} ({change})" for name, change in changes if change is not None]


def replace_notes(target: Target, start_qn: float, end_qn: float, notes: list) -> int:
    """Delete the take's notes that start inside the range, insert the new ones, sort once."""
    take = target.take
    start_ppq, end_ppq = round(ppq_at(take, start_qn)), round(ppq_at(take, end_qn))
    n_notes = rpr.RPR_MIDI_CountEvts(take, 0, 0, 0)[2]
    for index in range(n_notes - 1, -1, -1):
        note_start_ppq = rpr.RPR_MIDI_GetNote(take, index, 0, 0, 0, 0, 0, 0, 0)[5]
        if start_ppq <= round(note_start_ppq) < end_ppq:
            rpr.RPR_MIDI_DeleteNote(take, index)
    inserted = 0
    for note_start_qn, duration_qn, pitch, velocity in notes:
        note_start_ppq = round(ppq_at(take, note_start_qn))
        note_end_ppq = min(round(ppq_at(take, note_start_qn + duration_qn)), end_ppq)
        if not start_ppq <= note_start_ppq < end_ppq:
            continue
        rpr.RPR_MIDI_InsertNote(take, 0, 0, note_start_ppq, max(note_end_ppq, note_start_ppq + 1),
                                target.channel, int(pitch), int(velocity), 1)
        inserted += 1
    rpr.RPR_MIDI_Sort(take)
    return inserted


def write_candidate(selection: Selection, candidate: dict) -> int:
    """All takes' edits as one undo point named after the action and the bars."""
    rpr.RPR_Undo_BeginBlock2(CURRENT_PROJECT)
    rpr.RPR_PreventUIRefresh(1)
    inserted = 0
    try:
        for entry in candidate["tracks"]:
            inserted += replace_notes(selection.targets[entry["track"]], selection.start_qn, selection.end_qn,
                                      entry["notes"])
    finally:
        rpr.RPR_PreventUIRefresh(-1)
        rpr.RPR_Undo_EndBlock2(CURRENT_PROJECT, f"{INFILL_ACTION} ({selection.label})", UNDO_STATE_ITEMS)
    rpr.RPR_UpdateArrange()
    return inserted


def on_infill_reply(selection: Selection, session: str, started_s: float, content: dict) -> None:
    changed = changed_targets(selection)
    if changed:
        raise BridgeError(f"The MIDI on track(s) {', '.join(changed)} changed while CMI was working on "
                          f"{selection.label}, so nothing was changed. Run {INFILL_ACTION} again.")
    inserted = write_candidate(selection, content["candidates"][0])
    rpr.RPR_SetExtState(EXT_SECTION, LAST_SESSION_KEY, session, 1)
    rpr.RPR_SetExtState(EXT_SECTION, LAST_LABEL_KEY, selection.label, 1)
    show_status(f"{selection.label} infilled: {inserted} notes in {len(selection.targets)} take(s) "
                f"({time.monotonic() - started_s:.1f} s). Run it again for another take on them, "
                f"or {ACCEPT_ACTION} to keep this one.")


# ----- the actions -----

def start_infill() -> None:
    """Read the selection, then ask the daemon for its limits; the infill is sent once they are known."""
    refuse_if_busy()
    client_module = load_client()
    selection = read_selection()
    client = connect(client_module, SHORT_REPLY_TIMEOUT_MS)
    request_id = client.send("hello", {"client": CLIENT_NAME})
    start_pending(client, request_id, "reaching the CMI daemon",
                  lambda hello: send_infill(client_module, selection, daemon_limits(hello)), SHORT_REPLY_TIMEOUT_MS)


def send_infill(client_module, selection: Selection, limits: DaemonLimits) -> None:
    content = infill_content(selection, limits)
    client = connect(client_module, limits.request_timeout_ms)
    request_id = client.send("infill", content)
    started_s = time.monotonic()
    show_status(f"infilling {selection.label} of {len(selection.targets)} take(s)...")
    start_pending(client, request_id, f"infilling {selection.label}",
                  lambda reply: on_infill_reply(selection, content["session"], started_s, reply),
                  limits.request_timeout_ms)


def start_accept() -> None:
    refuse_if_busy()
    session = rpr.RPR_GetExtState(EXT_SECTION, LAST_SESSION_KEY)
    if not session:
        raise BridgeError(f"Nothing to accept yet: run {INFILL_ACTION} first, then {ACCEPT_ACTION} to keep "
                          "the result.")
    label = rpr.RPR_GetExtState(EXT_SECTION, LAST_LABEL_KEY) or "the last infill"
    client_module = load_client()
    client = connect(client_module, SHORT_REPLY_TIMEOUT_MS)
    request_id = client.send("feedback", {"session": session, "verdict": "accept", "candidate": 0})
    start_pending(client, request_id, f"recording that you kept {label}",
                  lambda reply: show_status(f"kept {label}; CMI will learn from it (profile {reply['profile']})."),
                  SHORT_REPLY_TIMEOUT_MS)


def run_infill() -> None:
    """The action "CMI: Infill selection"."""
    run_action(start_infill)


def run_accept() -> None:
    """The action "CMI: Accept infill"."""
    run_action(start_accept)


def run_settings() -> None:
    """The action "CMI: Infill settings"."""
    run_action(start_settings)
