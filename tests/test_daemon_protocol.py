"""Wire format and request validation of docs/protocol.md, without sockets: signing, field paths, settings."""

from __future__ import annotations

import math

import msgpack
import pytest

from cmi_daemon.daemon import protocol, schema
from cmi_daemon.daemon.protocol import Limits, ProtocolError
from cmi_daemon.daemon.settings import ConfigError, Settings, load_settings
from daemon_support import infill_request


def test_signature_is_hex_hmac_sha256_of_the_body_keyed_by_the_key_text():
    import hashlib
    import hmac
    key = protocol.new_key()
    body = protocol.pack({"a": 1})
    assert len(key) == 64 and int(key, 16) >= 0
    assert protocol.sign(key, body) == hmac.new(key.encode(), body, hashlib.sha256).hexdigest().encode()
    assert protocol.signature_matches(key, body, protocol.sign(key, body))
    assert not protocol.signature_matches(key, body + b"x", protocol.sign(key, body))
    assert not protocol.signature_matches(key, body, b"")


def test_truncated_msgpack_is_bad_message():
    body = protocol.pack(protocol.request_envelope("1", "status", {}))
    with pytest.raises(ProtocolError) as caught:
        protocol.unpack(body[:-3])
    assert caught.value.code == "bad_message"


@pytest.mark.parametrize("version, ok", [("1.0", True), ("1.7", True), ("2.0", False), ("1", False), ("x.y", False)])
def test_same_major_version_is_compatible(version, ok):
    assert protocol.version_compatible(version) is ok


def _parse_error(mutate) -> ProtocolError:
    content = infill_request()
    mutate(content)
    with pytest.raises(ProtocolError) as caught:
        schema.parse_infill(content, Limits(), [])
    return caught.value


@pytest.mark.parametrize("mutate, code, field", [
    (lambda c: c["tracks"][0]["notes"][3].__setitem__(0, math.nan), "invalid_field", "content.tracks[0].notes[3][0]"),
    (lambda c: c["tracks"][0]["notes"][3].__setitem__(0, math.inf), "invalid_field", "content.tracks[0].notes[3][0]"),
    (lambda c: c["tracks"][0]["notes"][3].__setitem__(0, -1.0), "invalid_field", "content.tracks[0].notes[3][0]"),
    (lambda c: c["tracks"][1]["notes"][0].__setitem__(1, -0.5), "invalid_field", "content.tracks[1].notes[0][1]"),
    (lambda c: c["tracks"][0]["notes"][2].__setitem__(2, 128), "invalid_field", "content.tracks[0].notes[2][2]"),
    (lambda c: c["tracks"][0]["notes"][2].__setitem__(3, 0), "invalid_field", "content.tracks[0].notes[2][3]"),
    (lambda c: c["tracks"][0]["notes"][2].__setitem__(2, 60.0), "invalid_field", "content.tracks[0].notes[2][2]"),
    (lambda c: c["tracks"][0]["notes"][2].__setitem__(2, True), "invalid_field", "content.tracks[0].notes[2][2]"),
    (lambda c: c["tracks"][0]["notes"].__setitem__(1, [1, 2, 3]), "invalid_field", "content.tracks[0].notes[1]"),
    (lambda c: c["tracks"][0].__setitem__("program", "piano"), "invalid_field", "content.tracks[0].program"),
    (lambda c: c["tracks"][0].pop("notes"), "invalid_field", "content.tracks[0].notes"),
    (lambda c: c.__setitem__("tracks", []), "invalid_field", "content.tracks"),
    (lambda c: c.__setitem__("tracks", [c["tracks"][0]] * 65), "too_large", "content.tracks"),
    (lambda c: c.__setitem__("range", [8.0, 8.0]), "invalid_field", "content.range"),
    (lambda c: c.__setitem__("range", [0.0, 1000.0]), "too_large", "content.range"),
    (lambda c: c.__setitem__("range", [0.0]), "invalid_field", "content.range"),
    (lambda c: c.__setitem__("range", [8.0, 12.0, 16.0]), "invalid_field", "content.range"),
    (lambda c: c.__setitem__("range", "8-12"), "invalid_field", "content.range"),
    (lambda c: c.__setitem__("targets", [2]), "invalid_field", "content.targets[0]"),
    (lambda c: c.__setitem__("targets", [0, 0]), "invalid_field", "content.targets"),
    (lambda c: c.__setitem__("tempo", [[0, 0.5]]), "invalid_field", "content.tempo[0][1]"),
    (lambda c: c.__setitem__("tempo", [[math.nan, 120]]), "invalid_field", "content.tempo[0][0]"),
    (lambda c: c.__setitem__("time_signatures", [[0, 4, 3]]), "invalid_field", "content.time_signatures[0][2]"),
    (lambda c: c["options"].__setitem__("candidates", 9), "invalid_field", "content.options.candidates"),
    (lambda c: c["options"].__setitem__("top_p", 0), "invalid_field", "content.options.top_p"),
    (lambda c: c["options"].__setitem__("profile", "../etc"), "invalid_field", "content.options.profile"),
    (lambda c: c.__setitem__("session", ""), "invalid_field", "content.session"),
    (lambda c: c.__setitem__("session", "x" * 257), "invalid_field", "content.session"),
])
def test_invalid_infill_fields_are_named(mutate, code, field):
    error = _parse_error(mutate)
    assert (error.code, error.field) == (code, field)
    assert field.split(".")[-1].split("[")[0] in error.message


def test_note_limit_counts_notes_over_all_tracks():
    content = infill_request()
    limits = Limits(max_notes=20)
    with pytest.raises(ProtocolError) as caught:
        schema.parse_infill(content, limits, [])
    assert caught.value.code == "too_large" and caught.value.field == "content.tracks[1].notes"


def test_unknown_fields_are_ignored_with_a_warning():
    content = infill_request()
    content["colour"] = "blue"
    content["options"]["tempo"] = 3
    warnings: list[str] = []
    request = schema.parse_infill(content, Limits(), warnings)
    assert sorted(warnings) == ["content.colour: unknown field, ignored",
                                "content.options.tempo: unknown field, ignored"]
    assert request.song.tracks[1].program == 33 and request.target_tracks == (0,)
    assert request.song.tempo_map.bpm == (120.0, 100.0)


@pytest.mark.parametrize("body, code, field", [
    ([1, 2], "bad_message", None),
    ({"id": "1", "type": "status", "content": {}}, "bad_message", "message.protocol"),
    ({"protocol": "2.0", "id": "1", "type": "status", "content": {}}, "unsupported_version", "message.protocol"),
    ({"protocol": "1.0", "id": "", "type": "status", "content": {}}, "bad_message", "message.id"),
    ({"protocol": "1.0", "id": "1", "type": 5, "content": {}}, "bad_message", "message.type"),
    ({"protocol": "1.0", "id": "1", "type": "reboot", "content": {}}, "unknown_type", "message.type"),
    ({"protocol": "1.0", "id": "1", "type": "status"}, "bad_message", "message.content"),
    ({"protocol": "1.0", "id": "1", "type": "status", "content": []}, "bad_message", "message.content"),
])
def test_bad_envelopes(body, code, field):
    with pytest.raises(ProtocolError) as caught:
        schema.parse_envelope(msgpack.unpackb(msgpack.packb(body)))
    assert (caught.value.code, caught.value.field) == (code, field)


def test_unknown_envelope_fields_are_named_by_their_message_path():
    body = {**protocol.request_envelope("1", "status", {}), "colour": "blue"}
    assert schema.parse_envelope(body).warnings == ("message.colour: unknown field, ignored",)


def test_settings_from_toml_and_flags(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nport = 5000\nqueue_size = 3\n[limits]\nmax_notes = 10\nmax_range_qn = 16\n'
                    '[dil]\nenabled = false\nsteps_per_signal = 4\nlr = 0.0003\nloss = "distance"\n')
    settings = load_settings(path, {"port": 6000, "model": None})
    assert (settings.port, settings.queue_size, settings.limits.max_notes, settings.limits.max_range_qn) == \
        (6000, 3, 10, 16.0)
    assert (settings.dil.enabled, settings.dil.steps_per_signal, settings.dil.lr, settings.dil.loss) == \
        (False, 4, 3e-4, "distance")
    assert load_settings(tmp_path / "absent.toml", {}) == Settings()


@pytest.mark.parametrize("text, words", [
    ("[daemon]\nprot = 1\n", "unknown key 'prot'"),
    ("[daemon]\nport = 'x'\n", "port must be a int"),
    ("[server]\n", "unknown section"),
    ("[daemon\n", "cannot read"),
    ("[daemon]\nlog_level = 'LOUD'\n", "log_level"),
    ("[dil]\nenabled = 1\n", "enabled must be a bool"),
    ("[dil]\nloss = 'l2'\n", "choose one of cosine, distance"),
    ("[dil]\nsteps_per_signal = 100\n", "choose 1..16"),
])
def test_bad_config_files_are_named(tmp_path, text, words):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(path) in str(caught.value) and words in str(caught.value)


def test_a_denormal_is_validated_as_sent_after_the_dil_device_is_chosen():
    """Choosing DIL's device on the thread that validates requests must not make denormals compare
    as zero there (flushing them is the learner thread's own setting). The thread starts with them
    kept: an engine run in this test process may have flushed them here (ONNX Runtime's
    session.set_denormal_as_zero applies to the thread that runs a session, in the daemon its worker)."""
    import torch

    from cmi_daemon.inference.device import dil_device

    torch.set_flush_denormal(False)
    dil_device("auto")
    dil_device("cpu")
    options = schema.parse_options({"top_p": 5e-324}, Limits(), [])
    assert options.top_p == 5e-324 and options.top_p > 0
