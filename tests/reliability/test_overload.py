"""Overload: past --max-queued-requests a request is refused at once with 503 + Retry-After
(in milliseconds, while the admitted requests are still running), and the admitted ones
finish with the reference output. A request that could never fit the cache is refused at
admission with a 400, even while the queue is full.

The server runs one sequence at a time (--max-num-seqs 1) with slowed steps (the launcher's
TPASERVE_STEP_DELAY), so the moment the queue is full lasts seconds, not microseconds.
"""
from __future__ import annotations

import asyncio
import time

import httpx

from tests.reliability.common import metric, metrics, request
from tests.reliability.conftest import MODEL_NAME

QUEUE = 2
SERVER_FLAGS = ("--max-num-seqs", "1", "--max-queued-requests", str(QUEUE),
                "--num-blocks", "16", "--block-size", "16", "--no-enable-prefix-caching")
SERVER_ENV = {"TPASERVE_STEP_DELAY": "0.02"}
REFUSED_WITHIN_S = 1.0        # typically ~10 ms; generous for a loaded 2-core runner

LONG = {"model": MODEL_NAME, "prompt": "tensor product attention", "max_tokens": 150,
        "temperature": 0, "stream": True}
SHORT = {"model": MODEL_NAME, "prompt": "the quick brown fox", "max_tokens": 5,
         "temperature": 0}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def wait_for(url: str, name: str, value: float, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while metric(await asyncio.to_thread(metrics, url), name) != value:
        assert time.monotonic() < end, f"{name} never reached {value}"
        await asyncio.sleep(0.02)


async def scenario(server, expect) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=60,
                                 limits=httpx.Limits(max_connections=32)) as h:
        a = asyncio.create_task(request(h, "/v1/completions", LONG))
        await wait_for(server.url, "tpaserve:num_requests_running", 1)
        queued = [asyncio.create_task(request(h, "/v1/completions", SHORT)) for _ in range(QUEUE)]
        await wait_for(server.url, "tpaserve:num_requests_waiting", QUEUE)

        extra = [("/v1/completions", SHORT), ("/v1/completions", dict(SHORT, stream=True)),
                 ("/v1/chat/completions", CHAT), ("/v1/chat/completions", dict(CHAT, stream=True)),
                 ("/v1/completions", dict(SHORT, n=2))] * 2
        refused = await asyncio.gather(*(request(h, path, body) for path, body in extra))
        # a request that can never fit: 12 ids + 250 new tokens > 16 blocks x 16 tokens
        never = await request(h, "/v1/completions", dict(SHORT, prompt=[5] * 12, max_tokens=250))
        # more sequences than the queue could ever hold: a 400, not a retryable 503
        too_many = await request(h, "/v1/completions", dict(SHORT, n=QUEUE + 1))
        assert not a.done(), "the running request ended before the refusals were checked"

        for r in refused:
            assert r.status == 503 and r.error["code"] == "queue_full", r
            assert r.error["type"] == "service_unavailable_error"
            assert int(r.headers["retry-after"]) >= 1
            assert r.seconds < REFUSED_WITHIN_S, r.seconds
        assert never.status == 400 and never.error["param"] == "max_tokens", never
        assert "could never run" in never.error["message"]
        assert too_many.status == 400 and too_many.error["param"] == "n", too_many
        assert "--max-queued-requests" in too_many.error["message"]

        done = await asyncio.gather(a, *queued)
        for r, body in zip(done, [LONG] + [SHORT] * QUEUE):
            want = expect(body["prompt"], body["max_tokens"])
            assert r.status == 200 and r.texts == {0: want.text}, r
            assert r.finish == {0: want.finish_reason}
        assert done[0].done


def test_queue_full_is_503_at_once_while_admitted_requests_finish(module_server, expect):
    asyncio.run(scenario(module_server, expect))
    m = metrics(module_server.url)
    assert metric(m, "tpaserve:factor_cache_blocks_used") == 0
    assert metric(m, "tpaserve:num_requests_waiting") == 0
    with module_server.http() as h:        # the queue has room again
        assert h.post("/v1/completions", json=SHORT).status_code == 200


def test_requests_that_can_never_fit_are_400_at_admission(module_server):
    with module_server.http() as h:
        for body in (dict(SHORT, prompt=[5] * 200, max_tokens=100),     # > the cache
                     dict(SHORT, prompt=[5] * 600),                     # > the context
                     dict(CHAT, max_tokens=400)):                       # > the cache
            start = time.monotonic()
            r = h.post("/v1/chat/completions" if "messages" in body else "/v1/completions",
                       json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] in ("max_tokens", "prompt")
            assert time.monotonic() - start < REFUSED_WITHIN_S
