"""The one place where exceptions become OpenAI error bodies:

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

`to_api_error(exc)` maps every exception the server can meet to an APIError (status, type,
message, param, code, headers); the route class, the exception handlers, the middlewares
and the SSE streams all go through it. Anything not recognised is a 500 whose body says
only "internal server error": the traceback goes to the log, never to the client.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from tpaserve.api.json_depth import check_depth
from tpaserve.api.protocol import ErrorResponse
from tpaserve.exceptions import (
    ChatTemplateError,
    EngineDeadError,
    QueueFull,
    RequestRejected,
    SamplingParamsError,
    ServerShuttingDown,
)

logger = logging.getLogger("tpaserve.api")

# OpenAI's error types by status; clients (the openai package) pick their exception class
# by status, people read the type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_disconnected",
    500: "internal_server_error",
    503: "service_unavailable_error",
}
QUEUE_FULL_RETRY_AFTER_S = 1

# What each status means on this server, for the OpenAPI document.
_STATUS_DOC = {
    400: "Invalid request: bad JSON, a wrong type, a value out of range, or a request that "
         "can never fit the context or the cache. `param` names the field.",
    401: "Missing or wrong API key (only when the server was started with --api-key).",
    404: "Unknown model.",
    413: "Request body larger than --max-request-body-bytes.",
    500: "The engine step that was serving this request failed (other requests go on).",
    503: "Queue full (code queue_full, with Retry-After), or the engine is not running "
         "(engine_not_ready, engine_dead).",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route: the OpenAI error body under each status, and under
    4XX for the rest (405...). Declaring 4XX also keeps FastAPI from documenting a 422,
    which this server never sends (validation errors are 400s)."""
    out: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorResponse, "description": _STATUS_DOC[s]} for s in statuses}
    if 503 in out:
        out[503]["headers"] = {"Retry-After": {
            "description": "seconds to wait before retrying (queue_full only)",
            "schema": {"type": "integer"}}}
    out["4XX"] = {"model": ErrorResponse, "description": "Any other client error."}
    return out


class APIError(Exception):
    """An error with its HTTP status, ready to be rendered."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> Response:
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


class ClientGone(Exception):
    """The client disconnected before its response was ready; its request was aborted."""


def to_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (SamplingParamsError, RequestRejected)):
        return bad_request(str(exc), exc.param)
    if isinstance(exc, ChatTemplateError):
        return bad_request(str(exc), "messages")
    if isinstance(exc, QueueFull):
        return APIError(503, str(exc), code="queue_full",
                        headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)})
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_dead")
    if isinstance(exc, ServerShuttingDown):
        return APIError(503, str(exc), code="shutting_down")
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return APIError(exc.status_code, str(exc.detail), code=code.get(exc.status_code),
                        headers=dict(exc.headers or {}))
    if isinstance(exc, (ClientGone, ClientDisconnect)):
        return APIError(499, "the client disconnected")
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error")


def _validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's 422 becomes a 400 that names the field (OpenAI's `param`)."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".rstrip(": "))
    if not loc:
        if kind == "missing":
            return bad_request("the request body is missing; send a JSON object")
        return bad_request(f"the request body must be a JSON object: {err.get('msg')}")
    param = _loc_to_param(loc)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        msg = "is required"
    elif kind == "extra_forbidden":
        msg = "is not a known field"
    return bad_request(f"{param}: {msg}", param)


# pydantic puts the union member it tried into the location: ("stop", "list[str]"),
# ("messages", 0, "content", "str"). Not part of the field's name.
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "none"})


def _loc_to_param(loc: list) -> str:
    """("messages", 0, "content") -> "messages[0].content"."""
    out = ""
    for p in loc:
        if isinstance(p, str) and out and (p in _UNION_MEMBERS or "[" in p):
            continue
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class OpenAIRoute(APIRoute):
    """Route class whose handler turns every exception (validation included) into an OpenAI
    error response, so nothing reaches Starlette's traceback-logging 500 path."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                if request.method in _BODY_METHODS and await request.body():
                    try:
                        value = await request.json()      # cached: FastAPI parses it no more
                    except (ValueError, RecursionError):
                        pass                              # FastAPI's parse says why: a 400
                    else:
                        check_depth(value)                # before anything recurses into it
                return await handler(request)
            except Exception as exc:                 # noqa: BLE001 - rendered, 500s logged
                return to_api_error(exc).response()

        return handle


def install(app: FastAPI) -> None:
    """Handlers for what is raised outside a route (unknown path, wrong method, and the
    last-resort catch-all)."""

    async def handle(request: Request, exc: Exception) -> Response:
        return to_api_error(exc).response()

    app.add_exception_handler(StarletteHTTPException, handle)
    app.add_exception_handler(RequestValidationError, handle)
    app.add_exception_handler(Exception, handle)


def sse_error(exc: BaseException) -> str:
    """The SSE event for an error after the stream has started (then `data: [DONE]`)."""
    return f"data: {json.dumps(to_api_error(exc).body())}\n\n"
