"""The FastAPI app: `build_app(llm, ...)` over an AsyncLLM whose engine core process is
ready (AsyncLLM.wait_ready).

Request path, outside in: HTTP metrics (every response, by route template and status) ->
API-key check (everything but /health, /metrics, /version, /dashboard) -> body-size limit ->
FastAPI routing -> endpoint (OpenAIRoute renders every error). The AsyncLLM connects to its core
in the lifespan (it needs the running event loop) and stops the core after uvicorn has
drained the in-flight requests, it disconnects; the AsyncLLM's owner (the CLI) stops the
core after that. If the core dies, `app.state.on_engine_dead` (set by the CLI's server) is
called: the server exits non-zero for its supervisor to restart it.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tpaserve
from tpaserve.api import chat, completions, dashboard, misc, tokenize
from tpaserve.api.engine_client import EngineClient
from tpaserve.api.errors import APIError, install
from tpaserve.args import ServerArgs
from tpaserve.frontend.async_llm import AsyncLLM
from tpaserve.frontend.metrics import HTTP_REQUESTS, EngineMetrics

logger = logging.getLogger("tpaserve.api")

# the status page is open like /metrics, whose numbers it shows (a 404 if disabled)
OPEN_PATHS = frozenset({"/health", "/metrics", "/version"}) | dashboard.PATHS


def build_app(llm: AsyncLLM, model_names: list[str] | str = "t6",
              args: ServerArgs | None = None) -> FastAPI:
    """The app over `llm`; `args`: the server's limits, key and pages (ServerArgs' defaults
    if None; host, port and the process flags are not read here)."""
    args = args or ServerArgs()
    names = [model_names] if isinstance(model_names, str) else list(model_names)
    if not names:
        raise ValueError("model_names must name at least one model")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = EngineMetrics(llm.info, names[0])
        llm.metrics = metrics
        if not hasattr(app.state, "dead_hooked"):
            app.state.dead_hooked = True
            llm.on_dead(lambda exc: getattr(app.state, "on_engine_dead", lambda e: None)(exc))
        await llm.start()
        app.state.client.metrics = metrics
        try:
            yield
        finally:
            await llm.disconnect()        # its owner (the CLI) stops the core

    app = FastAPI(title="tpaserve", version=tpaserve.__version__, lifespan=lifespan)
    app.state.client = EngineClient(                  # 503s until the lifespan
        llm, names, max_prompt_chars=args.max_prompt_chars,
        max_request_sequences=args.max_request_sequences)
    routers = [completions.router, chat.router, misc.router, tokenize.router]
    if not args.disable_dashboard:
        routers.append(dashboard.router)
    for router in routers:
        app.include_router(router)
    install(app)
    # add_middleware puts each one outside the previous: the key is checked first, so an
    # unauthenticated client cannot make the server buffer a body
    app.add_middleware(BodyLimitMiddleware, max_bytes=args.max_request_body_bytes,
                       timeout=args.request_body_timeout)
    if args.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=args.api_key)
        _document_bearer_auth(app)
    # outermost: 401s and 413s are counted too
    app.add_middleware(HTTPMetricsMiddleware, model_name=names[0],
                       routes=[route for router in routers for route in router.routes])
    return app


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare the API key in the OpenAPI document (a bearer scheme on every operation but
    OPEN_PATHS): the check itself is APIKeyMiddleware, which runs before routing."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer",
                "description": "the server's --api-key (or TPASERVE_API_KEY)"}
            for path, operations in schema["paths"].items():
                if path not in OPEN_PATHS:
                    for op in operations.values():
                        op["security"] = [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi


# Every label value comes from a closed set, so no client can grow /metrics: methods outside
# these are counted as "other", paths by route template, statuses are the server's own.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class HTTPMetricsMiddleware:
    """Counts every response in tpaserve:http_requests_total by method, route template
    and status. The template, not the raw path, keeps the series bounded: a scan of random
    paths is one 'unmatched' series. The endpoints' routes are matched here, not read from
    the scope after routing, because the 401 and 413 middlewares answer before routing.
    Counted when the response starts, before the client can see it; a request whose client
    left before any response is not counted here (the engine counts it as an abort)."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], model_name: str):
        self.app, self.routes, self.model_name = app, routes, model_name

    def _route(self, scope: Scope) -> str:
        partial = None
        for route in self.routes:
            match, _ = route.matches(scope)
            if match is Match.FULL:
                return route.path
            if match is Match.PARTIAL and partial is None:     # wrong method: a 405
                partial = route.path
        return partial or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        # the method is the client's text too (h11 takes any token): a closed set
        method = scope["method"] if scope["method"] in HTTP_METHODS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                HTTP_REQUESTS.labels(model_name=self.model_name, method=method,
                                     route=route, status=str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every path but OPEN_PATHS; compared in constant
    time."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                     self.key):
                err = APIError(401, "missing or invalid API key: send the header "
                                    "'Authorization: Bearer <key>'", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, counted while it is read (a client may send no
    Content-Length, or a false one); 408 and a closed connection for a body that sends
    nothing for `timeout` seconds (a stalled upload would hold its connection and buffer
    forever). The body is read whole here, then replayed to the app; later receive() calls
    go to the server, so disconnects are still seen.

    Not Starlette's RequestBodyLimitMiddleware: when Content-Length is over the limit it
    replaces the error response with a plain-text one, and every error here must be an
    OpenAI error body."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                err = APIError(408, f"the request body stopped arriving: nothing for "
                                    f"{self.timeout:g} s (--request-body-timeout)",
                               code="request_timeout", headers={"Connection": "close"})
                await err.response()(scope, receive, send)
                return
            if message["type"] != "http.request":      # disconnected while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        err = APIError(413, f"the request body is larger than this server's limit of "
                            f"{self.max_bytes} bytes (--max-request-body-bytes)",
                       code="request_too_large", headers={"Connection": "close"})
        await err.response()(scope, receive, send)
