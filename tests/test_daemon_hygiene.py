"""A daemon process started the normal way keeps its files private whatever the umask, leaves no
temporaries of a killed write behind, writes logs a client cannot forge, validates the numbers a
client sends as they are, counts only malformed messages as rejected, and says what DIL learned."""

from __future__ import annotations

import os
import stat
import time

import pytest
import torch

from cmi_daemon.client import DaemonClient
from cmi_daemon.daemon.server import NoLearning
from cmi_daemon.dil.store import ProfileStore
from daemon_support import (StandInBackend, check_infill_reply, client_for, infill_request, start_daemon_process,
                            threaded_daemon)
from tiny_bundle import tiny_bundle_dir

FORGED_CLIENT = "\n2026-01-01 00:00:00,000 ERROR cmi.forged: injected"

pytestmark = [pytest.mark.skipif(os.name == "nt", reason="POSIX permissions and umask"),
              pytest.mark.slow]


@pytest.fixture(scope="module")
def daemon_home(tmp_path_factory):
    """A daemon started under umask 000 over the temporaries a kill during atomic writes leaves."""
    home = tmp_path_factory.mktemp("hygiene-home")
    (home / "state").mkdir()
    (home / "data").mkdir()
    (home / "state" / ".connection.json.0123456789ab.tmp").write_text("{}")
    (home / "data" / ".profiles.json.0123456789ab.tmp").write_text("{}")
    old_umask = os.umask(0)
    try:
        process = start_daemon_process(home, tiny_bundle_dir(tmp_path_factory), "--queue-size", "1")
    finally:
        os.umask(old_umask)
    try:
        yield home
    finally:
        process.terminate()
        assert process.wait(30) == 0


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _wait_for(condition, timeout_s: float = 60.0):
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def test_folders_are_0700_files_0600_and_temporaries_of_killed_writes_are_gone(daemon_home):
    with client_for(daemon_home) as client:
        request = infill_request(session="private")
        client.infill(request)
        client.infill(request)  # a repeat: profiles.json and the DIL state are written
    _wait_for((daemon_home / "data/dil/default.profile/log.json").exists)
    folders = ["state", "data", "logs", "data/dil", "data/dil/default.profile"]
    files = ["state/daemon.lock", "state/connection.json", "logs/daemon.log", "data/profiles.json",
             "data/dil/default.profile/state.safetensors", "data/dil/default.profile/log.json"]
    assert {name: _mode(daemon_home / name) for name in folders} == {name: 0o700 for name in folders}
    assert {name: _mode(daemon_home / name) for name in files} == {name: 0o600 for name in files}
    assert not list(daemon_home.glob("*/.*.tmp")), "temporaries of interrupted writes are removed at start"


def test_a_forged_hello_and_nul_bytes_stay_inside_one_log_line(daemon_home):
    with client_for(daemon_home) as client:
        client.request("hello", {"client": FORGED_CLIENT})
        client.request("hello", {"client": "nul\x00bytes\x00"})
        client.status()
    log = (daemon_home / "logs" / "daemon.log").read_bytes()
    assert b"\x00" not in log
    lines = log.decode("utf-8").splitlines()
    assert not [line for line in lines if line.startswith("2026-01-01 00:00:00,000 ERROR cmi.forged")]
    assert [line for line in lines if line.endswith("hello from \\n2026-01-01 00:00:00,000 ERROR cmi.forged: injected")]
    assert [line for line in lines if line.endswith("hello from nul\\x00bytes\\x00")]


def test_numbers_are_validated_and_used_as_sent(daemon_home):
    """A denormal top_p (the smallest double), note length and density reach validation and the
    engine as sent: neither the thread that validates nor the one that infills flushes them to 0."""
    request = infill_request(session="denormal", top_p=5e-324,
                             controls=[{"track": 0, "note_length_qn": 1e-310, "density_per_qn": 5e-324}])
    request["tracks"][0]["notes"].append([3.25, 1e-310, 70, 90])
    with client_for(daemon_home) as client:
        check_infill_reply(client.infill(request), request)


def test_busy_is_not_a_rejected_message(daemon_home):
    with client_for(daemon_home, timeout_ms=120_000) as client:
        before = client.status()
        long = client.send("infill", infill_request(session="long", start_qn=0.0, end_qn=256.0, candidates=8))
        _wait_for(lambda: client.status()["running"] is not None)
        waiting = client.send("infill", infill_request(session="waiting"))
        refused = client.send("infill", infill_request(session="refused"))
        assert client.receive(refused)["error"]["code"] == "busy"
        client.receive(long)
        client.receive(waiting)
        after = client.status()
    assert after["messages_rejected"] == before["messages_rejected"]
    assert after["requests_failed"] == before["requests_failed"] + 1


def test_an_accept_of_the_first_version_is_logged_in_words(daemon_home):
    with client_for(daemon_home) as client:
        client.infill(infill_request(session="kept"))
        client.feedback("kept", "accept")

    def line():
        lines = (daemon_home / "logs" / "daemon.log").read_text().splitlines()
        return [entry for entry in lines if "DIL: accept on profile default" in entry]
    assert _wait_for(line)[-1].endswith("DIL: accept on profile default: no step, the first version was accepted")


class UnfinishedLearner(NoLearning):
    """A learner killed before it saved: signals reach it, its store holds what was saved before."""

    def __init__(self, store: ProfileStore):
        self.store = store


def test_profiles_say_what_the_saved_state_learned(tmp_path):
    """The counters are saved when a signal arrives, the learned state after its steps: a kill between
    the two keeps a count the state lacks, and `profiles` says so."""
    store = ProfileStore(tmp_path / "dil", base_id="base")
    with threaded_daemon(StandInBackend(), tmp_path / "profiles.json") as daemon:
        daemon.sink = UnfinishedLearner(store)
        with DaemonClient(connection=daemon.connection_info(), timeout_ms=20_000) as client:
            client.infill(infill_request(session="s"))
            client.infill(infill_request(session="s"))
            [entry] = client.profiles()["profiles"]
            assert (entry["repeated"], entry["learned"]) == (1, None)
            store.save("default", {"w": torch.zeros(2)}, steps=2, signals=1, settings_json="{}")
            [entry] = client.profiles()["profiles"]
            assert (entry["repeated"], entry["learned"]) == (1, {"signals": 1, "steps": 2})
            ProfileStore(tmp_path / "dil", base_id="another model").save(
                "default", {"w": torch.zeros(2)}, steps=5, signals=3, settings_json="{}")
            assert client.profiles()["profiles"][0]["learned"] is None, "a state of another model holds nothing"
