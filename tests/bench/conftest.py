"""A stub OpenAI-compatible server for testing the load generator itself (not a model).

It streams `max_tokens` fixed tokens: the first after `first_delay` s, the rest `gap` s
apart, then (optionally) a usage chunk and `data: [DONE]`. The chat endpoint first sends a
role-only chunk at once, which a client must not count as the first token. Every
`fail_every`-th request gets a 503. /metrics exposes the requests in flight as
tpaserve:num_requests_running, and `num_blocks` as tpaserve:factor_cache_blocks_total.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


@dataclass
class StubState:
    first_delay: float = 0.05
    gap: float = 0.01
    usage: bool = True
    fail_every: int = 0
    num_blocks: int = 40
    in_flight: int = 0
    max_in_flight: int = 0
    bodies: list = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()


def stub_app(state: StubState) -> FastAPI:
    app = FastAPI()

    def chunk(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    async def stream(body: dict, chat: bool):
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            n = body["max_tokens"]
            if chat:
                yield chunk({"choices": [{"index": 0, "delta": {"role": "assistant",
                                                                "content": ""}}]})
            await asyncio.sleep(state.first_delay)
            for i in range(n):
                if i:
                    await asyncio.sleep(state.gap)
                text = f"t{i} "
                choice = ({"index": 0, "delta": {"content": text}} if chat
                          else {"index": 0, "text": text})
                choice["finish_reason"] = "length" if i == n - 1 else None
                yield chunk({"choices": [choice]})
            if state.usage and body.get("stream_options", {}).get("include_usage"):
                yield chunk({"choices": [], "usage": {"prompt_tokens": 7,
                                                      "completion_tokens": n}})
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    async def handle(request: Request, chat: bool):
        body = await request.json()
        state.bodies.append(body)
        if state.fail_every and len(state.bodies) % state.fail_every == 0:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        return StreamingResponse(stream(body, chat), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub", "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            "# TYPE tpaserve:num_requests_running gauge\n"
            f'tpaserve:num_requests_running{{model_name="stub"}} {float(state.in_flight)}\n'
            "# TYPE tpaserve:factor_cache_blocks_total gauge\n"
            f'tpaserve:factor_cache_blocks_total{{model_name="stub"}} {float(state.num_blocks)}\n')

    return app


@dataclass
class Stub:
    url: str
    state: StubState


@pytest.fixture(scope="session")
def _stub_server():
    state = StubState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(stub_app(state), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "stub server did not start"
        time.sleep(0.01)
    yield Stub(f"http://127.0.0.1:{sock.getsockname()[1]}", state)
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def stub(_stub_server: Stub) -> Stub:
    _stub_server.state.reset()
    return _stub_server
