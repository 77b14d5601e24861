"""`cmi-daemon infill` options: one set of flags, checked offline and with --daemon by the daemon's own
validation and limits, the seeds really used in every reply and summary, and honest devices."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from cmi_daemon.cli import infill as infill_cli
from cmi_daemon.cli.main import build_parser, main
from cmi_daemon.daemon import schema
from cmi_daemon.daemon.engine_backend import EngineBackend
from cmi_daemon.daemon.protocol import Limits, ProtocolError
from cmi_daemon.inference import device
from cmi_daemon.inference.sampling import SamplingOptions
from conftest import POP909_FIXTURES
from daemon_support import REPO, daemon_environment, infill_request, start_daemon_process, threaded_daemon
from tiny_bundle import tiny_bundle_dir

SONG = POP909_FIXTURES[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_bundle_dir(tmp_path_factory)


@pytest.fixture(autouse=True)
def own_home(tmp_path, monkeypatch):
    """A user folder of the test's own: no config file or DIL profile of the machine's user counts."""
    monkeypatch.setenv("CMI_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("flags, option, value, words", [
    (["--temperature", "7"], "temperature", 7.0, "--temperature = 7.0 is outside [0, 5]"),
    (["--top-p", "0"], "top_p", 0.0, "--top-p = 0.0 is outside (0, 1]"),
    (["--top-k", "-1"], "top_k", -1, "--top-k = -1 is outside 0..100000"),
    (["--repetition-penalty", "11"], "repetition_penalty", 11.0, "--repetition-penalty = 11.0 is outside [0, 10]"),
    (["--seed", str(2 ** 32)], "seed", 2 ** 32, "--seed = 4294967296 is outside 0..4294967295"),
    (["--candidates", "9"], "candidates", 9, "--candidates = 9 is outside 1..8"),
    (["--profile", "my profile"], "profile", "my profile", "--profile has characters outside"),
])
def test_a_bad_option_gets_the_daemons_message_naming_the_flag(model, tmp_path, capsys, flags, option, value, words):
    out = tmp_path / "out.mid"
    assert main(["infill", str(SONG), "--bars", "9", "--model", str(model), "-o", str(out), *flags]) == 2
    error = capsys.readouterr().err.strip()
    with pytest.raises(ProtocolError) as daemon_error:
        schema.parse_infill(infill_request(**{option: value}), Limits(), [])
    field = f"content.options.{option}"
    assert daemon_error.value.field == field
    assert error == "cmi-daemon: error: " + daemon_error.value.message.replace(field, infill_cli.flag(option))
    assert words in error and not out.exists()


def test_offline_checks_against_the_config_files_limits(model, tmp_path, own_home, capsys):
    (own_home / "config").mkdir(parents=True)
    (own_home / "config" / "config.toml").write_text("[limits]\nmax_candidates = 2\n")
    out = tmp_path / "out.mid"
    assert main(["infill", str(SONG), "--bars", "9", "--model", str(model), "-o", str(out),
                 "--candidates", "3"]) == 2
    assert "--candidates = 3 is outside 1..2" in capsys.readouterr().err


@pytest.mark.parametrize("flag, text, reason", [
    ("--top-k", "abc", "'abc' is not a whole number"),
    ("--candidates", "2.5", "'2.5' is not a whole number"),
    ("--temperature", "warm", "'warm' is not a number"),
    ("--top-p", "nan", "'nan' is not a finite number"),
])
def test_a_value_that_is_no_number_says_which_flag_and_why(tmp_path, capsys, flag, text, reason):
    with pytest.raises(SystemExit) as exit_info:
        main(["infill", str(SONG), "--bars", "9", "-o", str(tmp_path / "out.mid"), flag, text])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {reason}" in capsys.readouterr().err


def test_help_gives_every_options_meaning_and_default():
    infill = build_parser()._subparsers._group_actions[0].choices["infill"]
    helps = {action.dest: action.help or "" for action in infill._actions}
    defaults = SamplingOptions()
    for name in infill_cli.OPTION_NAMES:
        assert "default" in helps[name], name
    assert f"default {defaults.top_p:g}" in helps["top_p"]
    assert f"default {defaults.temperature:g}" in helps["temperature"]
    assert "0..4294967295" in helps["seed"] and "0..100000" in helps["top_k"]


def test_the_seed_used_is_printed_and_each_candidate_alone_comes_back_from_its_seed(model, tmp_path, capsys):
    def infill(out, *flags):
        assert main(["infill", str(SONG), "--bars", "9-10", "--model", str(model), "-o", str(out), "--json",
                     *flags]) == 0
        captured = capsys.readouterr()
        return json.loads(captured.out), captured.err

    drawn, summary = infill(tmp_path / "a.mid", "--candidates", "3")
    seed = drawn["seed"]
    assert isinstance(seed, int) and 0 <= seed <= schema.MAX_SEED
    assert [c["seed"] for c in drawn["candidates"]] == [(seed + k) % (schema.MAX_SEED + 1) for k in range(3)]
    assert f"seed {seed}" in summary and f"candidate 3 (seed {drawn['candidates'][2]['seed']})" in summary
    again, _ = infill(tmp_path / "b.mid", "--candidates", "3", "--seed", str(seed))
    assert again["candidates"][0]["tracks"] == drawn["candidates"][0]["tracks"]
    for candidate in drawn["candidates"]:
        alone, _ = infill(tmp_path / f"c{candidate['index']}.mid", "--seed", str(candidate["seed"]))
        assert alone["candidates"][0]["tracks"] == candidate["tracks"], candidate["index"]


def test_every_reply_carries_the_seeds_and_hello_every_limit(model):
    backend = EngineBackend(model)
    with threaded_daemon(backend) as daemon, client_for_daemon(daemon) as client:
        hello = client.hello()
        drawn = client.infill(infill_request(candidates=2, seed=None))
        given = client.infill(infill_request(session="take-2:8-12", candidates=2, seed=41, repetition_penalty=2.0))
    limits = hello["limits"]
    assert set(Limits().as_dict()) | set(schema.fixed_limits()) | {"queue_size", "request_timeout_ms"} <= set(limits)
    assert infill_cli.limits_from_hello(hello) == Limits()
    assert isinstance(drawn["seed"], int) and [c["seed"] for c in drawn["candidates"]] == [drawn["seed"],
                                                                                         drawn["seed"] + 1]
    assert given["seed"] == 41 and [c["seed"] for c in given["candidates"]] == [41, 42]


def client_for_daemon(daemon):
    from cmi_daemon.client import DaemonClient
    return DaemonClient(connection=daemon.connection_info(), timeout_ms=60_000)


@pytest.mark.slow
def test_daemon_infill_takes_the_same_flags_and_json_and_gives_the_offline_notes(model, tmp_path):
    home = tmp_path / "daemon-home"
    process = start_daemon_process(home, model)
    try:
        def cli(*args):
            return subprocess.run([sys.executable, "-m", "cmi_daemon.cli.main", *args], env=daemon_environment(home),
                                  capture_output=True, text=True, timeout=120, cwd=REPO)

        flags = ["--bars", "9-10", "--candidates", "2", "--seed", "123", "--temperature", "0.8", "--top-k", "40",
                 "--repetition-penalty", "1.5", "--polyphony", "1=1,2=3", "--pitch-range", "48-84", "--grid", "1/8",
                 "--json"]
        by_daemon = cli("infill", str(SONG), "--daemon", "-o", str(tmp_path / "daemon.mid"), *flags)
        assert by_daemon.returncode == 0, by_daemon.stderr
        offline = cli("infill", str(SONG), "--model", str(model), "-o", str(tmp_path / "offline.mid"), *flags)
        assert offline.returncode == 0, offline.stderr
        daemon_report, offline_report = json.loads(by_daemon.stdout), json.loads(offline.stdout)
        assert daemon_report["seed"] == offline_report["seed"] == 123
        assert [c["seed"] for c in daemon_report["candidates"]] == [123, 124]
        assert [c["tracks"] for c in daemon_report["candidates"]] == [c["tracks"] for c in offline_report["candidates"]]
        assert "infilled by the daemon (tiny)" in by_daemon.stderr and "candidate 2 (seed 124)" in by_daemon.stderr

        too_many = cli("infill", str(SONG), "--daemon", "--bars", "9", "--candidates", "9", "-o",
                       str(tmp_path / "no.mid"))
        assert too_many.returncode == 2 and "--candidates = 9 is outside 1..8" in too_many.stderr
        assert not (tmp_path / "no.mid").exists()
        device_flag = cli("infill", str(SONG), "--daemon", "--bars", "9", "--device", "cpu", "-o",
                          str(tmp_path / "no.mid"))
        assert device_flag.returncode == 2 and "--device does not apply with --daemon" in device_flag.stderr
    finally:
        process.terminate()
        process.wait(30)


def cuda_usable() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(cuda_usable(), reason="this machine can use CUDA: the fallback cannot be seen here")
def test_cuda_where_it_cannot_be_used_falls_back_to_the_cpu_says_so_once_and_reports_the_cpu(
        model, tmp_path, caplog, capfd):
    capfd.readouterr()
    with caplog.at_level(logging.WARNING, logger="cmi_daemon"):
        backend = EngineBackend(model, device="cuda", dil_dir=tmp_path / "dil")
    try:
        engine = backend.engine
        in_use = engine.step_session.get_providers()
        assert "CUDAExecutionProvider" not in in_use
        assert engine.providers == in_use == engine.encoder_session.get_providers()
        described = backend.describe()
        assert described["device"] == "cpu" and described["providers"] == in_use
        assert described["dil_device"] == "cpu" and str(backend.signal_sink.device) == "cpu"
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        onnx = [w for w in warnings if "the model runs on the CPU" in w]
        torch_lines = [w for w in warnings if "DIL learns on the CPU" in w]
        assert len(onnx) == 1 and len(torch_lines) == 1, warnings
        assert onnx[0].startswith("--device cuda: onnxruntime") and "CUDA" in onnx[0]
        assert "onnxruntime" not in capfd.readouterr().err, "ONNX Runtime's own failure lines were not silenced"
    finally:
        backend.signal_sink.close()


@pytest.mark.skipif(cuda_usable(), reason="this machine can use CUDA: the fallback cannot be seen here")
def test_offline_infill_on_cuda_warns_once_and_says_where_it_ran(model, tmp_path, capsys):
    assert main(["infill", str(SONG), "--bars", "9", "--model", str(model), "--device", "cuda", "-o",
                 str(tmp_path / "out.mid")]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("cmi-daemon: warning:")]
    assert len(warnings) == 1 and "the model runs on the CPU" in warnings[0]
    assert " on cpu, " in captured.out


def test_auto_without_a_gpu_does_not_warn_and_mps_says_onnx_runtime_has_none():
    if device.onnx_providers("auto") == [device.CPU_PROVIDER]:
        assert device.onnx_device_problem("auto", [device.CPU_PROVIDER]) is None
    assert device.onnx_device_problem("cpu", [device.CPU_PROVIDER]) is None
    assert "no MPS provider" in device.onnx_device_problem("mps", [device.CPU_PROVIDER])
