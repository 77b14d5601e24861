"""`cmi-daemon play`: the schedule of real songs' bars, and playback into a recording mido port
(this machine has no MIDI system; the port stands in for a synth)."""

from __future__ import annotations

from collections import Counter

import mido
import pytest

from cmi_daemon.cli import main as cli, playback
from cmi_daemon.music.tokens import read_midi
from conftest import GROOVE_FIXTURES, POP909_FIXTURES


class RecordingPort(mido.ports.BaseOutput):
    """A mido output that keeps what it is sent, with the (fake) time of sending."""

    def __init__(self, clock):
        super().__init__(name="recording")
        self.clock = clock
        self.sent: list[tuple[float, mido.Message]] = []

    def _send(self, message):
        self.sent.append((self.clock(), message))


class FakeClock:
    def __init__(self, interrupt_at_s: float = float("inf")):
        self.now_s = 100.0
        self.interrupt_at_s = 100.0 + interrupt_at_s

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        if self.now_s + seconds >= self.interrupt_at_s:
            self.now_s = self.interrupt_at_s
            raise KeyboardInterrupt
        self.now_s += seconds


@pytest.mark.parametrize("path", [POP909_FIXTURES[0], GROOVE_FIXTURES[0]], ids=lambda p: p.stem)
def test_schedule_plays_exactly_the_bars_at_the_tempo_maps_times(path):
    song = read_midi(path)
    start_qn, end_qn = song.meter.bar_range_qn(9, 12)
    messages = playback.schedule(song, start_qn, end_qn)
    length_ms = song.tempo_map.ms_at(end_qn) - song.tempo_map.ms_at(start_qn)
    assert messages == sorted(messages, key=lambda m: m.time_ms)
    assert all(0.0 <= m.time_ms <= length_ms + 1e-6 for m in messages)

    channels = playback.track_channels(song)
    expected_onsets = Counter()
    for track, channel in zip(song.tracks, channels):
        for note in track.notes:
            if start_qn <= note.start_qn < end_qn:
                onset_ms = song.tempo_map.ms_at(note.start_qn) - song.tempo_map.ms_at(start_qn)
                expected_onsets[(round(onset_ms, 3), channel, note.pitch, note.velocity)] += 1
            elif note.start_qn < start_qn < note.start_qn + note.duration_qn:
                expected_onsets[(0.0, channel, note.pitch, note.velocity)] += 1
    onsets = Counter((round(m.time_ms, 3), m.channel, *m.data) for m in messages if m.kind == "note_on")
    assert onsets == expected_onsets and sum(onsets.values()) > 10
    offs = Counter((m.channel, m.data[0]) for m in messages if m.kind == "note_off")
    assert offs == Counter((m.channel, m.data[0]) for m in messages if m.kind == "note_on")
    if any(track.is_drum for track in song.tracks):
        assert {m.channel for m in messages} == {playback.DRUM_CHANNEL}


def test_play_sends_at_the_scheduled_times_and_releases_everything():
    song = read_midi(POP909_FIXTURES[0])
    messages = playback.schedule(song, *song.meter.bar_range_qn(9, 10))
    clock = FakeClock()
    port = RecordingPort(clock)
    playback.play(messages, port, clock=clock, sleep=clock.sleep)
    notes = [(time_s, m) for time_s, m in port.sent if m.type in ("note_on", "note_off")]
    assert [round(t - 100.0, 6) for t, _ in notes] == [round(m.time_ms / 1000.0, 6) for m in messages
                                                       if m.kind != "program_change"]
    final = [m for _, m in port.sent[len(port.sent) - len({m.channel for m in messages}):]]
    assert all(m.type == "control_change" and m.control == playback.ALL_NOTES_OFF for m in final)


def test_ctrl_c_mid_song_leaves_no_note_hanging():
    song = read_midi(POP909_FIXTURES[1])
    messages = playback.schedule(song, *song.meter.bar_range_qn(9, 16))
    clock = FakeClock(interrupt_at_s=3.0)
    port = RecordingPort(clock)
    with pytest.raises(KeyboardInterrupt):
        playback.play(messages, port, clock=clock, sleep=clock.sleep)
    sounding = Counter()
    for _, message in port.sent:
        if message.type == "note_on" and message.velocity > 0:
            sounding[(message.channel, message.note)] += 1
        elif message.type == "note_off":
            sounding[(message.channel, message.note)] = 0
    assert sum(sounding.values()) == 0, "a note was left sounding"
    assert any(m.type == "note_on" for _, m in port.sent) and max(t for t, _ in port.sent) == 103.0


def test_play_command_errors_are_clear(capsys):
    song_path = str(POP909_FIXTURES[0])
    assert cli.main(["play", song_path, "--bars", "500"]) == 2
    assert "starts after the song ends" in capsys.readouterr().err
    assert cli.main(["play", song_path, "--bars", "9", "--context-bars", "-1"]) == 2
    assert "--context-bars -1" in capsys.readouterr().err
    assert cli.main(["play"]) == 2
    assert "needs a .mid file" in capsys.readouterr().err
    try:
        names = mido.get_output_names()
    except Exception:  # no MIDI system here: the command must say so, not crash
        assert cli.main(["play", song_path, "--port", "synth"]) == 2
        assert "no MIDI system" in capsys.readouterr().err
    else:
        assert cli.main(["play", "--list-ports"]) == 0
        assert capsys.readouterr().out.strip() == ("\n".join(names) if names else "no MIDI outputs")
