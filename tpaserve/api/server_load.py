"""vLLM's GET /load: how many generation requests this API process is serving now.

Counted by an ASGI middleware from the moment the request reaches the app until its
response is sent in full (a stream until its last event), as vLLM's load tracking counts
them. With --api-server-count N, each process counts its own (vLLM's API servers do too).
"""
from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


class ServerLoadMiddleware:
    def __init__(self, app: ASGIApp, state):
        self.app, self.state = app, state
        state.server_load = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        self.state.server_load += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.server_load -= 1
