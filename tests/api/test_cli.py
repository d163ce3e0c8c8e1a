"""The `tpaserve` command: --help documents every flag; every bad value ends with one line
on stderr, a non-zero status and no traceback; SIGTERM drains in-flight requests."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.api.conftest import MODEL_NAME
from tpaserve import args as args_module
from tpaserve.api import cli


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpaserve", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tpaserve: error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_documents_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    for action in cli.build_parser()._actions:
        for flag in action.option_strings:
            assert flag in r.stdout, flag
        assert action.help, action.option_strings
    for flag in ("--model", "--tokenizer", "--served-model-name", "--host", "--port", "--dtype",
                 "--device", "--block-size", "--num-blocks", "--cache-memory",
                 "--gpu-memory-utilization", "--no-enable-prefix-caching",
                 "--max-num-batched-tokens", "--max-num-seqs", "--max-model-len",
                 "--max-queued-requests", "--api-key", "--seed", "--enforce-eager",
                 "--log-level", "--max-request-body-bytes", "--graceful-shutdown-timeout"):
        assert flag in r.stdout, flag


def test_help_reads_cleanly():
    """Generated from EngineArgs and ServerArgs: one flag per field; each default stated
    once; a --no- flag says what it turns off; no word or flag broken at a line's end."""
    import dataclasses

    from tpaserve.args import EngineArgs, ServerArgs
    text = run_cli("--help").stdout
    fields = [f.name for cls in (EngineArgs, ServerArgs) for f in dataclasses.fields(cls)]
    parser = cli.build_parser()
    assert sorted(a.dest for a in parser._actions if a.dest != "help") == sorted(fields)
    for action in parser._actions:
        helptext = parser.formatter_class("tpaserve")._get_help_string(action)
        assert helptext.lower().count("default") <= 1, helptext
        for flag in action.option_strings:
            if flag.startswith("--no-"):
                assert action.help.startswith("turn off "), action.help
    for line in text.splitlines():
        assert not line.rstrip().endswith("-") or line.strip().startswith("-"), line
    assert "(default: None)" not in text and "(default: False)" not in text


@pytest.mark.parametrize("args,needle", [
    (["--port", "http"], "--port"), (["--cache-memory", "4XB"], "4XB"),
    (["--gpu-memory-utilization", "1.5"], "(0, 1]"), (["--dtype", "int8"], "int8"),
    (["--block-size", "0"], "[1, 1024]"), (["--no-such-flag"], "--no-such-flag"),
    (["--model", "/definitely/not/here"], "/definitely/not/here"),
    (["--kv-events-endpoint", "http://x:1"], "tcp://*:5557"),
    (["--kv-events-endpoint", "tcp://*:99999"], "[1, 65535]"),
    (["--kv-events-endpoint", "tcp://*:5557", "--no-enable-prefix-caching"],
     "--no-enable-prefix-caching"),
    (["--kv-events-replay-endpoint", "tcp://*:5558"], "needs --kv-events-endpoint"),
])
def test_bad_flags_exit_with_one_line(args, needle):
    r = run_cli(*args)
    assert r.returncode != 0
    assert_one_line_error(r.stderr, needle)


@pytest.mark.parametrize("text,size", [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1048576", 2**20), ("1.5GB", 1_500_000_000),
    ("64kib", 65536), ("2 GiB", 2 * 2**30), ("100B", 100),
])
def test_parse_size(text, size):
    assert cli.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "4 XB", "0", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(Exception):
        cli.parse_size(text)


def main_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(["--port", "0", "--device", "cpu", *argv])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert_one_line_error(err)
    return err


def test_checkpoint_and_tokenizer_and_config_errors_are_one_line(capsys, tmp_path, checkpoint):
    assert "no config.json" in main_error(capsys, "--model", str(tmp_path))
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    err = main_error(capsys, "--model", str(tmp_path))
    assert "no weights" in err and "model.safetensors" in err
    (tmp_path / "tok").mkdir()
    err = main_error(capsys, "--model", str(checkpoint), "--tokenizer", str(tmp_path / "tok"))
    assert "no tokenizer found" in err and "tokenizer.model" in err
    err = main_error(capsys, "--model", str(checkpoint), "--max-model-len", "100000")
    assert "100000" in err
    assert "--block-size" in main_error(capsys, "--model", str(checkpoint), "--block-size", "4096")


def test_missing_demo_model_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(args_module, "DEMO_DIR", tmp_path / "missing")
    assert "--model" in main_error(capsys)


def test_busy_port_is_one_line(capsys, checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit):
            cli.main(["--model", str(checkpoint), "--port", str(port)])
    assert_one_line_error(capsys.readouterr().err, str(port))


def test_busy_kv_events_port_is_one_line(capsys, checkpoint):
    """The engine core binds the PUB socket; a port in use ends start-up with one line."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SystemExit):
            cli.main(["--model", str(checkpoint), "--port", "0", "--device", "cpu",
                      "--kv-events-endpoint", f"tcp://*:{port}"])
    assert_one_line_error(capsys.readouterr().err, f"tcp://*:{port}")


def stream_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    got: dict = {"events": [], "error": None}

    def read():
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        got["events"].append(line)
        except Exception as e:         # noqa: BLE001 - inspected by the test
            got["error"] = e
    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, got


def wait_events(got: dict, n: int, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while len(got["events"]) < n:
        assert time.monotonic() < end and got["error"] is None, got
        time.sleep(0.01)


def test_sigterm_lets_in_flight_requests_finish(start_server):
    s = start_server("--graceful-shutdown-timeout", "30")
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t, got = stream_in_thread(s.url, body)
    wait_events(got, 2)
    s.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert got["error"] is None and got["events"][-1] == "data: [DONE]"
    assert '"completion_tokens":480' in got["events"][-2]
    # uvicorn re-raises the signal once it has shut down, so the status says "terminated"
    assert s.proc.wait(30) in (0, -signal.SIGTERM)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{s.url}/health", timeout=2)
    assert "Traceback" not in s.log.read_text()


def test_sigterm_ends_open_requests_cleanly_when_the_drain_time_runs_out(start_server):
    """When --graceful-shutdown-timeout runs out, a stream still running ends with an error
    event (503 shutting_down) and `data: [DONE]`, and a non-streaming request gets a 503
    OpenAI error body: nothing is cut mid-chunk."""
    s = start_server("--graceful-shutdown-timeout", "0.5")
    body = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True, "stream": True, "n": 8}
    t, got = stream_in_thread(s.url, body)
    plain: dict = {}

    def non_streaming():
        plain["r"] = httpx.post(f"{s.url}/v1/completions", timeout=60, json={
            **body, "stream": False, "n": 1})
    t2 = threading.Thread(target=non_streaming, daemon=True)
    t2.start()
    wait_events(got, 2)
    time.sleep(0.2)                               # the non-streaming one is in the engine
    start = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(20) in (0, -signal.SIGTERM)
    assert time.monotonic() - start < 10
    t.join(10)
    t2.join(10)
    assert got["error"] is None, got["error"]
    assert got["events"][-1] == "data: [DONE]"
    err = json.loads(got["events"][-2].removeprefix("data: "))["error"]
    assert err["code"] == "shutting_down" and "graceful-shutdown-timeout" in err["message"]
    r = plain["r"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
