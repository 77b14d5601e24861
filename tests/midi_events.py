"""What an infill may change in a MIDI file, checked on the raw messages with mido alone (no CMI code).

Only the note-ons of the target (MIDI track, channel) pairs that start in the range, with the
note-offs that ended them, may go; only the new notes may come. Everything else (meta events,
controllers, program changes, other channels' and tracks' notes) must be the same messages at
the same ticks in the same order.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque

import mido

NOTE_TYPES = ("note_on", "note_off")


def events(track) -> list[tuple[int, mido.Message]]:
    """(absolute tick, message with time 0) for every message but end_of_track."""
    result, tick = [], 0
    for message in track:
        tick += message.time
        if message.type != "end_of_track":
            result.append((tick, message.copy(time=0)))
    return result


def end_tick(track) -> int:
    return sum(message.time for message in track)


def is_off(message) -> bool:
    return message.type == "note_off" or (message.type == "note_on" and message.velocity == 0)


def ended_by(track, channel: int) -> dict[int, int]:
    """Index (in events(track)) of each note-on of the channel -> index of the note-off that ends it:
    the first one of its pitch not taken by an earlier note-on of that pitch."""
    sounding: dict[int, deque] = defaultdict(deque)
    pairs = {}
    for index, (_, message) in enumerate(events(track)):
        if message.type in NOTE_TYPES and message.channel == channel:
            if not is_off(message):
                sounding[message.note].append(index)
            elif sounding[message.note]:
                pairs[sounding[message.note].popleft()] = index
    return pairs


def assert_only_replaced(original: mido.MidiFile, edited: mido.MidiFile, start_tick: int, stop_tick: int,
                         new_notes: dict[tuple[int, int], list[tuple[int, int, int, int]]]) -> None:
    """new_notes: (MIDI track, channel) -> (on tick, off tick, pitch, velocity) of the notes that replace
    that channel's notes starting in [start_tick, stop_tick) of that track; None to skip checking them."""
    assert (edited.type, edited.ticks_per_beat, len(edited.tracks)) == (
        original.type, original.ticks_per_beat, len(original.tracks))
    for index, (before, after) in enumerate(zip(original.tracks, edited.tracks)):
        old, new = events(before), events(after)
        targets = {channel: notes for (track, channel), notes in new_notes.items() if track == index}

        def untouched(pair):
            message = pair[1]
            return message.type not in NOTE_TYPES or message.channel not in targets

        assert [e for e in new if untouched(e)] == [e for e in old if untouched(e)], f"track {index}"
        last_event = max((tick for tick, _ in new), default=0)
        assert after[-1].type == "end_of_track" and end_tick(after) == max(end_tick(before), last_event)
        for channel, notes in targets.items():
            pairs = ended_by(before, channel)
            removed = {i for i, (tick, m) in enumerate(old) if m.type in NOTE_TYPES and m.channel == channel
                       and not is_off(m) and start_tick <= tick < stop_tick}
            removed_offs = {pairs[i] for i in removed if i in pairs}

            def ons(items, inside):
                return [(tick, m.note, m.velocity) for tick, m in items
                        if m.type in NOTE_TYPES and m.channel == channel and not is_off(m)
                        and (start_tick <= tick < stop_tick) == inside]

            def offs(items):
                return Counter((tick, m.note) for tick, m in items
                               if m.type in NOTE_TYPES and m.channel == channel and is_off(m))

            assert ons(new, inside=False) == ons(old, inside=False)
            if notes is None:
                continue
            assert sorted(ons(new, inside=True)) == sorted((on, pitch, velocity) for on, _, pitch, velocity in notes)
            kept_offs = offs(e for i, e in enumerate(old) if i not in removed_offs)
            assert offs(new) == kept_offs + Counter((off, pitch) for _, off, pitch, _ in notes)
