"""The REAPER actions without REAPER: the real scripts of bridges/reaper run against tests/fake_reaper.py
(injected as `reaper_python`) and a live daemon with the shipped default model; and the installer on a fake
REAPER resource folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from cmi_daemon import paths
from cmi_daemon.cli import main as cli, install_reaper
from cmi_daemon.daemon import protocol
from cmi_daemon.music.repeats import SEND_BARS
from cmi_daemon.errors import CMIError
from cmi_daemon.music.tokens import read_midi
from cmi_daemon.paths import default_model_dir

from conftest import FIXTURES
from daemon_support import REPO, StandInBackend, client_for, start_daemon_process, threaded_daemon
from fake_reaper import FakeReaper

BRIDGE = REPO / "bridges" / "reaper"
INFILL_SCRIPT = BRIDGE / "cmi_infill_selection.py"
ACCEPT_SCRIPT = BRIDGE / "cmi_accept_infill.py"
SETTINGS_SCRIPT = BRIDGE / "cmi_infill_settings.py"
SONG = FIXTURES / "pop909" / "235" / "235.mid"
REPLY_WAIT_S = 60.0
TICK_PAUSE_S = 0.01

ITEM_START_QN, ITEM_END_QN = 4.0, 240.0
WALTZ_START_QN, WALTZ_END_QN = 48.0, 72.0
"""Bars 13-20 are in 3/4 at 90 bpm; the rest of the song is 4/4 with its own tempo changes."""
RANGE_START_QN, RANGE_END_QN = 54.0, 63.0
RANGE_LABEL = "bars 15-17"


@pytest.fixture(scope="module")
def daemon_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("cmi-home")
    process = start_daemon_process(home, default_model_dir())
    yield home
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except Exception:
        process.kill()
        process.wait()


@pytest.fixture
def reaper(monkeypatch):
    """A fresh fake REAPER as `reaper_python`; __main__, sys.path and the bridge module restored afterwards."""
    fake = FakeReaper(bpm=66.0)
    monkeypatch.setitem(sys.modules, "reaper_python", fake.module())
    monkeypatch.setitem(sys.modules, "__main__", sys.modules["__main__"])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cmi_reaper", raising=False)
    yield fake
    sys.modules.pop("cmi_reaper", None)


@pytest.fixture
def song_project(reaper):
    """POP909 song 235 in the fake project: one take per track from bar 2, its tempo changes, a 3/4 section
    with a tempo change, the piano at 480 ticks per QN; the melody and piano items are selected."""
    song = read_midi(SONG)
    for qn, bpm in zip(song.tempo_map.start_qn[1:], song.tempo_map.bpm[1:]):
        reaper.add_marker(qn, bpm)
    reaper.add_marker(WALTZ_START_QN, 90.0, 3, 4)
    reaper.add_marker(WALTZ_END_QN, 90.0, 4, 4)
    takes = {}
    for track in song.tracks:
        fake_track = reaper.add_track(track.name)
        ticks_per_qn = 480 if track.name == "PIANO" else 960
        takes[track.name] = reaper.add_midi_item(fake_track, ITEM_START_QN, ITEM_END_QN, track.notes,
                                                 ticks_per_qn=ticks_per_qn, channel=track.channel or 0,
                                                 program=track.program)
    for name in ("MELODY", "PIANO"):
        takes[name].item.selected = True
    reaper.set_time_selection_qn(RANGE_START_QN, RANGE_END_QN)
    return takes


@pytest.fixture
def socket_calls(monkeypatch):
    """Every poll timeout and recv flag the bridge's sockets use."""
    calls = []
    original_poll, original_recv = zmq.Socket.poll, zmq.Socket.recv_multipart

    def poll(self, timeout=None, flags=zmq.POLLIN):
        calls.append(("poll", timeout))
        return original_poll(self, timeout, flags)

    def recv_multipart(self, flags=0, **kwargs):
        calls.append(("recv", flags))
        return original_recv(self, flags, **kwargs)

    monkeypatch.setattr(zmq.Socket, "poll", poll)
    monkeypatch.setattr(zmq.Socket, "recv_multipart", recv_multipart)
    return calls


def drive(reaper: FakeReaper) -> int:
    """Run deferred code tick by tick, as REAPER's UI timer would, until the script ends; returns the ticks."""
    ticks = 0
    deadline_s = time.monotonic() + REPLY_WAIT_S
    while reaper.tick():
        ticks += 1
        assert time.monotonic() < deadline_s, "the defer loop did not end"
        time.sleep(TICK_PAUSE_S)
    return ticks


def split_by_range(reaper: FakeReaper, take) -> tuple[list, list]:
    """(notes starting outside the range, notes starting inside), as sorted tuples."""
    inside, outside = [], []
    for note in reaper.take_notes(take):
        qn = reaper.take_qn(take, note[2])
        (inside if RANGE_START_QN - 1e-9 <= qn < RANGE_END_QN - 1e-9 else outside).append(note)
    return sorted(outside), sorted(inside)


def snapshot(reaper: FakeReaper, takes: dict) -> dict:
    return {name: reaper.take_notes(take) for name, take in takes.items()}


def assert_nothing_changed(reaper: FakeReaper, takes: dict, before: dict) -> None:
    assert snapshot(reaper, takes) == before
    assert reaper.undo_log == [] and reaper.edits_outside_undo == 0
    assert reaper.ui_refresh_depth == 0 and not reaper.deferred


def daemon_profile(daemon_home) -> dict:
    with client_for(daemon_home) as client:
        profiles = client.profiles()["profiles"]
    return next((p for p in profiles if p["name"] == "default"), {"repeated": 0, "accepted": 0})


@pytest.mark.slow
def test_infill_replaces_only_the_range_in_one_undo_block(reaper, song_project, daemon_home, monkeypatch,
                                                          socket_calls):
    monkeypatch.setenv("CMI_HOME", str(daemon_home))
    takes = song_project
    before = {name: split_by_range(reaper, take) for name, take in takes.items()}
    assert before["MELODY"][1] and before["PIANO"][1], "the range should hold notes to replace"

    reaper.run_script(INFILL_SCRIPT)
    assert reaper.message_boxes == [] and reaper.undo_log == [], reaper.message_boxes
    ticks = drive(reaper)

    assert reaper.message_boxes == [], reaper.message_boxes
    assert ticks > 1, "the reply should take more than one tick"
    assert reaper.undo_log == [("begin",), ("end", f"CMI: Infill selection ({RANGE_LABEL})", 4)]
    assert reaper.edits_outside_undo == 0
    assert reaper.ui_refresh_depth == 0 and reaper.ui_refresh_lowest == 0
    assert any(f"{RANGE_LABEL} infilled" in line for line in reaper.console), reaper.console

    new_notes = 0
    for name, take in takes.items():
        outside, inside = split_by_range(reaper, take)
        assert outside == before[name][0], f"{name}: notes outside the range changed"
        if name == "BRIDGE":
            assert inside == before[name][1], "an unselected take was edited"
            continue
        for note in inside:
            start_qn, end_qn = reaper.take_qn(take, note[2]), reaper.take_qn(take, note[3])
            assert RANGE_START_QN <= start_qn < RANGE_END_QN and end_qn <= RANGE_END_QN + 1e-9
        new_notes += len(inside)
    assert new_notes > 0, "the default model answered no notes at all"

    polls = [timeout for kind, timeout in socket_calls if kind == "poll"]
    receives = [flags for kind, flags in socket_calls if kind == "recv"]
    assert polls == [], "a defer tick polled the socket with a timeout"
    assert receives and all(flags & zmq.NOBLOCK for flags in receives), "a defer tick waited on the socket"


@pytest.mark.slow
def test_repeat_is_the_same_session_and_accept_sends_feedback(reaper, song_project, daemon_home, monkeypatch):
    monkeypatch.setenv("CMI_HOME", str(daemon_home))
    repeated_before = daemon_profile(daemon_home)["repeated"]
    accepted_before = daemon_profile(daemon_home)["accepted"]

    sessions = []
    for _ in range(2):
        reaper.run_script(INFILL_SCRIPT)
        drive(reaper)
        assert reaper.message_boxes == [], reaper.message_boxes
        sessions.append(reaper.ext_state[("CMI", "last_session")])
    guids = sorted(song_project[name].guid for name in ("MELODY", "PIANO"))
    assert sessions[0] == sessions[1] == f"{','.join(guids)}:{RANGE_START_QN:g}-{RANGE_END_QN:g}"
    assert len(reaper.undo_log) == 4
    assert daemon_profile(daemon_home)["repeated"] == repeated_before + 1

    reaper.run_script(ACCEPT_SCRIPT)
    drive(reaper)
    assert reaper.message_boxes == [], reaper.message_boxes
    assert any(f"kept {RANGE_LABEL}" in line for line in reaper.console), reaper.console
    assert daemon_profile(daemon_home)["accepted"] == accepted_before + 1
    assert len(reaper.undo_log) == 4, "accepting edits nothing"


def edit_in_flight(reaper: FakeReaper, take) -> None:
    """A note added to the take in the range, as the musician would while the daemon works."""
    api = sys.modules["reaper_python"]
    start_ppq = api.RPR_MIDI_GetPPQPosFromProjQN(reaper.handle(take), RANGE_START_QN + 1.0)
    api.RPR_MIDI_InsertNote(reaper.handle(take), 0, 0, start_ppq, start_ppq + 480, 0, 72, 100, 0)
    reaper.edits_outside_undo = 0


def assert_refused_for_melody(reaper: FakeReaper, takes: dict, before: dict, change: str) -> None:
    """One message naming the melody take and how it changed (the untouched piano take is not named);
    nothing written, no session recorded."""
    assert len(reaper.message_boxes) == 1, reaper.message_boxes
    message = reaper.message_boxes[0][0]
    assert f"MELODY ({change})" in message and "PIANO" not in message and "nothing was changed" in message
    assert_nothing_changed(reaper, takes, before)
    assert ("CMI", "last_session") not in reaper.ext_state


def test_the_fake_answers_as_reapers_python_wrapper(reaper, song_project):
    """ValidatePtr2 is False for every pointer; a deleted take answers NULL results; a hash that is not
    UTF-8 raises in the wrapper's decode."""
    api = reaper.module()
    melody = song_project["MELODY"]
    handle = reaper.handle(melody)
    assert api.RPR_ValidatePtr2(0, handle, "MediaItem_Take*") == 0
    ok, _, _, text_hash, _ = api.RPR_MIDI_GetHash(handle, 1, "", 64)
    assert ok == 1 and text_hash
    melody.binary_hash = True
    with pytest.raises(UnicodeDecodeError):
        api.RPR_MIDI_GetHash(handle, 1, "", 64)
    reaper.delete_item(melody.item)
    assert api.RPR_GetMediaItemTake_Item(handle) == reaper.null("MediaItem")
    assert api.RPR_MIDI_GetHash(handle, 1, "", 64)[0] == 0
    assert api.RPR_GetMediaItemTakeInfo_Value(handle, "D_PLAYRATE") == 0.0


@pytest.mark.slow
def test_a_take_edited_in_flight_is_left_alone(reaper, song_project, daemon_home, monkeypatch):
    monkeypatch.setenv("CMI_HOME", str(daemon_home))
    reaper.run_script(INFILL_SCRIPT)
    edit_in_flight(reaper, song_project["MELODY"])
    edited = snapshot(reaper, song_project)

    drive(reaper)

    assert_refused_for_melody(reaper, song_project, edited, "edited")


@pytest.mark.slow
def test_a_take_deleted_in_flight_is_noticed_and_nothing_is_written(reaper, song_project, daemon_home,
                                                                    monkeypatch):
    monkeypatch.setenv("CMI_HOME", str(daemon_home))
    reaper.run_script(INFILL_SCRIPT)
    melody = song_project.pop("MELODY")
    reaper.delete_item(melody.item)
    before = snapshot(reaper, song_project)

    drive(reaper)

    assert_refused_for_melody(reaper, song_project, before, "deleted")


@pytest.mark.parametrize("case", ["not UTF-8 throughout", "not UTF-8 throughout, edited",
                                  "not UTF-8 once edited"])
@pytest.mark.slow
def test_a_midi_hash_reapers_python_cannot_decode(reaper, song_project, daemon_home, monkeypatch, case):
    """The melody take's hash fails the wrapper's UTF-8 decode: its notes tell whether it changed, and
    a hash that decoded at the request and does not at the reply is a changed one."""
    monkeypatch.setenv("CMI_HOME", str(daemon_home))
    melody = song_project["MELODY"]
    melody.binary_hash = case.endswith("throughout") or case.endswith("throughout, edited")
    before = {name: split_by_range(reaper, take) for name, take in song_project.items()}

    reaper.run_script(INFILL_SCRIPT)
    if case.endswith("edited"):
        edit_in_flight(reaper, melody)
        melody.binary_hash = True
    edited = snapshot(reaper, song_project)
    drive(reaper)

    if case.endswith("edited"):
        assert_refused_for_melody(reaper, song_project, edited, "edited")
        return
    assert reaper.message_boxes == [], reaper.message_boxes
    assert len(reaper.undo_log) == 2
    for name in ("MELODY", "PIANO"):
        assert split_by_range(reaper, song_project[name])[0] == before[name][0]
    assert any(f"{RANGE_LABEL} infilled" in line for line in reaper.console), reaper.console


@pytest.fixture
def small_limits_home(tmp_path, monkeypatch):
    """CMI_HOME of a daemon (stand-in model) whose limits allow 4 QN and one track."""
    limits = protocol.Limits(max_range_qn=4.0, max_tracks=1)
    with threaded_daemon(StandInBackend(), limits=limits) as daemon:
        paths.write_connection_file(tmp_path / "state" / "connection.json", daemon.connection_info())
        monkeypatch.setenv("CMI_HOME", str(tmp_path))
        yield tmp_path


@pytest.mark.parametrize("case, expected", [
    ("range", "is 9 quarter notes long; the CMI daemon infills at most 4 at once"),
    ("tracks", "2 MIDI items are selected; the CMI daemon infills at most 1 at once"),
])
def test_the_daemons_limits_come_from_its_hello(reaper, song_project, small_limits_home, case, expected):
    if case == "tracks":
        reaper.set_time_selection_qn(RANGE_START_QN, RANGE_START_QN + 3.0)
    before = snapshot(reaper, song_project)
    reaper.run_script(INFILL_SCRIPT)
    drive(reaper)
    assert len(reaper.message_boxes) == 1 and expected in reaper.message_boxes[0][0], reaper.message_boxes
    assert_nothing_changed(reaper, song_project, before)


def test_daemon_not_running_says_how_to_start_it(reaper, song_project, tmp_path, monkeypatch):
    monkeypatch.setenv("CMI_HOME", str(tmp_path / "no-daemon"))
    before = snapshot(reaper, song_project)
    reaper.run_script(INFILL_SCRIPT)
    assert len(reaper.message_boxes) == 1
    assert "not running" in reaper.message_boxes[0][0]
    assert "cmi-daemon start --detach" in reaper.message_boxes[0][0]
    assert_nothing_changed(reaper, song_project, before)


@pytest.mark.parametrize("module", ["zmq", "psutil"])
def test_a_missing_client_dependency_gives_the_pip_command(reaper, song_project, monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    before = snapshot(reaper, song_project)
    reaper.run_script(INFILL_SCRIPT)
    assert len(reaper.message_boxes) == 1
    message = reaper.message_boxes[0][0]
    assert f'"{sys.executable}" -m pip install pyzmq msgpack psutil' in message
    assert "cmi-daemon install reaper" in message
    assert_nothing_changed(reaper, song_project, before)


@pytest.mark.parametrize("case, expected", [
    ("no time selection", "Nothing to infill: make a time selection"),
    ("nothing selected", "Nothing to infill: select the MIDI items"),
    ("selection outside the items", "is outside the selected MIDI items"),
    ("selection past an item edge", "runs past an edge of the MIDI item"),
    ("looped item", "loops its source"),
])
def test_selections_it_cannot_infill_are_refused(reaper, song_project, case, expected):
    if case == "no time selection":
        reaper.time_selection_s = (3.0, 3.0)
    elif case == "nothing selected":
        for take in song_project.values():
            take.item.selected = False
    elif case == "selection outside the items":
        reaper.set_time_selection_qn(0.0, 3.0)
    elif case == "selection past an item edge":
        reaper.set_time_selection_qn(236.0, 244.0)
    else:
        melody = song_project["MELODY"]
        melody.item.loop_source = 1
        melody.source.length_qn = 32.0
    before = snapshot(reaper, song_project)
    reaper.run_script(INFILL_SCRIPT)
    assert len(reaper.message_boxes) == 1 and expected in reaper.message_boxes[0][0], reaper.message_boxes
    assert_nothing_changed(reaper, song_project, before)


def test_accept_before_any_infill_says_so(reaper):
    reaper.run_script(ACCEPT_SCRIPT)
    assert len(reaper.message_boxes) == 1 and "Nothing to accept yet" in reaper.message_boxes[0][0]


def daemon_hello(daemon_home) -> dict:
    with client_for(daemon_home) as client:
        return client.hello()


@pytest.mark.slow
def test_the_request_follows_reapers_time_map(reaper, song_project, daemon_home):
    """Tempo and meter come from the markers in project QN, context is hello's bars each side (8 here,
    to count them across the meter changes), notes in project QN."""
    sys.path.insert(0, str(BRIDGE))
    import cmi_reaper

    selection = cmi_reaper.read_selection()
    hello = daemon_hello(daemon_home)
    assert hello["limits"]["context_bars"] == SEND_BARS
    eight = dict(hello, limits=dict(hello["limits"], context_bars=8))
    content = cmi_reaper.infill_content(selection, cmi_reaper.daemon_limits(eight))
    assert content["range"] == [RANGE_START_QN, RANGE_END_QN]
    assert [t["name"] for t in content["tracks"]] == ["MELODY", "PIANO"] and content["targets"] == [0, 1]
    assert [0.0, 4, 4] == content["time_signatures"][0]
    assert [WALTZ_START_QN, 3, 4] in content["time_signatures"] and [WALTZ_END_QN, 4, 4] in content["time_signatures"]
    assert [WALTZ_START_QN, 90.0] in content["tempo"] and content["tempo"][0] == [0.0, 66.0]
    song = read_midi(SONG)
    expected_start_qn = RANGE_START_QN - 2 * 3 - 6 * 4   # 2 bars of 3/4 and 6 of 4/4 before bar 15
    expected_end_qn = RANGE_END_QN + 3 * 3 + 5 * 4       # 3 bars of 3/4 and 5 of 4/4 after bar 17
    melody = next(t for t in song.tracks if t.name == "MELODY")
    expected = [n for n in melody.notes
                if n.start_qn < expected_end_qn and n.start_qn + n.duration_qn > expected_start_qn]
    sent = content["tracks"][0]["notes"]
    assert len(sent) == len(expected)
    for (start_qn, duration_qn, pitch, velocity), note in zip(sent, expected):
        assert abs(start_qn - note.start_qn) < 1e-3 and pitch == note.pitch and velocity == note.velocity


@pytest.mark.slow
def test_the_request_keeps_within_the_limits_hello_reports(reaper, song_project, daemon_home):
    """Context bars, name and session lengths and the note budget are the hello reply's; a daemon that
    reports too few limits is named."""
    sys.path.insert(0, str(BRIDGE))
    import cmi_reaper

    hello = daemon_hello(daemon_home)
    selection = cmi_reaper.read_selection()
    full = cmi_reaper.infill_content(selection, cmi_reaper.daemon_limits(hello))
    small = dict(hello["limits"], context_bars=1, max_track_name_chars=3, max_session_chars=60)
    content = cmi_reaper.infill_content(selection, cmi_reaper.daemon_limits(dict(hello, limits=small)))
    melody = [note for note in full["tracks"][0]["notes"]
              if RANGE_START_QN - 3.0 < note[0] + note[1] and note[0] < RANGE_END_QN + 3.0]
    assert content["tracks"][0]["notes"] == melody, "one 3/4 bar of context each side"
    assert [track["name"] for track in content["tracks"]] == ["MEL", "PIA"]
    assert content["session"].startswith("takes-") and len(content["session"]) <= 60
    assert content["timeout_ms"] == hello["limits"]["request_timeout_ms"]

    n_notes = sum(len(track["notes"]) for track in full["tracks"])
    budget = dict(hello["limits"], max_notes=n_notes - 1)
    with pytest.raises(cmi_reaper.BridgeError, match=f"hold {n_notes} notes .* at most {n_notes - 1}"):
        cmi_reaper.infill_content(selection, cmi_reaper.daemon_limits(dict(hello, limits=budget)))
    older = {key: value for key, value in hello["limits"].items() if key != "context_bars"}
    with pytest.raises(cmi_reaper.BridgeError, match="does not report its limits context_bars"):
        cmi_reaper.daemon_limits(dict(hello, limits=older))


def test_selected_tracks_stand_for_their_items_under_the_selection(reaper, song_project):
    sys.path.insert(0, str(BRIDGE))
    import cmi_reaper

    for take in song_project.values():
        take.item.selected = False
    song_project["BRIDGE"].item.track.selected = True
    selection = cmi_reaper.read_selection()
    assert [target.name for target in selection.targets] == ["BRIDGE"]
    assert selection.label == RANGE_LABEL and selection.targets[0].channel == 0


def test_install_and_uninstall_restore_reaper_byte_for_byte(tmp_path, capsys):
    resource = tmp_path / "REAPER"
    resource.mkdir()
    ini = b"[REAPER]\r\nafxcfg=0\r\nreascript=0\r\nlastproject=x.rpp\r\n\r\n[audioconfig]\r\nallow_sr_override=1\r\n"
    kb = b"KEY 1 65 40044 0\r\nSCR 4 0 RS0123 \"Custom: mine.lua\" mine.lua"
    (resource / "reaper.ini").write_bytes(ini)
    (resource / "reaper-kb.ini").write_bytes(kb)

    assert cli.main(["install", "reaper", "--path", str(resource)]) == 0
    assert cli.main(["install", "reaper", "--path", str(resource)]) == 0, "installing twice is harmless"
    scripts = resource / "Scripts" / "CMI"
    for name in ("cmi_reaper.py", "cmi_infill_selection.py", "cmi_accept_infill.py", "cmi_infill_settings.py"):
        assert (scripts / name).read_bytes() == (BRIDGE / name).read_bytes()
    recorded = json.loads((scripts / "cmi_python.json").read_text())
    assert recorded["python"] == sys.executable and str(REPO) in recorded["sys_path"]
    assert (resource / "reaper.ini.cmi-backup").read_bytes() == ini

    text = (resource / "reaper.ini").read_bytes().decode()
    library = install_reaper.python_library()
    section = text.split("[audioconfig]")[0]
    assert "reascript=1\r\n" in section and "reascript=0" not in text
    assert f"pythonlibpath64={library.parent}\r\n" in section
    assert f"pythonlibdll64={library.name}\r\n" in section
    assert text.endswith("[audioconfig]\r\nallow_sr_override=1\r\n")

    kb_lines = (resource / "reaper-kb.ini").read_bytes().decode().split("\r\n")[:-1]
    assert kb_lines[:2] == ["KEY 1 65 40044 0", 'SCR 4 0 RS0123 "Custom: mine.lua" mine.lua']
    assert kb_lines[2:] == [
        f'SCR 4 0 {install_reaper.action_id("cmi_infill_selection.py")} "Custom: CMI: Infill selection" '
        f'"{scripts / "cmi_infill_selection.py"}"',
        f'SCR 4 0 {install_reaper.action_id("cmi_accept_infill.py")} "Custom: CMI: Accept infill" '
        f'"{scripts / "cmi_accept_infill.py"}"',
        f'SCR 4 0 {install_reaper.action_id("cmi_infill_settings.py")} "Custom: CMI: Infill settings" '
        f'"{scripts / "cmi_infill_settings.py"}"']
    assert all(line.split()[3].startswith("RS") and len(line.split()[3]) == 42 for line in kb_lines[2:])

    (scripts / "__pycache__").mkdir()
    assert cli.main(["install", "reaper", "--path", str(resource), "--uninstall"]) == 0
    assert (resource / "reaper.ini").read_bytes() == ini
    assert (resource / "reaper-kb.ini").read_bytes() == kb
    assert sorted(p.name for p in resource.iterdir()) == ["reaper-kb.ini", "reaper.ini"]


def test_installer_refuses_while_reaper_runs_and_without_a_resource_folder(tmp_path):
    resource = tmp_path / "REAPER"
    resource.mkdir()
    (resource / "reaper.ini").write_text("[REAPER]\n")
    with pytest.raises(CMIError, match="REAPER is running"):
        install_reaper.install(resource, running=lambda: True)
    with pytest.raises(CMIError, match="REAPER is running"):
        install_reaper.uninstall(resource, running=lambda: True)
    assert sorted(p.name for p in resource.iterdir()) == ["reaper.ini"]
    with pytest.raises(CMIError, match="no reaper.ini"):
        install_reaper.install(tmp_path / "elsewhere", running=lambda: False)
    assert install_reaper.is_reaper_running() is False


@pytest.mark.skipif(shutil.which("sleep") is None, reason="needs a `sleep` program to run under REAPER's name")
@pytest.mark.slow
def test_a_process_named_reaper_is_seen_running_until_it_ends(tmp_path):
    executable = tmp_path / ("reaper.exe" if os.name == "nt" else "reaper")
    shutil.copy(shutil.which("sleep"), executable)
    process = subprocess.Popen(["sleep", "60"], executable=str(executable))  # argv[0] for multi-call binaries
    try:
        deadline_s = time.monotonic() + 10
        while not install_reaper.is_reaper_running() and time.monotonic() < deadline_s:
            time.sleep(0.05)
        assert install_reaper.is_reaper_running()
    finally:
        process.kill()
        process.wait(10)
    assert install_reaper.is_reaper_running() is False


def test_ini_edits_keep_every_other_byte():
    text = "[REAPER]\nreascript=0\n[other]\nreascript=5"
    changed = install_reaper.ini_with(text, "REAPER", "reascript", "1")
    assert changed == "[REAPER]\nreascript=1\n[other]\nreascript=5"
    added = install_reaper.ini_with("[REAPER]\na=1", "REAPER", "pythonlibdll64", "lib.so")
    assert added == "[REAPER]\na=1\npythonlibdll64=lib.so"
    assert install_reaper.ini_with(added, "REAPER", "pythonlibdll64", None) == "[REAPER]\na=1"
    assert install_reaper.ini_value(text, "other", "reascript") == "5"


@pytest.mark.slow
def test_a_daemon_error_reply_is_shown_with_its_code(reaper, song_project, daemon_home, monkeypatch):
    monkeypatch.setenv("CMI_HOME", str(daemon_home))
    reaper.markers[0].bpm = 2000.0
    before = snapshot(reaper, song_project)
    reaper.run_script(INFILL_SCRIPT)
    drive(reaper)
    assert len(reaper.message_boxes) == 1
    message = reaper.message_boxes[0][0]
    assert "invalid_field" in message and "content.tempo[1][1]" in message and "nothing was changed" in message
    assert_nothing_changed(reaper, song_project, before)


@pytest.mark.slow
def test_the_client_the_actions_import_needs_only_pyzmq_and_msgpack():
    """REAPER's Python may lack numpy, mido or ONNX Runtime: importing cmi_daemon.client, as the actions
    do, loads nothing but the standard library, pyzmq, msgpack and cmi_daemon's own light modules."""
    code = ("import json, sys; before = set(sys.modules); import cmi_daemon.client; "
            "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before}"
            " - set(sys.stdlib_module_names))))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=True)
    outside = {name for name in json.loads(loaded.stdout)
               if not name.startswith("_cython") and name != "cython_runtime"}
    assert outside == {"cmi_daemon", "zmq", "msgpack"}


def test_the_pip_command_names_the_interpreter_reaper_loaded(reaper, monkeypatch):
    sys.path.insert(0, str(BRIDGE))
    import cmi_reaper

    monkeypatch.setattr(sys, "executable", "/opt/REAPER/reaper")
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert cmi_reaper.reaper_python_path() == str(Path(sys.base_prefix) / "bin" / f"python{version}")


@pytest.mark.slow
def test_infill_settings_are_kept_with_the_project_and_shape_the_infill(reaper, song_project, daemon_home,
                                                                       monkeypatch):
    """The settings dialog shows what the project holds, keeps what the musician types (empty fields
    follow each track), and the next infill's notes keep to it: one note at a time, pitches 60-72,
    onsets on the 1/8 grid of the bar lines, the song's repeats not followed."""
    monkeypatch.setenv("CMI_HOME", str(daemon_home))
    reaper.user_inputs.extend([",1,60-72,,,1/8,0", None])
    reaper.run_script(SETTINGS_SCRIPT)
    assert reaper.message_boxes == [], reaper.message_boxes
    title, n_fields, captions, shown = reaper.dialogs[0]
    assert (title, n_fields, shown) == ("CMI: Infill settings", 7, ",,,,,,")
    assert captions.endswith(",extrawidth=120") and len(captions.split(",")) == 8
    assert json.loads(reaper.project_ext_state[("CMI", "controls")]) == {
        "max_polyphony": 1, "pitch_range": [60, 72], "grid": "1/8", "follow_repeat": 0.0}
    reaper.run_script(SETTINGS_SCRIPT)  # shown again, then cancelled: nothing changes
    assert reaper.dialogs[1][3] == ",1,60-72,,,1/8,0"
    assert json.loads(reaper.project_ext_state[("CMI", "controls")])["max_polyphony"] == 1
    sys.path.insert(0, str(BRIDGE))
    import cmi_reaper

    options = cmi_reaper.infill_options(2)
    assert options["follow_repeat"] == 0.0 and all("follow_repeat" not in c for c in options["controls"])

    reaper.run_script(INFILL_SCRIPT)
    drive(reaper)
    assert reaper.message_boxes == [], reaper.message_boxes
    for name in ("MELODY", "PIANO"):
        _, inside = split_by_range(reaper, song_project[name])
        spans = [(reaper.take_qn(song_project[name], n[2]), reaper.take_qn(song_project[name], n[3]), n[5])
                 for n in inside]
        assert spans, f"{name}: no new notes"
        assert all(60 <= pitch <= 72 for _, _, pitch in spans)
        assert all(abs(start * 2 - round(start * 2)) < 1e-6 for start, _, _ in spans)
        assert all(end_a <= start_b + 1e-6 for (_, end_a, _), (start_b, _, _) in zip(sorted(spans), sorted(spans)[1:]))


def test_a_setting_it_cannot_read_is_refused_and_nothing_is_kept(reaper):
    reaper.user_inputs.extend(["lots,,,,,,", ",,,,,,2"])
    reaper.run_script(SETTINGS_SCRIPT)
    reaper.run_script(SETTINGS_SCRIPT)
    assert ("CMI", "controls") not in reaper.project_ext_state
    assert "Notes per quarter note: 'lots' is not a value it takes" in reaper.message_boxes[0][0]
    assert "Follow the song's repeats (0-1): '2' is not a value it takes" in reaper.message_boxes[1][0]


@pytest.mark.slow
def test_a_zero_length_note_is_sent_for_the_daemons_rule(reaper, song_project, daemon_home):
    """A drum hit written as note-on and note-off at one tick is sent as it is (duration 0), as the
    Live device does: the daemon's degenerate-note rule keeps it (docs/protocol.md)."""
    sys.path.insert(0, str(BRIDGE))
    import cmi_reaper

    take = song_project["MELODY"]
    hit_ppq = (RANGE_START_QN - 2.0 - ITEM_START_QN) * take.ticks_per_qn
    take.notes.append([0, 0, hit_ppq, hit_ppq, 0, 100, 90])
    content = cmi_reaper.infill_content(cmi_reaper.read_selection(),
                                        cmi_reaper.daemon_limits(daemon_hello(daemon_home)))
    assert [RANGE_START_QN - 2.0, 0.0, 100, 90] in content["tracks"][0]["notes"]
