"""`cmi-daemon play`: audition bars of a MIDI file (an infill, say) on a MIDI output port.

Ports are opened with mido's python-rtmidi backend (CoreMIDI, ALSA, JACK or Windows MM): a
software synth, a hardware instrument or a DAW track listening on a virtual port. Playback
follows the file's tempo map; notes already sounding when the range starts are played from
there, notes still sounding at its end are cut there. Whatever happens (the end, Ctrl-C, an
error), every note played is released, and each channel gets All Notes Off.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

from ..errors import CMIError
from ..music.tokens import Song

DRUM_CHANNEL = 9
ALL_NOTES_OFF = 123


class Message(NamedTuple):
    """One MIDI message at a time in milliseconds from the start of playback."""
    time_ms: float
    kind: str
    """"program_change", "note_on" or "note_off"."""
    channel: int
    data: tuple[int, ...]
    """(program,) or (pitch, velocity)."""


def track_channels(song: Song) -> list[int]:
    """A channel per track: the file's own when it has one, else drums on 10 and the others in
    order on the remaining fifteen (wrapping round when there are more)."""
    melodic = [c for c in range(16) if c != DRUM_CHANNEL]
    channels, next_melodic = [], 0
    for track in song.tracks:
        if track.channel is not None:
            channels.append(track.channel)
        elif track.is_drum:
            channels.append(DRUM_CHANNEL)
        else:
            channels.append(melodic[next_melodic % len(melodic)])
            next_melodic += 1
    return channels


def schedule(song: Song, start_qn: float, end_qn: float) -> list[Message]:
    """The messages that play [start_qn, end_qn) of the song, in time order; at equal times
    program changes come first, then note-offs, then note-ons (a repeated note re-strikes)."""
    if end_qn <= start_qn:
        raise CMIError(f"nothing to play: the range {start_qn:g}-{end_qn:g} QN is empty")
    origin_ms = song.tempo_map.ms_at(start_qn)
    messages = []
    for track, channel in zip(song.tracks, track_channels(song)):
        notes = [n for n in track.notes if n.start_qn < end_qn and n.start_qn + n.duration_qn > start_qn]
        if not notes:
            continue
        if channel != DRUM_CHANNEL:
            messages.append(Message(0.0, "program_change", channel, (track.program,)))
        for note in notes:
            on_qn, off_qn = max(note.start_qn, start_qn), min(note.start_qn + note.duration_qn, end_qn)
            messages.append(Message(song.tempo_map.ms_at(on_qn) - origin_ms, "note_on", channel,
                                    (note.pitch, note.velocity)))
            messages.append(Message(song.tempo_map.ms_at(off_qn) - origin_ms, "note_off", channel, (note.pitch, 0)))
    order = {"program_change": 0, "note_off": 1, "note_on": 2}
    return sorted(messages, key=lambda m: (m.time_ms, order[m.kind]))


def output_names() -> list[str]:
    """The MIDI outputs this machine offers, through python-rtmidi."""
    import mido
    try:
        return mido.get_output_names()
    except Exception as error:  # rtmidi raises its own errors when no MIDI system is running
        raise CMIError(f"no MIDI system to list outputs from ({error})") from None


def open_output(name: Optional[str]):
    """The named output (or the first one), with a clear error when there is none."""
    import mido
    names = output_names()
    if not names:
        raise CMIError("this machine has no MIDI output: start a software synth or connect an instrument, "
                       "then run `cmi-daemon play --list-ports`")
    chosen = name if name is not None else names[0]
    if chosen not in names:
        raise CMIError(f"no MIDI output named {chosen!r}; the outputs are: {', '.join(names)}")
    try:
        return mido.open_output(chosen)
    except Exception as error:
        raise CMIError(f"could not open the MIDI output {chosen!r} ({error})") from None


def play(messages: list[Message], port, clock: Callable[[], float] = time.monotonic,
         sleep: Callable[[float], None] = time.sleep) -> None:
    """Send the messages to a mido output port at their times; release everything at the end."""
    import mido
    sounding: set[tuple[int, int]] = set()
    started_s = clock()
    try:
        for message in messages:
            wait_s = started_s + message.time_ms / 1000.0 - clock()
            if wait_s > 0:
                sleep(wait_s)
            if message.kind == "program_change":
                port.send(mido.Message("program_change", channel=message.channel, program=message.data[0]))
                continue
            pitch, velocity = message.data
            port.send(mido.Message(message.kind, channel=message.channel, note=pitch, velocity=velocity))
            if message.kind == "note_on":
                sounding.add((message.channel, pitch))
            else:
                sounding.discard((message.channel, pitch))
    finally:
        for channel, pitch in sorted(sounding):
            port.send(mido.Message("note_off", channel=channel, note=pitch, velocity=0))
        for channel in sorted({m.channel for m in messages}):
            port.send(mido.Message("control_change", channel=channel, control=ALL_NOTES_OFF, value=0))
