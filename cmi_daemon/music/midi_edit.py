"""New notes written into the MIDI file they were made for, every other event of it as it was.

An infill replaces the notes of some tracks that start in [start_qn, end_qn). The file is not
rebuilt from its Song (that would lose controllers, fold the pedal into note lengths, rename and
reorder tracks): the note-on and note-off messages of exactly the replaced notes are taken out of
the original `mido.MidiFile`, and the new notes go into the MIDI track and channel the replaced
ones came from (`Track.midi_track`, `Track.channel`), at ticks of the file's own ticks per quarter
note, with the note-on velocity that the channel's CC7 volume and CC11 expression there scale to
the note's velocity, as read_midi scales them (127 where no velocity is loud enough). Controllers
(the sustain pedal too), pitch bend, aftertouch, program changes, meta and sysex events, the other
notes with their own note-offs, the tracks' order and names, the time division and the file type
are written back unchanged.

Pairing: a note-off (or a note-on of velocity 0) ends the oldest sounding note-on of its channel
and pitch in its track, so a replaced note takes its own note-off with it and a kept note, one
started before the range included, keeps its note-off. At one tick of a track, new note-offs come
before the file's events there and new note-ons after them: a note ending where the next one of
its pitch starts never ends that one, and a program change or controller at the tick applies to
the new note as it did to the old ones; a new note of length 0 ends just after it starts. New
note-offs are written in the track's own style (note-on velocity 0 or note-off), and the track
ends where it ended or after its last new note-off, whichever is later. A program change on the
track's channel inside the range is refused: the new notes after it would be another program's.
"""

from __future__ import annotations

import bisect
import io
import math
from collections import defaultdict, deque
from typing import Mapping, Sequence

import mido

from ..errors import MidiFileError
from .tokens import EXPRESSION_CONTROL, VOLUME_CONTROL, Note, mixed_velocity, read_midi_note_ons

# Order of the events at one tick of a track.
_NEW_OFF, _FILE_EVENT, _NEW_ON, _NEW_ZERO_LENGTH_OFF = range(4)


def replace_notes(midi: mido.MidiFile, start_qn: float, end_qn: float,
                  new_notes: Mapping[int, Sequence[Note]], label: str = "<midi data>") -> mido.MidiFile:
    """A copy of midi in which the notes of each track named in new_notes (an index into
    read_midi(midi).tracks) that start in [start_qn, end_qn) are replaced by that track's new notes."""
    song, note_ons = read_midi_note_ons(midi, label)
    ticks_per_qn = midi.ticks_per_beat
    first_tick, last_tick = _range_ticks(start_qn, end_qn, ticks_per_qn)
    levels = _levels(midi)
    removed: dict[int, set[int]] = defaultdict(set)
    added: dict[int, list[tuple[int, int, int, int, int]]] = defaultdict(list)
    for index, notes in new_notes.items():
        track = song.tracks[index]
        programs = _programs_played(midi, track.channel, first_tick, last_tick)
        if notes and programs != {track.program}:
            other = min(programs - {track.program})
            raise MidiFileError(label, f"track {index + 1} ({track.name}) is program {track.program} on channel "
                                       f"{track.channel + 1}, which plays program {other} in QN "
                                       f"{start_qn:g}-{end_qn:g}: new notes there would join another track; "
                                       "infill bars without a program change")
        removed[track.midi_track].update(position for note, position in zip(track.notes, note_ons[index])
                                         if start_qn <= note.start_qn < end_qn)
        for note in notes:
            on_tick = min(max(round(note.start_qn * ticks_per_qn), first_tick), last_tick)
            off_tick = max(on_tick, round((note.start_qn + note.duration_qn) * ticks_per_qn))
            volume, expression = _levels_at(levels, track.channel, on_tick, track.midi_track)
            velocity = next((raw for raw in range(1, 128) if mixed_velocity(raw, volume, expression) >= note.velocity),
                            127)
            added[track.midi_track].append((on_tick, off_tick, track.channel, note.pitch, velocity))
    edited = mido.MidiFile(type=midi.type, ticks_per_beat=ticks_per_qn, charset=midi.charset)
    for index, track in enumerate(midi.tracks):
        edited.tracks.append(_edited_track(track, removed[index], added[index]) if index in removed else track)
    return edited


def replaced_midi_bytes(midi: mido.MidiFile, start_qn: float, end_qn: float,
                        new_notes: Mapping[int, Sequence[Note]], label: str = "<midi data>") -> bytes:
    """replace_notes, as the bytes of a Standard MIDI File."""
    edited = replace_notes(midi, start_qn, end_qn, new_notes, label)
    buffer = io.BytesIO()
    try:
        edited.save(file=buffer)
    except (ValueError, TypeError) as error:
        raise MidiFileError(label, f"the infilled file cannot be written: {error}") from error
    return buffer.getvalue()


def _range_ticks(start_qn: float, end_qn: float, ticks_per_qn: int) -> tuple[int, int]:
    """The first and last tick whose QN (tick / ticks_per_qn, as read_midi computes it) is in the range."""
    first = max(0, int(start_qn * ticks_per_qn) - 1)
    while first / ticks_per_qn < start_qn:
        first += 1
    last = int(end_qn * ticks_per_qn) + 1
    while last / ticks_per_qn >= end_qn:
        last -= 1
    return first, max(first, last)


def _timeline(midi: mido.MidiFile, kind: str) -> list[tuple[tuple[int, int, int], mido.Message]]:
    """The file's messages of one type at their places (tick, track, position): read_midi's order."""
    found = []
    for track_index, track in enumerate(midi.tracks):
        tick = 0
        for position, message in enumerate(track):
            tick += message.time
            if message.type == kind:
                found.append(((tick, track_index, position), message))
    return sorted(found, key=lambda item: item[0])


def _programs_played(midi: mido.MidiFile, channel: int, first_tick: int, last_tick: int) -> set[int]:
    """The programs of the channel from first_tick (its changes at that tick applied) to last_tick."""
    changes = [(place[0], m.program) for place, m in _timeline(midi, "program_change") if m.channel == channel]
    before = [program for tick, program in changes if tick <= first_tick]
    return {before[-1] if before else 0} | {program for tick, program in changes if first_tick < tick <= last_tick}


def _levels(midi: mido.MidiFile) -> dict[int, tuple[list[tuple[int, int, int]], list[tuple[int, int]]]]:
    """Per channel: the places (tick, track, position: read_midi's timeline order) of its CC7 and CC11
    events, and the (volume, expression) in force after each."""
    levels: dict[int, tuple[list, list]] = defaultdict(lambda: ([], []))
    state: dict[int, list[int]] = defaultdict(lambda: [127, 127])
    for place, message in _timeline(midi, "control_change"):
        channel, control, value = message.channel, message.control, message.value
        if control not in (VOLUME_CONTROL, EXPRESSION_CONTROL):
            continue
        state[channel][control == EXPRESSION_CONTROL] = value
        levels[channel][0].append(place)
        levels[channel][1].append(tuple(state[channel]))
    return levels


def _levels_at(levels, channel: int, tick: int, track_index: int) -> tuple[int, int]:
    """(volume, expression) of the channel for a note-on written after the track's events at tick."""
    places, values = levels.get(channel, ((), ()))
    found = bisect.bisect_right(places, (tick, track_index, math.inf))
    return values[found - 1] if found else (127, 127)


def _is_note_off(message) -> bool:
    return message.type == "note_off" or (message.type == "note_on" and message.velocity == 0)


def _edited_track(track: mido.MidiTrack, removed_note_ons: set[int],
                  added: list[tuple[int, int, int, int, int]]) -> mido.MidiTrack:
    """The track without the note-ons at removed_note_ons and their note-offs, with the added notes
    (on tick, off tick, channel, pitch, note-on velocity)."""
    events = []  # (tick, order at the tick, sequence, message)
    sounding: dict[tuple[int, int], deque[int]] = defaultdict(deque)
    tick = end_tick = 0
    off_as_note_on = False
    for position, message in enumerate(track):
        tick += message.time
        if message.type == "end_of_track":
            end_tick = tick
            continue
        if message.type in ("note_on", "note_off"):
            key = (message.channel, message.note)
            if not _is_note_off(message):
                sounding[key].append(position)
                if position in removed_note_ons:
                    continue
            else:
                off_as_note_on = off_as_note_on or message.type == "note_on"
                if sounding[key] and sounding[key].popleft() in removed_note_ons:
                    continue
        events.append((tick, _FILE_EVENT, position, message))
    off_type = "note_on" if off_as_note_on else "note_off"
    for sequence, (on_tick, off_tick, channel, pitch, velocity) in enumerate(sorted(added)):
        events.append((on_tick, _NEW_ON, sequence, mido.Message("note_on", channel=channel, note=pitch,
                                                                velocity=velocity)))
        events.append((off_tick, _NEW_OFF if off_tick > on_tick else _NEW_ZERO_LENGTH_OFF, sequence,
                       mido.Message(off_type, channel=channel, note=pitch, velocity=0)))
    events.sort(key=lambda event: event[:3])
    edited = mido.MidiTrack()
    previous = 0
    for tick, _, _, message in events:
        edited.append(message if message.time == tick - previous else message.copy(time=tick - previous))
        previous = tick
    edited.append(mido.MetaMessage("end_of_track", time=max(0, end_tick - previous)))
    return edited
