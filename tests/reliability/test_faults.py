"""Faults, injected through the launcher's test-only hooks (fault_launcher.py): a step that
raises, an engine that cannot go on, and shutdown by signal.

  * a failed step fails exactly the requests in it: a 500 OpenAI error body, or, once a
    stream has started, an error event then [DONE]; the requests that were waiting go on
    and return the reference output; the server stays healthy;
  * after 3 failed steps in a row the engine is dead: every client in flight or waiting
    gets an error (500 for those in a failed step, 503 engine_dead for the rest) instead of
    hanging, and the server exits with status 1 within seconds (a supervisor restarts it),
    its engine core process gone too (test_core_process.py kills the core itself);
  * SIGTERM drains: in-flight requests finish whole, new connections are refused, and the
    process exits 0; work that outlives --graceful-shutdown-timeout is cut at that bound;
  * a second signal during the drain exits at once.
"""
from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.reliability.common import core_pid, metric, metrics, process_alive, request
from tests.reliability.conftest import MODEL_NAME
from tests.reliability.fault_launcher import FAULT_MESSAGE

STEP_DELAY = 0.02
FLAGS = ("--max-num-seqs", "2", "--num-blocks", "64", "--no-enable-prefix-caching")

LONG = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 200, "temperature": 0,
        "ignore_eos": True}
SHORT = {"model": MODEL_NAME, "prompt": "the quick brown fox", "max_tokens": 6,
         "temperature": 0}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "cafe"}],
        "max_tokens": 6, "temperature": 0}
CMPL, CHAT_PATH = "/v1/completions", "/v1/chat/completions"


def fault_server(start_server, tmp_path, *flags: str, delay: float = STEP_DELAY):
    fault = tmp_path / "fault"
    s = start_server(*flags, env={"TPASERVE_FAULT_FILE": str(fault),
                                  "TPASERVE_STEP_DELAY": str(delay)})
    return s, fault


async def wait_for(url: str, name: str, value: float, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while metric(await asyncio.to_thread(metrics, url), name) != value:
        assert time.monotonic() < end, f"{name} never reached {value}"
        await asyncio.sleep(0.01)


def client(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=30,
                             limits=httpx.Limits(max_connections=32))


def test_a_failed_step_fails_its_requests_only(start_server, tmp_path, expect):
    s, fault = fault_server(start_server, tmp_path, *FLAGS)

    async def scenario():
        async with client(s) as h:
            streamed = asyncio.create_task(request(h, CMPL, dict(LONG, stream=True)))
            await wait_for(s.url, "tpaserve:num_requests_running", 1)
            whole = asyncio.create_task(request(h, CMPL, LONG))
            await wait_for(s.url, "tpaserve:num_requests_running", 2)
            waiting = [asyncio.create_task(request(h, CHAT_PATH, CHAT)),
                       asyncio.create_task(request(h, CMPL, dict(SHORT, stream=True)))]
            await wait_for(s.url, "tpaserve:num_requests_waiting", 2)
            fault.write_text("1")
            return await asyncio.wait_for(asyncio.gather(streamed, whole, *waiting), 30)

    streamed, whole, chat, short = asyncio.run(scenario())
    # the stream had started: 200, some text, then the error event and [DONE]
    assert streamed.status == 200 and streamed.done, streamed
    assert streamed.error["type"] == "internal_server_error"
    assert streamed.error["code"] == "engine_error" and FAULT_MESSAGE in streamed.error["message"]
    partial, ref = streamed.texts.get(0, ""), expect(LONG["prompt"], 40).text
    assert ref.startswith(partial) or partial.startswith(ref), (partial, ref)
    assert whole.status == 500 and whole.error["code"] == "engine_error", whole
    assert FAULT_MESSAGE in whole.error["message"]
    # the waiting requests were not in the failed step
    for r, prompt in ((chat, None), (short, SHORT["prompt"])):
        assert r.status == 200 and r.error is None, r
    assert short.texts == {0: expect(SHORT["prompt"], SHORT["max_tokens"]).text}
    assert short.done
    m = metrics(s.url)
    assert metric(m, "tpaserve:factor_cache_blocks_used") == 0
    assert metric(m, "tpaserve:request_success_total", finished_reason="error") == 2
    assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200
    with s.http() as h:
        r = h.post(CMPL, json=SHORT)
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == expect(SHORT["prompt"], 6).text


def test_a_dead_engine_answers_everyone_and_health_turns_503(start_server, tmp_path):
    s, fault = fault_server(start_server, tmp_path, *FLAGS)

    async def scenario():
        async with client(s) as h:
            running = [asyncio.create_task(request(h, CMPL, dict(LONG, stream=True)))]
            await wait_for(s.url, "tpaserve:num_requests_running", 1)
            running.append(asyncio.create_task(request(h, CMPL, LONG)))
            await wait_for(s.url, "tpaserve:num_requests_running", 2)
            bodies = [(CMPL, LONG), (CHAT_PATH, dict(CHAT, stream=True)), (CMPL, SHORT),
                      (CHAT_PATH, CHAT), (CMPL, dict(SHORT, stream=True, n=2))]
            waiting = [asyncio.create_task(request(h, p, b)) for p, b in bodies]
            await wait_for(s.url, "tpaserve:num_requests_waiting", 6)    # n=2 counts twice
            fault.write_text("99")
            start = time.monotonic()
            out = await asyncio.wait_for(asyncio.gather(*running, *waiting), 30)
            return out, time.monotonic() - start

    (streamed, whole, *rest), seconds = asyncio.run(scenario())
    assert seconds < 10, f"clients waited {seconds:.1f} s for their errors"
    assert streamed.status == 200 and streamed.done and streamed.error is not None
    assert whole.status == 500 and whole.error["code"] == "engine_error"
    # in a later failed step (500) or waiting when the engine died (503); never a hang
    for r in rest:
        assert (r.status, r.error["code"]) in {(500, "engine_error"), (503, "engine_dead")}, r
    assert any(r.status == 503 for r in rest)
    assert any(FAULT_MESSAGE in r.error["message"] for r in rest if r.status == 503)
    # the server exits non-zero for its supervisor, and takes nothing with it
    assert s.proc.wait(timeout=15) == 1
    assert not process_alive(core_pid(s))
    log = s.log.read_text()
    assert "the engine has stopped" in log and FAULT_MESSAGE in log


def test_sigterm_drains_in_flight_requests(start_server, tmp_path, expect):
    s, _ = fault_server(start_server, tmp_path, "--max-num-seqs", "4",
                        "--graceful-shutdown-timeout", "20")
    bodies = [(CMPL, dict(SHORT, max_tokens=40, stream=True)), (CMPL, dict(SHORT, max_tokens=40)),
              (CHAT_PATH, dict(CHAT, max_tokens=30, stream=True))]

    async def scenario():
        async with client(s) as h:
            tasks = [asyncio.create_task(request(h, p, b)) for p, b in bodies]
            await wait_for(s.url, "tpaserve:num_requests_running", 3)
            s.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            await asyncio.sleep(0.3)
            with pytest.raises(httpx.ConnectError):   # no new connections while draining
                await asyncio.to_thread(httpx.get, f"{s.url}/health", timeout=2)
            return await asyncio.gather(*tasks), start

    results, start = asyncio.run(scenario())
    for r, (_, body) in zip(results, bodies):
        assert r.status == 200 and r.error is None, r
        assert r.finish[0] in ("length", "stop")
        if "prompt" in body:
            assert r.texts[0] == expect(body["prompt"], body["max_tokens"]).text
    assert results[0].done and results[2].done
    # uvicorn re-raises the SIGTERM once drained, so the status is the signal's (as a
    # process manager expects) or 0
    assert s.proc.wait(timeout=15) in (0, -signal.SIGTERM)
    assert time.monotonic() - start < 10


def test_sigterm_cuts_work_longer_than_the_graceful_timeout(start_server, tmp_path):
    s, _ = fault_server(start_server, tmp_path, *FLAGS, "--graceful-shutdown-timeout", "1")

    async def scenario():
        async with client(s) as h:
            task = asyncio.create_task(request(h, CMPL, dict(LONG, max_tokens=450, stream=True)))
            await wait_for(s.url, "tpaserve:num_requests_running", 1)
            s.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            await asyncio.gather(task, return_exceptions=True)    # cut: its error is moot
            return start

    start = asyncio.run(scenario())
    s.proc.wait(timeout=20)
    # 450 steps x 20 ms would be 9 s; the bound is the timeout + the engine's stop (5 s)
    assert time.monotonic() - start < 1 + 5 + 1.5


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_exits_at_once(start_server, tmp_path, second):
    s, _ = fault_server(start_server, tmp_path, *FLAGS, "--graceful-shutdown-timeout", "30")

    async def scenario():
        async with client(s) as h:
            task = asyncio.create_task(request(h, CMPL, dict(LONG, max_tokens=450, stream=True)))
            await wait_for(s.url, "tpaserve:num_requests_running", 1)
            s.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert s.proc.poll() is None                  # draining the 9 s request
            s.proc.send_signal(second)
            start = time.monotonic()
            while s.proc.poll() is None and time.monotonic() - start < 3:
                await asyncio.sleep(0.05)
            seconds = time.monotonic() - start
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return seconds

    seconds = asyncio.run(scenario())
    assert s.proc.poll() is not None, f"still running {seconds:.1f} s after the second signal"
