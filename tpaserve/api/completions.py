"""POST /v1/completions: prompts (text or token ids, one or many) -> completions, as one JSON
body or as SSE chunks ending with `data: [DONE]`.

Choice indices follow OpenAI: prompt p's i-th sequence is choice p * n + i. Logprobs use the
legacy shape (tokens, token_logprobs, top_logprobs, text_offset); like OpenAI, top_logprobs
holds the `logprobs` most likely tokens plus the chosen one. With echo, the prompt (its text
and, with logprobs, its tokens scored by the model) comes first; the first prompt token has
no context, so its logprob and top_logprobs are null.
"""
from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse
from starlette.responses import Response

from tpaserve.api.engine_client import (
    EngineClient,
    final_output,
    gather_all,
    merge_streams,
    new_request_id,
    off_loop,
    open_streams,
    until_disconnect,
)
from tpaserve.api.errors import OpenAIRoute, bad_request, error_responses, sse_error
from tpaserve.api.extensions import (
    check_prompt_logprobs,
    render_prompt_logprobs,
    token_names,
    truncate_prompt,
    usage_flags,
)
from tpaserve.api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    sse_response,
)
from tpaserve.api.request_policy import screen
from tpaserve.api.structured import with_structured_outputs
from tpaserve.frontend.outputs import Logprob

router = APIRouter(route_class=OpenAIRoute)
DEFAULT_MAX_TOKENS = 16


@dataclass
class Prompt:
    ids: list[int]
    text: str                      # what echo returns


def _prompts(client: EngineClient, body: CompletionRequest) -> list[Prompt]:
    p = body.prompt
    if isinstance(p, str) or isinstance(p[0], str):
        tok = client.tokenizer
        texts = [p] if isinstance(p, str) else p
        out = [Prompt(truncate_prompt(tok.encode(t, add_special_tokens=body.add_special_tokens
                                                 is not False), body, client.max_model_len), t)
               for t in texts]
        empty = [i for i, q in enumerate(out) if not q.ids]
        if empty:
            raise bad_request("the prompt is empty: give at least one token", "prompt")
        return out
    id_lists = [p] if isinstance(p[0], int) else p
    id_lists = [truncate_prompt(list(ids), body, client.max_model_len) for ids in id_lists]
    for ids in id_lists:
        client.check_token_ids(ids)        # before decoding them for echo
    tok = client.raw_tokenizer

    def echo_text(ids: list[int]) -> str:
        if not body.echo or tok is None:
            return ""
        return tok.decode(ids, skip_special_tokens=body.skip_special_tokens is not False)
    return [Prompt(list(ids), echo_text(ids)) for ids in id_lists]


def _check_unsupported(body: CompletionRequest) -> None:
    if body.suffix:
        raise bad_request("suffix is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of > 1:
        raise bad_request("best_of > 1 is not supported by this server; use n", "best_of")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")
    check_prompt_logprobs(body)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: {"content": sse_response(CompletionResponse),
                              "description": "JSON, or with stream: true an SSE stream"},
                        **error_responses(400, 401, 404, 413, 500, 503)})
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    client: EngineClient = request.app.state.client
    screen(body, "/v1/completions")
    model = client.check_model(body.model)
    _check_unsupported(body)
    text = isinstance(body.prompt, str) or isinstance(body.prompt[0], str)
    # text is tokenized in a worker thread (long prompts must not stall the loop); token
    # ids are only checked, here, without a thread hop per request
    prompts = await off_loop(_prompts, client, body) if text else _prompts(client, body)
    # the engine scores the prompt once, for echo's logprobs and for prompt_logprobs: with
    # the larger top count (each rendering keeps its own)
    echo_k = body.logprobs if body.echo else None
    wanted = [k for k in (echo_k, body.prompt_logprobs) if k is not None]
    # null means the default, 16 (OpenAI's; vLLM's null would mean "up to the context")
    max_tokens = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
    params = body.sampling_params(max_tokens, body.logprobs,
                                  prompt_logprobs=max(wanted) if wanted else None)
    params = with_structured_outputs(params, body)
    client.check_sequences(len(prompts) * params.n, "n" if len(prompts) == 1 else "prompt")
    rid = new_request_id("cmpl")
    streams = [client.generate(f"{rid}-{i}" if len(prompts) > 1 else rid, p.ids, params,
                               body.priority or 0) for i, p in enumerate(prompts)]
    renderer = _Renderer(client, body, prompts, params.n)
    if body.stream:
        firsts = await open_streams(request, streams)
        return EventSourceResponse(_sse(rid, model, body, renderer,
                                        merge_streams(streams, firsts)))
    finals = await until_disconnect(request, gather_all([final_output(s) for s in streams]))
    choices = [renderer.final_choice(i, c, out) for i, out in enumerate(finals)
               for c in out.outputs]
    usage = UsageInfo.of(sum(len(p.ids) for p in prompts),
                         sum(len(c.token_ids) for out in finals for c in out.outputs))
    resp = CompletionResponse(id=rid, model=model, choices=choices, usage=usage)
    return Response(resp.model_dump_json(), media_type="application/json")


async def _sse(rid: str, model: str, body: CompletionRequest, renderer: "_Renderer",
               outputs: AsyncIterator) -> AsyncIterator[str]:
    n_completion, n_prompt = 0, sum(len(p.ids) for p in renderer.prompts)
    final_usage, continuous = usage_flags(body.stream_options)
    try:
        async for i, out in outputs:
            events = []          # one write per engine step, however many choices moved
            for c in out.outputs:
                n_completion += len(c.token_ids_delta)
                choice = renderer.delta_choice(i, c, out)
                if choice is not None:
                    # continuous_usage_stats: the usage so far in every chunk
                    chunk = CompletionResponse(id=rid, model=model, choices=[choice],
                                               usage=UsageInfo.of(n_prompt, n_completion))
                    skip = None if continuous else {"usage"}
                    events.append(f"data: {chunk.model_dump_json(exclude=skip)}\n\n")
            if events:
                yield "".join(events)
        if final_usage:
            usage = UsageInfo.of(n_prompt, n_completion)
            chunk = CompletionResponse(id=rid, model=model, choices=[], usage=usage)
            yield f"data: {chunk.model_dump_json()}\n\n"
    except Exception as exc:                       # noqa: BLE001 - the stream has started
        yield sse_error(exc)
    finally:
        await outputs.aclose()
    yield "data: [DONE]\n\n"


class _TextOffsets:
    """text_offset of each token: where its text starts in the choice's text, counted in
    characters of the UTF-8 text its bytes decode to (a token that is part of a character
    adds nothing until the character completes). Special tokens left out of the text
    (skip_special_tokens) take no room. Keeps state across a stream's chunks."""

    def __init__(self, tokenizer, skip_special: bool):
        self.tok = tokenizer
        self.skipped = tokenizer.all_special_ids if tokenizer is not None and skip_special \
            else frozenset()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def next(self, token_id: int, token: str) -> int:
        at = self.chars
        if token_id not in self.skipped:
            raw = self.tok.token_bytes(token_id) if self.tok is not None else token.encode()
            self.chars += len(self.decoder.decode(raw))
        return at


class _Renderer:
    """Engine outputs -> CompletionChoice, for whole responses and for stream deltas."""

    def __init__(self, client: EngineClient, body: CompletionRequest, prompts: list[Prompt],
                 n: int):
        self.tok, self.body, self.prompts, self.n = client.raw_tokenizer, body, prompts, n
        self.want_logprobs = body.logprobs is not None
        self.as_ids = bool(body.return_tokens_as_token_ids)
        self.offsets: dict[int, _TextOffsets] = {}  # stream: choice index -> its offsets
        self.echoed: set[int] = set()                # stream: choices whose prompt was sent
        self.closed: set[int] = set()                # stream: choices whose finish was sent

    def _new_offsets(self) -> _TextOffsets:
        return _TextOffsets(self.tok, self.body.skip_special_tokens is not False)

    def final_choice(self, prompt_index: int, c, out) -> CompletionChoice:
        prompt = self.prompts[prompt_index]
        text, ids, entries = c.text, list(c.token_ids), list(c.logprobs or [])
        if self.body.echo:
            text = prompt.text + text
            ids = prompt.ids + ids
            entries = list(out.prompt_logprobs or [None] * len(prompt.ids)) + entries
        logprobs = (self._logprobs(ids, entries, self._new_offsets()) if self.want_logprobs
                    else None)
        plp = None
        if self.body.prompt_logprobs is not None:
            plp = render_prompt_logprobs(self.tok, prompt.ids, out.prompt_logprobs,
                                         self.body.prompt_logprobs, self.as_ids)
        return CompletionChoice(index=prompt_index * self.n + c.index, text=text,
                                logprobs=logprobs, finish_reason=c.finish_reason,
                                stop_reason=c.stop_reason, prompt_logprobs=plp)

    def delta_choice(self, prompt_index: int, c, out) -> CompletionChoice | None:
        index = prompt_index * self.n + c.index
        if index in self.closed:
            # each output carries all n sequences: a finished one still shows its
            # finish_reason while a sibling runs on (it was sent twice)
            return None
        text = c.text_delta
        prompt = self.prompts[prompt_index]
        logprobs = None
        offsets = self.offsets.setdefault(index, self._new_offsets())
        # with logprobs, the echo waits for the output that carries the prompt's logprobs
        # (the step that completes the prompt, before any generated text)
        echo_now = self.body.echo and index not in self.echoed and (
            not self.want_logprobs or out.prompt_logprobs is not None)
        if echo_now:
            self.echoed.add(index)
            text = prompt.text + text
            if self.want_logprobs:
                logprobs = self._logprobs(prompt.ids, out.prompt_logprobs, offsets)
        if self.want_logprobs:
            gen = self._logprobs(c.token_ids_delta, c.logprobs_delta, offsets)
            logprobs = gen if logprobs is None else logprobs.extend(gen)
        if not text and c.finish_reason is None and not (logprobs and logprobs.tokens):
            return None
        if c.finish_reason is not None:
            self.closed.add(index)
        return CompletionChoice(index=index, text=text, logprobs=logprobs,
                                finish_reason=c.finish_reason, stop_reason=c.stop_reason)

    def _names(self, ids: list[int]) -> list[str]:
        return token_names(self.tok, ids, self.as_ids)

    def _logprobs(self, ids: list[int], entries: list[Logprob | None],
                  offsets: _TextOffsets) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for tid, token, entry in zip(ids, self._names(ids), entries):
            out.tokens.append(token)
            out.text_offset.append(offsets.next(tid, token))
            if entry is None:
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            lp, top = entry
            top = top[:self.body.logprobs]     # the engine may have scored more (prompt_logprobs)
            best = {name: value for name, (_, value) in zip(self._names([t for t, _ in top]), top)}
            best.setdefault(token, lp)
            out.token_logprobs.append(lp)
            out.top_logprobs.append(best)
        return out
