"""MIDI files <-> songs (tracks of notes in quarter notes) <-> token ids of `vocab`, without drift.

Reading follows the reference tokenizer's musical choices (sustain pedal delays note-offs, CC7
and CC11 scale velocity, channel 10 is percussion, programs without a bin are dropped) and fixes
its timing: absolute times are quantised to 8 ms steps and then differenced, so the rounding
error never accumulates over a song.
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import mido
import numpy as np

from ..errors import MidiFileError, TimeMapError
from ..files import write_bytes_atomic
from . import vocab
from .notes import Note, normalize_notes
from .tempo import Meter, TempoMap

DRUM_CHANNEL = 9
DEFAULT_TICKS_PER_QN = 480
SUSTAIN_CONTROL = 64
VOLUME_CONTROL = 7
EXPRESSION_CONTROL = 11
ALL_NOTES_OFF_CONTROLS = (120, 123)
DOUBLED_NOTES = "doubled (same track, pitch and start)"


class TimedNote(NamedTuple):
    """A note in real time, as the tokens describe it; `source` indexes the caller's note list."""

    start_ms: float
    duration_ms: float
    pitch: int
    velocity: int
    instrument_bin: int
    source: int = -1


@dataclass
class Track:
    name: str
    program: int
    is_drum: bool
    notes: list[Note]
    channel: Optional[int] = None
    midi_track: Optional[int] = None
    """Read from a file: the index of the MIDI track holding the notes' note-ons. Its notes are the
    ones that track played on `channel` while the channel's program was `program`."""

    @property
    def instrument_bin(self) -> Optional[int]:
        return vocab.program_to_bin(self.program, self.is_drum)


@dataclass
class Song:
    tracks: list[Track]
    tempo_map: TempoMap = field(default_factory=TempoMap.constant)
    meter: Meter = field(default_factory=Meter.constant)
    ticks_per_qn: int = DEFAULT_TICKS_PER_QN
    drops: Counter = field(default_factory=Counter)
    """Notes left out while reading, by reason."""

    @property
    def end_qn(self) -> float:
        return max((n.start_qn + n.duration_qn for t in self.tracks for n in t.notes), default=0.0)


class Event(NamedTuple):
    step: int
    token_id: int
    note: int
    """Index of the TimedNote the event belongs to."""


@dataclass
class Encoding:
    ids: list[int]
    events: list[Event]
    notes: list[TimedNote]
    drops: Counter


def ms_to_step(time_ms) -> np.ndarray:
    """Absolute milliseconds -> absolute 8 ms wait steps, rounding half up."""
    return np.floor(np.asarray(time_ms, dtype=np.float64) / vocab.WAIT_STEP_MS + 0.5).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# MIDI file -> Song


def read_midi(source: Union[str, Path, bytes, mido.MidiFile], label: Optional[str] = None) -> Song:
    """Read a type 0 or 1 MIDI file (path, bytes or mido object) into a Song, its notes under the
    degenerate-note rule (`notes.normalize_notes`; the doubles merged are counted in `drops`).

    Raises MidiFileError naming the file and what is wrong with it.
    """
    song = read_midi_note_ons(source, label)[0]
    for track in song.tracks:
        track.notes, merged = normalize_notes(track.notes)
        if merged:
            song.drops[DOUBLED_NOTES] += merged
    return song


def read_midi_note_ons(source: Union[str, Path, bytes, mido.MidiFile],
                       label: Optional[str] = None) -> tuple[Song, list[list[int]]]:
    """read_midi before the degenerate-note rule (every note-on of the file is a note, a doubled one
    too), and where each note starts in the file: for each track, the position of each of its notes'
    note-on message in MIDI track `track.midi_track`, in the order of `track.notes`."""
    label = label or (str(source) if isinstance(source, (str, Path)) else "<midi data>")
    midi = open_midi(source, label)
    if midi.type == 2:
        raise MidiFileError(label, "type 2 MIDI files (independent sequences) are not supported")
    if not midi.ticks_per_beat or midi.ticks_per_beat <= 0:
        raise MidiFileError(label, f"unusable time division {midi.ticks_per_beat} ticks per quarter note")
    ticks_per_qn = midi.ticks_per_beat

    timeline = []
    track_names: dict[int, str] = {}
    for track_index, track in enumerate(midi.tracks):
        tick = 0
        for order, message in enumerate(track):
            if message.time < 0:
                raise MidiFileError(label, f"negative delta time {message.time} in track {track_index}")
            tick += message.time
            if message.type == "track_name" and track_index not in track_names:
                track_names[track_index] = message.name.strip()
            timeline.append((tick, track_index, order, message))
    timeline.sort(key=lambda item: item[:3])
    end_tick = timeline[-1][0] if timeline else 0

    tempo_changes, signature_changes = [], []
    reader = _ChannelStateReader(ticks_per_qn)
    for tick, track_index, order, message in timeline:
        kind = message.type
        if kind == "set_tempo":
            tempo_changes.append((tick / ticks_per_qn, 60_000_000.0 / message.tempo))
        elif kind == "time_signature":
            signature_changes.append((tick / ticks_per_qn, message.numerator, message.denominator))
        elif not message.is_meta:
            reader.feed(tick, track_index, order, message)
    reader.close_all(end_tick)

    try:
        tempo_map = TempoMap.from_changes(tempo_changes)
        meter = Meter.from_changes(signature_changes)
    except TimeMapError as error:
        raise MidiFileError(label, str(error)) from error

    tracks, note_ons = [], []
    for (track_index, channel, program), found in sorted(reader.notes.items()):
        found.sort()
        name = track_names.get(track_index) or f"track {track_index + 1} channel {channel + 1}"
        tracks.append(Track(name, program, channel == DRUM_CHANNEL, [note for note, _ in found], channel,
                            track_index))
        note_ons.append([position for _, position in found])
    return Song(tracks, tempo_map, meter, ticks_per_qn, reader.drops), note_ons


def open_midi(source: Union[str, Path, bytes, mido.MidiFile], label: str) -> mido.MidiFile:
    """The parsed MIDI file; MidiFileError naming it (label) and the problem when it cannot be read."""
    if isinstance(source, mido.MidiFile):
        return source
    try:
        if isinstance(source, bytes):
            return mido.MidiFile(file=io.BytesIO(source))
        return mido.MidiFile(source)
    except FileNotFoundError as error:
        raise MidiFileError(label, "no such file") from error
    except IsADirectoryError as error:
        raise MidiFileError(label, "is a folder, not a MIDI file") from error
    except EOFError as error:
        raise MidiFileError(label, "the file ends in the middle of the MIDI data (truncated?)") from error
    except OSError as error:
        if "MThd" in str(error) or "MTrk" in str(error):
            raise MidiFileError(label, f"not a standard MIDI file ({error})") from error
        raise MidiFileError(label, f"cannot be read ({error})") from error
    except Exception as error:  # mido signals corrupt data with ValueError, KeyError, IndexError ...
        raise MidiFileError(label, f"corrupt MIDI data ({type(error).__name__}: {error})") from error


def mixed_velocity(velocity: int, volume: int, expression: int) -> int:
    """A note-on's velocity as read_midi takes it: scaled by its channel's CC7 volume and CC11 expression."""
    return min(127, math.ceil(velocity * (volume / 127.0) * (expression / 127.0) - 1e-9))


class _ChannelStateReader:
    """Turns channel messages into notes: programs, volume, expression and sustain per channel."""

    def __init__(self, ticks_per_qn: int):
        self.ticks_per_qn = ticks_per_qn
        self.program = [0] * 16
        self.volume = [127] * 16
        self.expression = [127] * 16
        self.pedal_down = [False] * 16
        self.open: dict[tuple[int, int], tuple[int, int, int, int, int]] = {}
        """(channel, pitch) -> (start_tick, velocity, program, track_index, note-on's position in its track)."""
        self.released_under_pedal: set[tuple[int, int]] = set()
        self.notes: dict[tuple[int, int, int], list[tuple[Note, int]]] = {}
        """(track_index, channel, program) -> (note, its note-on's position in the track)."""
        self.drops: Counter = Counter()

    def feed(self, tick: int, track_index: int, position: int, message) -> None:
        kind = message.type
        if kind == "note_on" and message.velocity > 0:
            self._note_on(tick, track_index, position, message.channel, message.note, message.velocity)
        elif kind in ("note_on", "note_off"):
            key = (message.channel, message.note)
            if key in self.open:
                if self.pedal_down[message.channel]:
                    self.released_under_pedal.add(key)
                else:
                    self._close(key, tick)
        elif kind == "program_change":
            self.program[message.channel] = message.program
        elif kind == "control_change":
            self._control(tick, message.channel, message.control, message.value)

    def _note_on(self, tick, track_index, position, channel, pitch, velocity):
        key = (channel, pitch)
        if key in self.open:  # re-struck while sounding (often under the pedal): end the old one
            self._close(key, tick)
        velocity = mixed_velocity(velocity, self.volume[channel], self.expression[channel])
        if vocab.velocity_to_bin(velocity) == 0:
            self.drops["silenced by CC7 volume / CC11 expression"] += 1
            return
        self.open[key] = (tick, velocity, self.program[channel], track_index, position)

    def _control(self, tick, channel, control, value):
        if control == VOLUME_CONTROL:
            self.volume[channel] = value
        elif control == EXPRESSION_CONTROL:
            self.expression[channel] = value
        elif control == SUSTAIN_CONTROL:
            self.pedal_down[channel] = value >= 64
            if not self.pedal_down[channel]:
                for key in sorted(k for k in self.released_under_pedal if k[0] == channel):
                    self._close(key, tick)
        elif control in ALL_NOTES_OFF_CONTROLS:
            for key in sorted(k for k in self.open if k[0] == channel):
                self._close(key, tick)

    def _close(self, key, tick):
        start_tick, velocity, program, track_index, position = self.open.pop(key)
        self.released_under_pedal.discard(key)
        channel, pitch = key
        note = Note(start_tick / self.ticks_per_qn, (tick - start_tick) / self.ticks_per_qn, pitch, velocity)
        self.notes.setdefault((track_index, channel, program), []).append((note, position))

    def close_all(self, tick):
        for key in sorted(self.open):
            self._close(key, tick)


# ---------------------------------------------------------------------------------------------
# Song -> timed notes -> events -> token ids


def timed_notes(song: Song, fallback_bin: Optional[int] = None) -> tuple[list[TimedNote], Counter]:
    """Notes of all tracks in milliseconds, with their bins; `source` is the track index.

    Notes of programs without a bin go to fallback_bin, or are dropped and counted without one.
    """
    result, drops = [], Counter()
    for track_index, track in enumerate(song.tracks):
        instrument_bin = track.instrument_bin
        if instrument_bin is None:
            instrument_bin = fallback_bin
        if instrument_bin is None:
            if track.notes:
                drops[f"program {track.program} has no instrument bin"] += len(track.notes)
            continue
        if not track.notes:
            continue
        start_qn = np.array([n.start_qn for n in track.notes])
        end_qn = start_qn + np.array([n.duration_qn for n in track.notes])
        start_ms = song.tempo_map.ms_at(start_qn)
        end_ms = song.tempo_map.ms_at(end_qn)
        for note, start, end in zip(track.notes, start_ms.tolist(), end_ms.tolist()):
            result.append(TimedNote(start, end - start, note.pitch, note.velocity, instrument_bin, track_index))
    return result, drops


def note_events(notes: Sequence[TimedNote]) -> tuple[list[Event], Counter]:
    """Note-on/off events in the vocabulary's order, at absolute steps.

    The token stream cannot hold two sounding notes of the same bin and pitch, so a note is
    ended where the next one of that key starts, and notes of one key starting in the same
    step are merged (louder velocity, later end) and counted as dropped.
    """
    drops: Counter = Counter()
    if not notes:
        return [], drops
    start_steps = ms_to_step([n.start_ms for n in notes]).tolist()
    end_steps = ms_to_step([n.start_ms + n.duration_ms for n in notes]).tolist()
    by_key: dict[tuple[int, int], list[int]] = {}
    for index, note in enumerate(notes):
        by_key.setdefault((note.instrument_bin, note.pitch), []).append(index)

    keyed_events = []
    for (instrument_bin, pitch), indices in by_key.items():
        indices.sort(key=lambda i: (start_steps[i], notes[i].start_ms))
        merged: list[list[int]] = []  # [start_step, end_step, velocity, note index]
        for i in indices:
            if merged and merged[-1][0] == start_steps[i]:
                drops["doubled (same bin, pitch and onset step)"] += 1
                merged[-1][1] = max(merged[-1][1], end_steps[i])
                merged[-1][2] = max(merged[-1][2], notes[i].velocity)
                continue
            merged.append([start_steps[i], end_steps[i], notes[i].velocity, i])
        for position, (start, end, velocity, index) in enumerate(merged):
            if position + 1 < len(merged):
                end = min(end, merged[position + 1][0])
            velocity_bin = max(1, vocab.velocity_to_bin(velocity))
            on_id = vocab.note_id(instrument_bin, pitch, velocity_bin)
            off_id = vocab.note_id(instrument_bin, pitch, 0)
            keyed_events.append((start, instrument_bin, pitch, 2 * position, on_id, index))
            keyed_events.append((end, instrument_bin, pitch, 2 * position + 1, off_id, index))
    keyed_events.sort()
    return [Event(step, token_id, index) for step, _, _, _, token_id, index in keyed_events], drops


def events_to_ids(events: Sequence[Event], clock_step: Optional[int] = None,
                  until_step: Optional[int] = None, max_gap_steps: Optional[int] = None) -> list[int]:
    """Token ids of events with waits between them.

    With clock_step, the stream is taken to start at that step (a wait precedes the first
    event if it is later); without, no wait comes before the first event. With until_step,
    waits bring the clock to that step after the last event. With max_gap_steps, a longer gap
    is written as that many steps (as the reference tokenizer cuts silences over 10 s), so the
    tokens of a silence are bounded whatever its length.
    """
    ids: list[int] = []
    clock = events[0].step if (clock_step is None and events) else clock_step

    def waits(gap_steps: int) -> list[int]:
        return vocab.wait_ids(gap_steps if max_gap_steps is None else min(gap_steps, max_gap_steps))

    for event in events:
        if event.step < clock:
            raise ValueError(f"events out of order: step {event.step} after step {clock}")
        ids.extend(waits(event.step - clock))
        ids.append(event.token_id)
        clock = event.step
    if until_step is not None and clock is not None:
        ids.extend(waits(until_step - clock))
    return ids


def tokenize(song: Song) -> Encoding:
    """Token ids of a whole song, with the events, notes and drops behind them."""
    notes, drops = timed_notes(song)
    notes.sort(key=lambda n: (n.start_ms, n.instrument_bin, n.pitch))
    events, event_drops = note_events(notes)
    return Encoding(events_to_ids(events), events, notes, drops + song.drops + event_drops)


def encode_file(path) -> list[int]:
    """Token ids of a MIDI file."""
    return tokenize(read_midi(path)).ids


# ---------------------------------------------------------------------------------------------
# token ids -> timed notes -> Song -> MIDI file


def decode_ids(token_ids: Sequence[int], start_step: int = 0) -> list[TimedNote]:
    """Notes played by a token stream that starts at start_step; `source` is the note-on's position.

    Like the reference decoder, a note-on of a sounding key ends the old note first, a note-off
    of a silent key is ignored, and notes still sounding at the end end there. Infilling tokens
    are refused: split an ILM sequence with `regions` first.
    """
    clock = start_step
    sounding: dict[tuple[int, int], tuple[int, int, int]] = {}
    played: list[tuple[int, int, int, int, int, int]] = []

    def end(key, step):
        on_step, velocity_bin, position = sounding.pop(key)
        played.append((on_step, step, key[0], key[1], velocity_bin, position))

    for position, token_id in enumerate(token_ids):
        token_id = int(token_id)
        if vocab.is_wait(token_id):
            clock += vocab.wait_steps(token_id)
        elif vocab.is_note(token_id):
            instrument_bin, pitch, velocity_bin = vocab.note_fields(token_id)
            key = (instrument_bin, pitch)
            if key in sounding:
                end(key, clock)
            if velocity_bin:
                sounding[key] = (clock, velocity_bin, position)
        elif token_id in (vocab.MASK_ID, vocab.SEP_ID, vocab.ANS_ID):
            raise ValueError(f"infilling token {vocab.token_text(token_id)} at position {position}: "
                             "decode the parts of an ILM sequence separately")
        elif not 0 <= token_id < vocab.VOCAB_SIZE:
            raise ValueError(f"token id {token_id} at position {position} is outside the vocabulary")
    for key in list(sounding):
        end(key, clock)
    played.sort(key=lambda p: (p[0], p[5]))
    return [TimedNote(on * vocab.WAIT_STEP_MS, (off - on) * vocab.WAIT_STEP_MS, pitch,
                      vocab.bin_to_velocity(velocity_bin), instrument_bin, position)
            for on, off, instrument_bin, pitch, velocity_bin, position in played]


def song_from_timed_notes(notes: Sequence[TimedNote], tempo_map: Optional[TempoMap] = None,
                          meter: Optional[Meter] = None) -> Song:
    """One track per instrument bin with the reference's stand-in programs."""
    tempo_map = tempo_map or TempoMap.constant()
    by_bin: dict[int, list[Note]] = {}
    if notes:
        start_qn = tempo_map.qn_at([n.start_ms for n in notes]).tolist()
        end_qn = tempo_map.qn_at([n.start_ms + n.duration_ms for n in notes]).tolist()
        for note, start, end in zip(notes, start_qn, end_qn):
            by_bin.setdefault(note.instrument_bin, []).append(Note(start, end - start, note.pitch, note.velocity))
    tracks = [Track(vocab.BIN_NAMES[b], vocab.BIN_STAND_IN_PROGRAM[b], b == vocab.PERCUSSION_BIN, sorted(ns))
              for b, ns in sorted(by_bin.items())]
    return Song(tracks, tempo_map, meter or Meter.constant())


def midi_bytes(song: Song) -> bytes:
    """A type 1 Standard MIDI File: a conductor track (tempo, meter), then one track per Track."""
    tpq = song.ticks_per_qn
    midi = mido.MidiFile(type=1, ticks_per_beat=tpq)

    conductor = [(round(qn * tpq), 0, mido.MetaMessage("set_tempo", tempo=round(60_000_000 / bpm)))
                 for qn, bpm in zip(song.tempo_map.start_qn, song.tempo_map.bpm)]
    conductor += [(round(s.start_qn * tpq), 1, mido.MetaMessage(
        "time_signature", numerator=s.numerator, denominator=s.denominator)) for s in song.meter.signatures]
    midi.tracks.append(_delta_track(sorted(conductor, key=lambda e: e[:2])))

    free_channels = [c for c in range(16) if c != DRUM_CHANNEL]
    for number, track in enumerate(song.tracks):
        if track.is_drum:
            channel = DRUM_CHANNEL
        elif track.channel is not None and track.channel != DRUM_CHANNEL:
            channel = track.channel
        else:
            channel = free_channels[number % len(free_channels)]
        timeline = [(0, -1, mido.MetaMessage("track_name", name=track.name)),
                    (0, -1, mido.Message("program_change", channel=channel, program=track.program))]
        for note in track.notes:
            on_tick = round(note.start_qn * tpq)
            off_tick = max(on_tick, round((note.start_qn + note.duration_qn) * tpq))
            # At one tick: earlier notes end, then notes start, then zero-length notes end.
            timeline.append((on_tick, 1, mido.Message("note_on", channel=channel, note=note.pitch,
                                                      velocity=max(1, min(127, note.velocity)))))
            timeline.append((off_tick, 2 if off_tick == on_tick else 0,
                             mido.Message("note_off", channel=channel, note=note.pitch, velocity=0)))
        midi.tracks.append(_delta_track(sorted(timeline, key=lambda e: e[:2])))
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


def _delta_track(timeline) -> mido.MidiTrack:
    track = mido.MidiTrack()
    previous = 0
    for tick, _, message in timeline:
        track.append(message.copy(time=tick - previous))
        previous = tick
    track.append(mido.MetaMessage("end_of_track", time=0))
    return track


def write_midi(song: Song, path) -> None:
    """Write the song as a MIDI file, atomically."""
    try:
        data = midi_bytes(song)
    except (ValueError, TypeError) as error:
        raise MidiFileError(path, f"cannot be written: {error}") from error
    write_bytes_atomic(path, data)
