"""An HTTP request as the ingress hands it to a replica, and the replica's side: its whole
tpaserve app (api/server.build_app) served from it, in-process, as an ASGI call.

The ingress reads the body once (it needs the prompt to route) and sends plain values; the
replica yields the response back as it is made: first a ResponseHead, then the body's
chunks (bytes), so SSE streams through unchanged.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message

PROMPT_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


@dataclass(frozen=True)
class ForwardedRequest:
    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    routing_key: str | None = None        # what PrefixAffinityRouter hashes


@dataclass(frozen=True)
class ResponseHead:
    status: int
    headers: list[tuple[bytes, bytes]]


def routing_key(path: str, body: bytes, chars: int) -> str | None:
    """The first `chars` characters of the request's prompt: a completion's prompt (its
    first one if a list; token ids as text), a chat's messages as `role: content` lines.
    None for other paths and for a body that is not a JSON object (the replica answers
    those with their error)."""
    if path not in PROMPT_PATHS or not body:
        return None
    try:
        req = json.loads(body)
    except ValueError:
        return None
    if not isinstance(req, dict):
        return None
    if path == "/v1/chat/completions":
        messages = req.get("messages")
        if not isinstance(messages, list):
            return None
        text = "\n".join(f"{m.get('role')}: {_content_text(m.get('content'))}"
                         for m in messages if isinstance(m, dict))
    else:
        prompt = req.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]                         # a batch: its first prompt
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text[:chars] or None


def _content_text(content) -> str:
    if isinstance(content, list):                      # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


async def serve_asgi(app: ASGIApp, req: ForwardedRequest) -> AsyncIterator[ResponseHead | bytes]:
    """Call `app` with `req`; yield the response's head, then its body chunks. Closing the
    iterator early (the client went away) cancels the app's call, which aborts the request
    in the engine."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode(),
        "query_string": req.query_string, "root_path": "", "headers": req.headers,
        "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80), "state": {},
    }
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    body_sent = False

    async def receive() -> Message:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await asyncio.Event().wait()          # no disconnect until we are cancelled
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        messages.put_nowait(message)

    call = asyncio.create_task(app(scope, receive, send))
    call.add_done_callback(lambda _: messages.put_nowait(None))
    finished = False
    try:
        while True:
            message = await messages.get()
            if message is None:                       # the app returned (or raised)
                call.result()
                raise RuntimeError("the app returned without finishing its response")
            if message["type"] == "http.response.start":
                yield ResponseHead(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    finished = True
                    break
        await call
    finally:
        if not finished:
            call.cancel()
