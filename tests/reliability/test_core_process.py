"""The engine core runs in its own process; what happens when either process goes, through
real servers and real signals:

  * the core killed (SIGKILL): every request in flight or waiting gets an OpenAI error at
    once (503 engine_dead; a stream that had started: an error event, then [DONE]), /health
    turns 503 within a second and stays so, and the server exits with status 1 within
    seconds;
  * the API process killed (SIGKILL): the core notices and exits too (no orphan);
  * SIGTERM to the server drains both: requests in flight finish whole, then the API stops
    the core and both are gone;
  * Ctrl-C (SIGINT to the whole process group, core included) drains the same way: the core
    ignores the signal and waits for the API to stop it.
"""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx

from tests.reliability.common import core_pid, metric, metrics, process_alive, request
from tests.reliability.conftest import MODEL_NAME

FLAGS = ("--max-num-seqs", "2", "--num-blocks", "64", "--no-enable-prefix-caching")
SLOW = {"TPASERVE_STEP_DELAY": "0.02"}
LONG = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 300, "temperature": 0,
        "ignore_eos": True}
SHORT = {"model": MODEL_NAME, "prompt": "the quick brown fox", "max_tokens": 30,
         "temperature": 0}
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


def client(server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=30,
                             limits=httpx.Limits(max_connections=32))


async def wait_for(url: str, name: str, value: float, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while metric(await asyncio.to_thread(metrics, url), name) != value:
        assert time.monotonic() < end, f"{name} never reached {value}"
        await asyncio.sleep(0.01)


def wait_gone(pid: int, timeout: float) -> float:
    start = time.monotonic()
    while process_alive(pid):
        assert time.monotonic() - start < timeout, f"process {pid} still alive"
        time.sleep(0.05)
    return time.monotonic() - start


async def poll_health(url: str, statuses: list, stop: asyncio.Event) -> None:
    """(monotonic time, status) of /health on fresh connections until the server stops
    listening."""
    async with httpx.AsyncClient(timeout=2) as h:
        while not stop.is_set():
            try:
                r = await h.get(f"{url}/health")
            except httpx.TransportError:
                return
            statuses.append((time.monotonic(), r.status_code))
            await asyncio.sleep(0.005)


def test_a_killed_core_fails_every_request_and_the_server_exits(start_server):
    s = start_server(*FLAGS, env=SLOW)
    pid = core_pid(s)

    async def scenario():
        async with client(s) as h:
            running = [asyncio.create_task(request(h, CMPL, dict(LONG, stream=True))),
                       asyncio.create_task(request(h, CMPL, LONG))]
            await wait_for(s.url, "tpaserve:num_requests_running", 2)
            waiting = [asyncio.create_task(request(h, CHAT, {
                "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                "stream": True})), asyncio.create_task(request(h, CMPL, SHORT))]
            await wait_for(s.url, "tpaserve:num_requests_waiting", 2)
            before = (await h.get("/health")).status_code
            health, stop = [], asyncio.Event()
            poller = asyncio.create_task(poll_health(s.url, health, stop))
            await asyncio.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
            start = time.monotonic()
            results = await asyncio.wait_for(asyncio.gather(*running, *waiting), 20)
            seconds = time.monotonic() - start
            await asyncio.sleep(0.2)
            stop.set()
            await poller
            return before, results, seconds, health, start

    before, (streamed, whole, chat, short), seconds, health, killed = asyncio.run(scenario())
    assert before == 200
    assert seconds < 5, f"clients waited {seconds:.1f} s for their errors"
    assert streamed.status == 200 and streamed.done, streamed       # the stream had started
    assert streamed.error["code"] == "engine_dead" and "SIGKILL" in streamed.error["message"]
    for r in (whole, chat, short):
        assert r.status == 503 and r.error["code"] == "engine_dead", r
        assert r.error["type"] == "service_unavailable_error"
    # /health answered 200 before; the kernel takes a moment to tear a killed process down,
    # and once the server has seen it gone /health is 503 for good (or the server has
    # stopped listening: it is exiting), within a second
    assert any(code == 200 and t < killed for t, code in health), health
    assert not any(code == 200 and t > killed + 1.0 for t, code in health), health
    first_503 = next((t for t, code in health if code == 503), None)
    if first_503 is not None:
        assert all(code == 503 for t, code in health if t >= first_503), health
    exit_s = time.monotonic()
    assert s.proc.wait(timeout=15) == 1
    assert time.monotonic() - exit_s < 10
    log = s.log.read_text()
    assert "engine core process ended unexpectedly (killed by SIGKILL)" in log
    assert "Traceback" not in log


def test_a_killed_api_process_takes_its_core_with_it(start_server):
    s = start_server(*FLAGS)
    pid = core_pid(s)
    assert process_alive(pid)
    with s.http() as h:
        assert h.post(CMPL, json=SHORT).status_code == 200
    s.proc.kill()
    s.proc.wait(timeout=10)
    assert wait_gone(pid, timeout=10) < 10


def test_sigterm_drains_both_processes(start_server, expect):
    s = start_server(*FLAGS, "--graceful-shutdown-timeout", "20", env=SLOW)
    pid = core_pid(s)

    async def scenario():
        async with client(s) as h:
            tasks = [asyncio.create_task(request(h, CMPL, dict(SHORT, stream=True))),
                     asyncio.create_task(request(h, CMPL, SHORT))]
            await wait_for(s.url, "tpaserve:num_requests_running", 2)
            s.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    want = expect(SHORT["prompt"], SHORT["max_tokens"])
    for r in results:
        assert r.status == 200 and r.error is None and r.texts == {0: want.text}, r
    assert s.proc.wait(timeout=20) in (0, -signal.SIGTERM)
    assert wait_gone(pid, timeout=5) < 5
    assert "engine stopped" in s.log.read_text()


def test_ctrl_c_to_the_process_group_drains_both(start_server, expect):
    s = start_server(*FLAGS, "--graceful-shutdown-timeout", "20", env=SLOW)
    pid = core_pid(s)
    assert os.getpgid(pid) == os.getpgid(s.proc.pid) != os.getpgid(0)

    async def scenario():
        async with client(s) as h:
            task = asyncio.create_task(request(h, CMPL, dict(SHORT, stream=True)))
            await wait_for(s.url, "tpaserve:num_requests_running", 1)
            os.killpg(os.getpgid(s.proc.pid), signal.SIGINT)
            await asyncio.sleep(0.2)
            assert process_alive(pid)                   # the core ignores it and serves on
            return await task

    r = asyncio.run(scenario())
    assert r.status == 200 and r.error is None and r.done, r
    assert r.texts == {0: expect(SHORT["prompt"], SHORT["max_tokens"]).text}
    assert s.proc.wait(timeout=20) in (0, -signal.SIGINT, 130)
    assert wait_gone(pid, timeout=5) < 5
