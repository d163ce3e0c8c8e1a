"""A client that goes away aborts its request: its factor-cache blocks come back (read on
/metrics; the shared server runs with prefix caching off, so freed blocks are not kept
referenced) long before the generation would have ended, and the abort is counted."""
from __future__ import annotations

import time

import httpx

from tests.api.conftest import MAX_MODEL_LEN, MODEL_NAME

# 8 x 490 tokens: seconds of work if nobody stopped it
LONG = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": MAX_MODEL_LEN - 20,
        "temperature": 0, "ignore_eos": True, "n": 8}


def wait_for(pred, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        assert time.monotonic() - start < timeout, "not reached in time"
        time.sleep(0.02)
    return time.monotonic() - start


def used_blocks(server) -> float:
    return server.metric("tpaserve:factor_cache_blocks_used")


def aborted(server) -> float:
    return server.metric("tpaserve:request_success_total", finished_reason="abort")


def test_stream_disconnect_frees_blocks(server):
    assert used_blocks(server) == 0
    before = aborted(server)
    with server.http() as h:
        with h.stream("POST", "/v1/completions", json=dict(LONG, stream=True)) as r:
            events = (line for line in r.iter_lines() if line)
            for _ in range(3):
                assert next(events).startswith("data: ")
            assert used_blocks(server) > 0
            assert server.metric("tpaserve:num_requests_running") == 8
    # leaving the with-blocks closed the connection mid-stream
    wait_for(lambda: used_blocks(server) == 0, timeout=5)
    assert server.metric("tpaserve:num_requests_running") == 0
    wait_for(lambda: aborted(server) == before + 8, timeout=5)


def test_chat_stream_disconnect_frees_blocks(server):
    before = aborted(server)
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "n": 2,
            "max_tokens": MAX_MODEL_LEN - 40, "ignore_eos": True, "stream": True}
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        events = (line for line in r.iter_lines() if line)
        for _ in range(4):
            next(events)
        assert used_blocks(server) > 0
    wait_for(lambda: used_blocks(server) == 0, timeout=5)
    wait_for(lambda: aborted(server) == before + 2, timeout=5)     # n = 2 sequences


def test_non_stream_disconnect_frees_blocks(server):
    before = aborted(server)
    generated = server.metric("tpaserve:generation_tokens_total")
    start = time.monotonic()
    with server.http(timeout=httpx.Timeout(60, read=0.3)) as h:
        try:
            h.post("/v1/completions", json=LONG)
            raise AssertionError("the request finished before the client gave up")
        except httpx.ReadTimeout:
            pass
    wait_for(lambda: used_blocks(server) == 0, timeout=5)
    wait_for(lambda: aborted(server) == before + 8, timeout=5)
    # it was stopped, not run to the end
    assert server.metric("tpaserve:generation_tokens_total") - generated < \
        8 * LONG["max_tokens"]
    assert time.monotonic() - start < 10
