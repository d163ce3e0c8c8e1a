"""What the endpoints share: the served model, and running requests on the AsyncLLM with
the client's connection watched.

Every request goes through `EngineClient.generate`, which turns an engine failure
(`out.error`, a failed step) into a 500 APIError and, by closing the engine's stream,
aborts the request whenever its consumer stops early. The consumer stops early when the
client goes away: for streams, Starlette cancels the SSE body iterator on disconnect; before
a response has started (non-streaming requests, and the wait for a stream's first output),
`until_disconnect` races the work against the connection's `http.disconnect`.

No metric is recorded here: the core times its steps and the frontend its requests'
tokens (frontend/metrics.py).
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from tpaserve.api.errors import APIError, ClientGone, bad_request
from tpaserve.frontend.async_llm import AsyncLLM
from tpaserve.frontend.metrics import EngineMetrics
from tpaserve.frontend.outputs import RequestOutput
from tpaserve.sampling_params import SamplingParams

T = TypeVar("T")


# A text longer than this many characters per token of the context is refused before it
# is tokenized (--max-prompt-chars overrides): no tokenizer here averages more than a few
# characters a token, so such a prompt could only be refused for its length afterwards.
CHARS_PER_TOKEN_BOUND = 32
DEFAULT_MAX_REQUEST_SEQUENCES = 256


@dataclass
class EngineClient:
    llm: AsyncLLM
    model_names: list[str]        # responses carry the name asked for; the first by default
    metrics: EngineMetrics | None = None
    max_prompt_chars: int | None = None         # None: CHARS_PER_TOKEN_BOUND x context
    max_request_sequences: int = DEFAULT_MAX_REQUEST_SEQUENCES

    @property
    def raw_tokenizer(self):
        """The tokenizer, or None (token-id prompts only)."""
        return self.llm.tokenizer

    @property
    def tokenizer(self) -> CappedTokenizer:
        return self.tokenizer_for("prompt")

    def tokenizer_for(self, param: str) -> CappedTokenizer:
        """The tokenizer, refusing texts over the character cap (400 naming `param`)."""
        tok = self.llm.tokenizer
        if tok is None:
            raise APIError(400, "this server has no tokenizer: text prompts, chat and "
                                "tokenization are unavailable; send token ids")
        cap = self.max_prompt_chars or CHARS_PER_TOKEN_BOUND * self.max_model_len
        return CappedTokenizer(tok, cap, param)

    def check_sequences(self, count: int, param: str = "n") -> None:
        """One request's sequences (prompts x n): at most --max-request-sequences, and no
        more than the queue can ever hold."""
        if count > self.max_request_sequences:
            raise bad_request(f"the request asks for {count} sequences (prompts x n), over "
                              f"this server's limit of {self.max_request_sequences} "
                              f"(--max-request-sequences); split it", param)
        self.llm.check_sequences(count, param)

    @property
    def max_model_len(self) -> int:
        return self.llm.info.max_model_len

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.model_names:
            return self.model_names[0] if name is None else name
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{', '.join(repr(n) for n in self.model_names)}",
                       param="model", code="model_not_found")

    def check_ready(self, draining: bool = False) -> None:
        if draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.llm.dead is not None:
            raise APIError(503, str(self.llm.dead), code="engine_dead")
        if not self.llm.ready:
            raise APIError(503, "the engine is not ready yet", code="engine_not_ready")

    def check_token_ids(self, ids: list[int], param: str = "prompt") -> None:
        vocab = self.llm.info.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"{param}: token id {bad[0]} is outside the vocabulary "
                              f"[0, {vocab})", param)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """The engine's stream for one prompt. Admission errors raise at the first
        __anext__; closing this iterator early aborts the request."""
        self.check_ready()
        async with aclosing(self.llm.generate(request_id, prompt_ids, params,
                                              priority)) as stream:
            async for out in stream:
                if out.error is not None:
                    raise APIError(500, out.error.message, code="engine_error")
                yield out


class CappedTokenizer:
    """A tokenizer whose encode() refuses a text over `max_chars` before any work. Call it
    through `off_loop`: a long text takes tens of milliseconds to tokenize, and the
    sentencepiece and HF tokenizers let the event loop run meanwhile (they drop the GIL)."""

    def __init__(self, tok, max_chars: int, param: str):
        self._tok, self.max_chars, self.param = tok, max_chars, param

    def __getattr__(self, name: str):
        return getattr(self._tok, name)

    def encode(self, text: str, **kw) -> list[int]:
        if len(text) > self.max_chars:
            raise bad_request(f"{self.param}: the text is {len(text)} characters, over this "
                              f"server's limit of {self.max_chars} (--max-prompt-chars)",
                              self.param)
        return self._tok.encode(text, **kw)


async def off_loop(fn: Callable[..., T], *args) -> T:
    """fn(*args) in a worker thread: tokenization and template rendering, so one long
    prompt never stalls the other streams or /health."""
    return await asyncio.to_thread(fn, *args)


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def until_disconnect(request: Request, work: Awaitable):
    """Await `work`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)   # aborts happen now


async def _disconnected(request: Request) -> None:
    # The body was read before the endpoint ran, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def gather_all(work: list[Awaitable]) -> list:
    """asyncio.gather that cancels the others as soon as one fails."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_output(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    async with aclosing(stream):
        async for out in stream:
            if out.finished:
                return out
    raise APIError(500, "the engine ended a request without a final output")


async def open_streams(request: Request, streams: list[AsyncIterator[RequestOutput]]
                       ) -> list[RequestOutput]:
    """Wait for each stream's first output (admission errors raise here, before the HTTP
    response starts); on any failure or disconnect every stream is closed (aborted)."""
    try:
        return await until_disconnect(request, gather_all([s.__anext__() for s in streams]))
    except BaseException:
        for s in streams:
            await s.aclose()
        raise


async def merge_streams(streams: list[AsyncIterator[RequestOutput]],
                        firsts: list[RequestOutput]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they come, each stream's first output
    (already taken by open_streams) first. Closing this closes (aborts) them all."""
    tasks: list[asyncio.Task] = []
    try:
        for i, out in enumerate(firsts):
            yield i, out
        live = [i for i, out in enumerate(firsts) if not out.finished]
        if len(live) == 1:                     # the common case: no tasks needed
            async for out in streams[live[0]]:
                yield live[0], out
            return
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(i: int) -> None:
            try:
                async for out in streams[i]:
                    queue.put_nowait((i, out))
                queue.put_nowait((i, done))
            except Exception as exc:           # noqa: BLE001 - re-raised by the consumer
                queue.put_nowait((i, exc))

        tasks = [asyncio.ensure_future(pump(i)) for i in live]
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
