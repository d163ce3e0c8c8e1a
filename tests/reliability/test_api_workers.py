"""--api-server-count 2: two API processes on one port in front of one engine core, through
real servers and real signals. Every request is answered with the reference output whichever
process took it; /metrics (from either) counts all of them once; and the failure semantics of
one process hold for the set: the core killed -> every request gets its error and the server
exits 1; an API process killed -> the server stops and exits 1; the main process killed ->
nothing is left behind; SIGTERM drains everything and exits 0.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx

from tests.reliability.common import core_pid, metric, metrics, process_alive, request
from tests.reliability.conftest import MODEL_NAME

FLAGS = ("--api-server-count", "2", "--max-num-seqs", "8", "--num-blocks", "128")
SLOW = {"TPASERVE_STEP_DELAY": "0.02"}
SHORT = {"model": MODEL_NAME, "prompt": "the quick brown fox", "max_tokens": 12,
         "temperature": 0}
LONG = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 300, "temperature": 0,
        "ignore_eos": True}


def api_pids(server) -> list[int]:
    m = re.search(r"2 API processes: (\d+), (\d+)", server.log.read_text())
    assert m, server.log.read_text()[-2000:]
    return [int(m[1]), int(m[2])]


def wait_gone(pids: list[int], timeout: float) -> None:
    end = time.monotonic() + timeout
    while any(process_alive(p) for p in pids):
        assert time.monotonic() < end, [p for p in pids if process_alive(p)]
        time.sleep(0.05)


def client(server) -> httpx.AsyncClient:
    # a fresh connection per request, so the two processes both take some
    return httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=30,
                             limits=httpx.Limits(max_keepalive_connections=0))


def test_two_api_processes_serve_one_engine(start_server, expect):
    s = start_server(*FLAGS)
    want = expect(SHORT["prompt"], SHORT["max_tokens"])
    before = metrics(s.url)

    async def load(n: int):
        async with client(s) as h:
            return await asyncio.gather(*(request(h, "/v1/completions",
                                                  dict(SHORT, stream=i % 2 == 0))
                                          for i in range(n)))

    # the kernel hands each connection to either process: send waves until both served
    served, waves = set(), 0
    while len(served) < 2 and waves < 5:
        for r in asyncio.run(load(24)):
            assert r.status == 200 and r.texts == {0: want.text}, r
        waves += 1
        served = {i for i in (0, 1) for line in s.log.read_text().splitlines()
                  if f"[api {i}]" in line and "POST /v1/completions" in line}
    assert served == {0, 1}
    after = metrics(s.url)
    def d(name: str, **labels: str) -> float:
        def at(m):
            try:
                return metric(m, name, **labels)
            except KeyError:
                return 0.0
        return at(after) - at(before)
    n = 24 * waves
    assert d("tpaserve:http_requests_total", route="/v1/completions", status="200") == n
    assert d("tpaserve:generation_tokens_total") == n * want.num_tokens
    assert d("tpaserve:request_success_total", finished_reason="length") == n
    # gauges are not summed over the processes: one engine, one cache
    assert metric(after, "tpaserve:factor_cache_blocks_total") == 128
    assert metric(after, "tpaserve:factor_cache_blocks_used") == 0


def test_killing_the_core_fails_everything_and_the_server_exits(start_server):
    s = start_server(*FLAGS, env=SLOW)
    pids = api_pids(s)

    async def scenario():
        async with client(s) as h:
            tasks = [asyncio.create_task(request(h, "/v1/completions",
                                                 dict(LONG, stream=i % 2 == 0)))
                     for i in range(6)]
            end = time.monotonic() + 20
            while metric(await asyncio.to_thread(metrics, s.url),
                         "tpaserve:num_requests_running") < 6:
                assert time.monotonic() < end
                await asyncio.sleep(0.02)
            os.kill(core_pid(s), signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*tasks), 20)

    for r in asyncio.run(scenario()):
        assert r.error is not None and r.error["code"] == "engine_dead", r
    assert s.proc.wait(timeout=20) == 1
    wait_gone(pids, 10)


def test_killing_an_api_process_stops_the_server(start_server):
    s = start_server(*FLAGS)
    pids, core = api_pids(s), core_pid(s)
    os.kill(pids[1], signal.SIGKILL)
    assert s.proc.wait(timeout=30) == 1
    wait_gone([pids[0], core], 10)
    assert "ended unexpectedly" in s.log.read_text()


def test_killing_the_main_process_leaves_nothing_behind(start_server):
    s = start_server(*FLAGS)
    pids, core = api_pids(s), core_pid(s)
    with open(f"/proc/{pids[0]}/environ", "rb") as f:
        env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    metrics_dir = env[b"PROMETHEUS_MULTIPROC_DIR"].decode()
    assert os.path.isdir(metrics_dir)
    s.proc.kill()
    s.proc.wait(timeout=10)
    wait_gone([*pids, core], 10)
    assert not os.path.exists(metrics_dir)          # the API processes removed it


def test_sigterm_drains_every_process(start_server, expect):
    s = start_server(*FLAGS, "--graceful-shutdown-timeout", "20", env=SLOW)
    drain_under_load(s, expect, 4, lambda: s.proc.send_signal(signal.SIGTERM))

def test_refusals_reach_the_process_that_sent_the_request(start_server):
    """The core refuses with 503 queue_full: the refusal must go back to whichever API
    process sent the request, not to process 0 (a request would hang there)."""
    s = start_server("--api-server-count", "2", "--max-num-seqs", "1",
                     "--max-queued-requests", "1", env=SLOW)

    async def load():
        async with client(s) as h:
            return await asyncio.wait_for(asyncio.gather(*(
                request(h, "/v1/completions", dict(SHORT, max_tokens=40, stream=i % 2 == 0))
                for i in range(12))), 60)

    results = asyncio.run(load())
    assert {r.status for r in results} <= {200, 503}, results
    assert any(r.status == 503 for r in results) and any(r.status == 200 for r in results)
    for r in results:
        if r.status == 503:
            assert r.error["code"] == "queue_full", r


def test_ctrl_c_to_the_process_group_drains_every_process(start_server, expect):
    """Ctrl-C reaches every process of the group: the API processes leave it to the main
    process, which asks each to drain once (a second signal would cut their streams)."""
    s = start_server(*FLAGS, "--graceful-shutdown-timeout", "20", env=SLOW)
    drain_under_load(s, expect, 6, lambda: os.killpg(os.getpgid(s.proc.pid), signal.SIGINT))


def drain_under_load(s, expect, n: int, stop) -> None:
    """n streams running, then stop() (a signal): each finishes whole with the reference
    text, the server exits 0, and none of its processes is left."""
    pids, core = api_pids(s), core_pid(s)
    body = dict(SHORT, max_tokens=60)
    want = expect(body["prompt"], body["max_tokens"])

    async def scenario():
        async with client(s) as h:
            tasks = [asyncio.create_task(request(h, "/v1/completions", dict(body, stream=True)))
                     for _ in range(n)]
            end = time.monotonic() + 20
            while metric(await asyncio.to_thread(metrics, s.url),
                         "tpaserve:num_requests_running") < n:
                assert time.monotonic() < end
                await asyncio.sleep(0.02)
            stop()
            return await asyncio.gather(*tasks)

    for r in asyncio.run(scenario()):
        assert r.status == 200 and r.done and r.error is None, r
        assert r.texts == {0: want.text}
    assert s.proc.wait(timeout=30) == 0
    wait_gone([*pids, core], 10)
