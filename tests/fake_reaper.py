"""A stateful stand-in for REAPER's Python ReaScript API, enough to run the CMI actions without REAPER.

It follows the facts of ../shared/docs/daw-apis.md section A: an injected `reaper_python`
module of RPR_* functions and RPR_defer/RPR_atexit in `__main__` taking code strings; handles
like "(MediaItem_Take*)0x0000000000010002" with NULL as the (truthy) zero-address string and a
handle of the wrong type read as NULL; out-arguments returned as (retval, every argument in
order) with C bools as 0/1; note indices that renumber on delete and stay unsorted until
MIDI_Sort; ticks per quarter note per take, converted only through the MIDI_* functions;
recorded undo blocks and PreventUIRefresh balance; start == end when there is no time
selection; 0-based measures in TimeMap_GetMeasureInfo and 1-based from TimeMap_QNToMeasures.

The Python wrapper's own bugs are reproduced too (daw-apis.md section A): every handle argument
is checked by the wrapper before the call, so a stale (deleted) handle reaches REAPER as NULL and
answers NULL results (a zero-address handle, a failed MIDI_GetHash, 0 from *_Info_Value), while
RPR_ValidatePtr2 answers 0 for every pointer; MIDI_GetHash's buffer comes back through the
wrapper's UTF-8 decode (up to the first NUL byte), which raises UnicodeDecodeError for a hash
that is not UTF-8.

Assumptions where REAPER's behaviour is not documented: a take's ticks map to project QN as
item_qn + ppq / ticks_per_qn (start offset 0, playrate 1); tempo markers are steps (no ramps);
MIDI_GetHash is a digest of the notes, as hex text, or (a take's `binary_hash`) as raw bytes
that are not UTF-8.
"""

from __future__ import annotations

import builtins
import hashlib
import math
import sys
import types
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

DEFAULT_TICKS_PER_QN = 960
QN_TOLERANCE = 1e-9
UNDO_BLOCK_DEPTH_LIMIT = 16


@dataclass
class Marker:
    qn: float
    time_s: float
    bpm: float
    numerator: int = 0
    denominator: int = 0


@dataclass
class Meter:
    """A time-signature segment: from start_qn, bars of numerator/denominator; first_measure is 0-based."""

    start_qn: float
    numerator: int
    denominator: int
    first_measure: int

    @property
    def bar_qn(self) -> float:
        return self.numerator * 4.0 / self.denominator


@dataclass
class FakeSource:
    length_qn: float


@dataclass
class FakeTake:
    item: "FakeItem"
    guid: str
    ticks_per_qn: int
    source: FakeSource
    notes: list = field(default_factory=list)
    """[selected, muted, start_ppq, end_ppq, channel, pitch, velocity] in storage order."""
    ccs: list = field(default_factory=list)
    """[selected, muted, ppq, chanmsg, channel, msg2, msg3]."""
    start_offset_s: float = 0.0
    playrate: float = 1.0
    midi: bool = True
    binary_hash: bool = False
    """MIDI_GetHash answers raw digest bytes (led by 0xFF, never UTF-8) instead of hex text."""


@dataclass
class FakeItem:
    track: "FakeTrack"
    position_s: float
    length_s: float
    loop_source: int = 0
    selected: bool = False
    takes: list = field(default_factory=list)
    active_take: int = 0


@dataclass
class FakeTrack:
    name: str
    selected: bool = False
    items: list = field(default_factory=list)


class FakeReaper:
    """One open project and the ReaScript functions over it; `module()` is what `reaper_python` becomes."""

    def __init__(self, bpm: float = 120.0, numerator: int = 4, denominator: int = 4):
        self.base = Marker(0.0, 0.0, bpm, numerator, denominator)
        self.markers: list[Marker] = []
        self.tracks: list[FakeTrack] = []
        self.time_selection_s = (0.0, 0.0)
        self.loop_points_s = (0.0, 0.0)
        self.undo_log: list[tuple] = []
        self.undo_depth = 0
        self.edits_outside_undo = 0
        self.ui_refresh_depth = 0
        self.ui_refresh_lowest = 0
        self.console: list[str] = []
        self.message_boxes: list[tuple] = []
        self.ext_state: dict[tuple, str] = {}
        self.project_ext_state: dict[tuple, str] = {}
        """SetProjExtState's values: saved with the project, so they outlive the actions that set them."""
        self.user_inputs: deque = deque()
        """What the musician types into the next GetUserInputs dialogs: a CSV string each, or None for Cancel."""
        self.dialogs: list[tuple] = []
        self.deferred: deque = deque()
        self.atexit_codes: list[str] = []
        self.main: Optional[types.ModuleType] = None
        self._handles: dict[str, tuple] = {}
        self._handle_of: dict[int, str] = {}

    # ----- building a project (test side) -----

    def add_marker(self, qn: float, bpm: float, numerator: int = 0, denominator: int = 0) -> None:
        """A tempo marker at qn (added in order); with a numerator it also starts a time signature."""
        time_s = self.qn_to_time(qn)
        if numerator:
            meter = self._meter_at(qn)
            bars = (qn - meter.start_qn) / meter.bar_qn
            assert abs(bars - round(bars)) < 1e-9, "time signature markers sit on bar lines"
        self.markers.append(Marker(qn, time_s, bpm, numerator, denominator))

    def add_track(self, name: str) -> FakeTrack:
        track = FakeTrack(name)
        self.tracks.append(track)
        return track

    def add_midi_item(self, track: FakeTrack, start_qn: float, end_qn: float, notes_qn=(),
                      ticks_per_qn: int = DEFAULT_TICKS_PER_QN, channel: int = 0,
                      program: Optional[int] = None, loop_source: int = 0) -> FakeTake:
        """An item from start_qn to end_qn holding a take with notes given as
        (start_qn, duration_qn, pitch, velocity)."""
        position_s = self.qn_to_time(start_qn)
        item = FakeItem(track, position_s, self.qn_to_time(end_qn) - position_s, loop_source)
        take = FakeTake(item, self._new_guid(), ticks_per_qn, FakeSource(end_qn - start_qn))
        item.takes.append(take)
        track.items.append(item)
        for note_start_qn, duration_qn, pitch, velocity in notes_qn:
            if note_start_qn < start_qn:
                continue
            start_ppq = round((note_start_qn - start_qn) * ticks_per_qn)
            end_ppq = max(start_ppq + 1, round((note_start_qn + duration_qn - start_qn) * ticks_per_qn))
            take.notes.append([0, 0, float(start_ppq), float(end_ppq), channel, int(pitch), int(velocity)])
        take.notes.sort(key=_note_order)
        if program is not None:
            take.ccs.append([0, 0, 0.0, 0xC0 | channel, channel, program, 0])
        return take

    def handle(self, obj) -> str:
        type_name = {FakeTrack: "MediaTrack", FakeItem: "MediaItem", FakeTake: "MediaItem_Take",
                     FakeSource: "PCM_source"}[type(obj)]
        key = id(obj)
        if key not in self._handle_of:
            handle = f"({type_name}*)0x{0x10000 + len(self._handles):016X}"
            self._handles[handle] = (type_name, obj)
            self._handle_of[key] = handle
        return self._handle_of[key]

    def null(self, type_name: str) -> str:
        return f"({type_name}*)0x{0:016X}"

    def delete_item(self, item: FakeItem) -> None:
        item.track.items.remove(item)
        for obj in [item] + item.takes:
            handle = self._handle_of.pop(id(obj), None)
            if handle is not None:
                del self._handles[handle]

    def take_notes(self, take: FakeTake) -> list:
        return [tuple(note) for note in take.notes]

    def take_qn(self, take: FakeTake, ppq: float) -> float:
        return self._take_origin_qn(take) + ppq / take.ticks_per_qn

    def set_time_selection_qn(self, start_qn: float, end_qn: float) -> None:
        self.time_selection_s = (self.qn_to_time(start_qn), self.qn_to_time(end_qn))

    # ----- running scripts the way REAPER does -----

    def module(self) -> types.ModuleType:
        module = types.ModuleType("reaper_python")
        for name in dir(self):
            if name.startswith("RPR_"):
                setattr(module, name, getattr(self, name))
        return module

    def run_script(self, path) -> None:
        """Run an action file as REAPER does: as __main__, its folder importable, defer/atexit in __main__."""
        path = Path(path)
        main = types.ModuleType("__main__")
        main.__file__ = str(path)
        main.__builtins__ = builtins
        main.RPR_defer = self._defer
        main.RPR_atexit = self._atexit
        self.main = main
        sys.modules["__main__"] = main
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), main.__dict__)
        self._end_if_idle()

    def tick(self) -> bool:
        """Run one deferred code string (REAPER does this once per UI timer tick); False when none is queued."""
        if not self.deferred:
            return False
        code = self.deferred.popleft()
        exec(code, self.main.__dict__)
        self._end_if_idle()
        return True

    def _defer(self, code) -> None:
        assert isinstance(code, str), "RPR_defer takes a string of Python code"
        self.deferred.append(code)

    def _atexit(self, code) -> None:
        assert isinstance(code, str), "RPR_atexit takes a string of Python code"
        self.atexit_codes.append(code)

    def _end_if_idle(self) -> None:
        """With nothing deferred the script has ended: its atexit code runs once."""
        if not self.deferred:
            codes, self.atexit_codes = self.atexit_codes, []
            for code in codes:
                exec(code, self.main.__dict__)

    # ----- time map -----

    def _tempo_points(self) -> list:
        return [self.base] + self.markers

    def qn_to_time(self, qn: float) -> float:
        point = [m for m in self._tempo_points() if m.qn <= qn + QN_TOLERANCE][-1]
        return point.time_s + (qn - point.qn) * 60.0 / point.bpm

    def time_to_qn(self, time_s: float) -> float:
        point = [m for m in self._tempo_points() if m.time_s <= time_s + QN_TOLERANCE][-1]
        return point.qn + (time_s - point.time_s) * point.bpm / 60.0

    def _meters(self) -> list:
        meters = [Meter(0.0, self.base.numerator, self.base.denominator, 0)]
        for marker in self.markers:
            if marker.numerator:
                last = meters[-1]
                first = last.first_measure + round((marker.qn - last.start_qn) / last.bar_qn)
                meters.append(Meter(marker.qn, marker.numerator, marker.denominator, first))
        return meters

    def _meter_at(self, qn: float) -> Meter:
        return [m for m in self._meters() if m.start_qn <= qn + QN_TOLERANCE][-1]

    def _measure(self, index: int) -> tuple:
        """(qn_start, qn_end, numerator, denominator) of the 0-based measure."""
        meter = [m for m in self._meters() if m.first_measure <= index][-1]
        qn_start = meter.start_qn + (index - meter.first_measure) * meter.bar_qn
        return qn_start, qn_start + meter.bar_qn, meter.numerator, meter.denominator

    def _measure_of(self, qn: float) -> int:
        meter = self._meter_at(qn)
        return meter.first_measure + int(math.floor((qn - meter.start_qn) / meter.bar_qn + QN_TOLERANCE))

    def _bpm_at(self, qn: float) -> float:
        return [m for m in self._tempo_points() if m.qn <= qn + QN_TOLERANCE][-1].bpm

    def _take_origin_qn(self, take: FakeTake) -> float:
        assert take.start_offset_s == 0.0 and take.playrate == 1.0, "the fake maps ticks at offset 0, rate 1 only"
        return self.time_to_qn(take.item.position_s)

    # ----- handles -----

    def _resolve(self, handle, type_name: str):
        """The object behind a handle, or None for NULL, a stale handle or a handle of another type."""
        entry = self._handles.get(str(handle))
        return entry[1] if entry is not None and entry[0] == type_name else None

    def _new_guid(self) -> str:
        return "{" + str(uuid.uuid4()).upper() + "}"

    def _selected_items(self) -> list:
        return [item for track in self.tracks for item in sorted(track.items, key=lambda i: i.position_s)
                if item.selected]

    def _edited(self) -> None:
        if self.undo_depth == 0:
            self.edits_outside_undo += 1

    # ----- ReaScript API: project, selection, time -----

    def RPR_GetSet_LoopTimeRange(self, isSet, isLoop, start, end, allowautoseek):
        if isSet:
            if isLoop:
                self.loop_points_s = (float(start), float(end))
            else:
                self.time_selection_s = (float(start), float(end))
        start_s, end_s = self.loop_points_s if isLoop else self.time_selection_s
        return (isSet, isLoop, start_s, end_s, allowautoseek)

    def RPR_TimeMap2_timeToQN(self, proj, tpos):
        return self.time_to_qn(float(tpos))

    def RPR_TimeMap2_QNToTime(self, proj, qn):
        return self.qn_to_time(float(qn))

    def RPR_TimeMap_QNToMeasures(self, proj, qn, qnMeasureStartOutOptional, qnMeasureEndOutOptional):
        index = self._measure_of(float(qn))
        qn_start, qn_end, _, _ = self._measure(index)
        return (index + 1, proj, qn, qn_start, qn_end)

    def RPR_TimeMap_GetMeasureInfo(self, proj, measure, qn_startOut, qn_endOut, timesig_numOut,
                                   timesig_denomOut, tempoOut):
        qn_start, qn_end, numerator, denominator = self._measure(int(measure))
        return (self.qn_to_time(qn_start), proj, measure, qn_start, qn_end, numerator, denominator,
                self._bpm_at(qn_start))

    def RPR_CountTempoTimeSigMarkers(self, proj):
        return len(self.markers)

    def RPR_GetTempoTimeSigMarker(self, proj, ptidx, timeposOut, measureposOut, beatposOut, bpmOut,
                                  timesig_numOut, timesig_denomOut, lineartempoOut):
        if not 0 <= ptidx < len(self.markers):
            return (0, proj, ptidx, timeposOut, measureposOut, beatposOut, bpmOut, timesig_numOut,
                    timesig_denomOut, lineartempoOut)
        marker = self.markers[ptidx]
        measure = self._measure_of(marker.qn)
        qn_start, _, _, denominator = self._measure(measure)
        beat = (marker.qn - qn_start) * denominator / 4.0
        return (1, proj, ptidx, marker.time_s, measure, beat, marker.bpm, marker.numerator, marker.denominator, 0)

    def RPR_CountSelectedMediaItems(self, proj):
        return len(self._selected_items())

    def RPR_GetSelectedMediaItem(self, proj, selitem):
        items = self._selected_items()
        return self.handle(items[selitem]) if 0 <= selitem < len(items) else self.null("MediaItem")

    def RPR_CountSelectedTracks(self, proj):
        return sum(track.selected for track in self.tracks)

    def RPR_GetSelectedTrack(self, proj, seltrackidx):
        tracks = [track for track in self.tracks if track.selected]
        return self.handle(tracks[seltrackidx]) if 0 <= seltrackidx < len(tracks) else self.null("MediaTrack")

    def RPR_CountTrackMediaItems(self, track):
        track = self._resolve(track, "MediaTrack")
        return len(track.items) if track else 0

    def RPR_GetTrackMediaItem(self, tr, itemidx):
        track = self._resolve(tr, "MediaTrack")
        items = sorted(track.items, key=lambda i: i.position_s) if track else []
        return self.handle(items[itemidx]) if 0 <= itemidx < len(items) else self.null("MediaItem")

    def RPR_GetTrackName(self, track, bufOut, bufOut_sz):
        resolved = self._resolve(track, "MediaTrack")
        return (1 if resolved else 0, track, resolved.name if resolved else "", bufOut_sz)

    def RPR_GetActiveTake(self, item):
        resolved = self._resolve(item, "MediaItem")
        if not resolved or not resolved.takes:
            return self.null("MediaItem_Take")
        return self.handle(resolved.takes[resolved.active_take])

    def RPR_TakeIsMIDI(self, take):
        resolved = self._resolve(take, "MediaItem_Take")
        return 1 if resolved and resolved.midi else 0

    def RPR_GetMediaItemTake_Track(self, take):
        resolved = self._resolve(take, "MediaItem_Take")
        return self.handle(resolved.item.track) if resolved else self.null("MediaTrack")

    def RPR_GetMediaItemTake_Item(self, take):
        resolved = self._resolve(take, "MediaItem_Take")
        return self.handle(resolved.item) if resolved else self.null("MediaItem")

    def RPR_GetMediaItemTake_Source(self, take):
        resolved = self._resolve(take, "MediaItem_Take")
        return self.handle(resolved.source) if resolved else self.null("PCM_source")

    def RPR_GetMediaSourceLength(self, source, lengthIsQNOut):
        resolved = self._resolve(source, "PCM_source")
        return (resolved.length_qn if resolved else 0.0, source, 1 if resolved else 0)

    def RPR_GetMediaItemInfo_Value(self, item, parmname):
        resolved = self._resolve(item, "MediaItem")
        if not resolved:
            return 0.0
        return float({"D_POSITION": resolved.position_s, "D_LENGTH": resolved.length_s,
                      "B_LOOPSRC": resolved.loop_source, "B_UISEL": resolved.selected}[parmname])

    def RPR_GetMediaItemTakeInfo_Value(self, take, parmname):
        resolved = self._resolve(take, "MediaItem_Take")
        if not resolved:
            return 0.0
        return float({"D_STARTOFFS": resolved.start_offset_s, "D_PLAYRATE": resolved.playrate}[parmname])

    def RPR_GetSetMediaItemTakeInfo_String(self, tk, parmname, stringNeedBig, setNewValue):
        resolved = self._resolve(tk, "MediaItem_Take")
        if not resolved or parmname != "GUID" or setNewValue:
            return (0, tk, parmname, stringNeedBig, setNewValue)
        return (1, tk, parmname, resolved.guid, setNewValue)

    def RPR_ValidatePtr2(self, proj, pointer, ctypename):
        """0 for every pointer, as from REAPER's Python: the wrapper packs `pointer` as "void*", a type
        ValidatePtr does not know, so ValidatePtr2 always receives NULL."""
        return 0

    # ----- ReaScript API: MIDI -----

    def _take(self, take) -> Optional[FakeTake]:
        return self._resolve(take, "MediaItem_Take")

    def RPR_MIDI_CountEvts(self, take, notecntOut, ccevtcntOut, textsyxevtcntOut):
        resolved = self._take(take)
        if not resolved:
            return (0, take, 0, 0, 0)
        return (len(resolved.notes) + len(resolved.ccs), take, len(resolved.notes), len(resolved.ccs), 0)

    def RPR_MIDI_GetNote(self, take, noteidx, selectedOut, mutedOut, startppqposOut, endppqposOut, chanOut,
                         pitchOut, velOut):
        resolved = self._take(take)
        if not resolved or not 0 <= noteidx < len(resolved.notes):
            return (0, take, noteidx, selectedOut, mutedOut, startppqposOut, endppqposOut, chanOut, pitchOut, velOut)
        selected, muted, start_ppq, end_ppq, channel, pitch, velocity = resolved.notes[noteidx]
        return (1, take, noteidx, selected, muted, float(start_ppq), float(end_ppq), channel, pitch, velocity)

    def RPR_MIDI_GetCC(self, take, ccidx, selectedOut, mutedOut, ppqposOut, chanmsgOut, chanOut, msg2Out, msg3Out):
        resolved = self._take(take)
        if not resolved or not 0 <= ccidx < len(resolved.ccs):
            return (0, take, ccidx, selectedOut, mutedOut, ppqposOut, chanmsgOut, chanOut, msg2Out, msg3Out)
        selected, muted, ppq, chanmsg, channel, msg2, msg3 = resolved.ccs[ccidx]
        return (1, take, ccidx, selected, muted, float(ppq), chanmsg, channel, msg2, msg3)

    def RPR_MIDI_DeleteNote(self, take, noteidx):
        resolved = self._take(take)
        if not resolved or not 0 <= noteidx < len(resolved.notes):
            return 0
        self._edited()
        del resolved.notes[noteidx]
        return 1

    def RPR_MIDI_InsertNote(self, take, selected, muted, startppqpos, endppqpos, chan, pitch, vel, noSortIn):
        resolved = self._take(take)
        result = (take, selected, muted, startppqpos, endppqpos, chan, pitch, vel, noSortIn)
        if not resolved:
            return (0,) + result
        self._edited()
        resolved.notes.append([1 if selected else 0, 1 if muted else 0, float(round(startppqpos)),
                               float(round(endppqpos)), int(chan), int(pitch), int(vel)])
        if not noSortIn:
            resolved.notes.sort(key=_note_order)
        return (1,) + result

    def RPR_MIDI_Sort(self, take):
        resolved = self._take(take)
        if resolved:
            resolved.notes.sort(key=_note_order)

    def RPR_MIDI_GetHash(self, take, notesonly, hashOut, hashOut_sz):
        resolved = self._take(take)
        if not resolved:
            return (0, take, notesonly, "", hashOut_sz)
        content = repr(resolved.notes) + ("" if notesonly else repr(resolved.ccs))
        digest = hashlib.sha1(content.encode("utf-8"))
        raw = b"\xff" + digest.digest() if resolved.binary_hash else digest.hexdigest().upper().encode("ascii")
        buffer = raw[:max(0, hashOut_sz - 1)].split(b"\0")[0]
        return (1, take, notesonly, buffer.decode(), hashOut_sz)

    def RPR_MIDI_GetPPQPosFromProjQN(self, take, projqn):
        resolved = self._take(take)
        return (float(projqn) - self._take_origin_qn(resolved)) * resolved.ticks_per_qn if resolved else 0.0

    def RPR_MIDI_GetProjQNFromPPQPos(self, take, ppqpos):
        resolved = self._take(take)
        return self.take_qn(resolved, float(ppqpos)) if resolved else 0.0

    # ----- ReaScript API: undo, UI, state -----

    def RPR_Undo_BeginBlock2(self, proj):
        assert self.undo_depth < UNDO_BLOCK_DEPTH_LIMIT
        self.undo_depth += 1
        self.undo_log.append(("begin",))

    def RPR_Undo_EndBlock2(self, proj, descchange, extraflags):
        assert self.undo_depth > 0, "Undo_EndBlock2 without Undo_BeginBlock2"
        self.undo_depth -= 1
        self.undo_log.append(("end", descchange, extraflags))

    def RPR_PreventUIRefresh(self, prevent_count):
        self.ui_refresh_depth += prevent_count
        self.ui_refresh_lowest = min(self.ui_refresh_lowest, self.ui_refresh_depth)

    def RPR_UpdateArrange(self):
        pass

    def RPR_ShowConsoleMsg(self, msg):
        self.console.append(str(msg))

    def RPR_MB(self, msg, title, type):
        self.message_boxes.append((str(msg), str(title), type))
        return 1

    def RPR_SetExtState(self, section, key, value, persist):
        self.ext_state[(section, key)] = str(value)

    def RPR_GetExtState(self, section, key):
        return self.ext_state.get((section, key), "")

    def RPR_GetResourcePath(self):
        return ""

    def RPR_GetUserInputs(self, title, num_inputs, captions_csv, retvals_csv, retvals_csv_sz):
        """(ok 0/1, title, n, captions, the fields' CSV, size), as the wrapper returns them; Cancel keeps
        the CSV as it was passed in."""
        self.dialogs.append((str(title), int(num_inputs), str(captions_csv), str(retvals_csv)))
        answer = self.user_inputs.popleft()
        if answer is None:
            return (0, title, num_inputs, captions_csv, str(retvals_csv), retvals_csv_sz)
        return (1, title, num_inputs, captions_csv, str(answer)[:retvals_csv_sz - 1], retvals_csv_sz)

    def RPR_SetProjExtState(self, proj, extname, key, value):
        self.project_ext_state[(str(extname), str(key))] = str(value)
        return 1

    def RPR_GetProjExtState(self, proj, extname, key, valOutNeedBig, valOutNeedBig_sz):
        """(length of the value, 0 when there is none; proj, extname, key, the value, size)."""
        value = self.project_ext_state.get((str(extname), str(key)), "")
        return (len(value), proj, extname, key, value, valOutNeedBig_sz)


def _note_order(note: list) -> tuple:
    """MIDI_Sort's order: by start, then the rest of the note."""
    return (note[2], note[4], note[5], note[3])
