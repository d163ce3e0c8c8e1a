"""POST /v1/chat/completions: messages -> the tokenizer's chat template -> prompt ids ->
one assistant message per choice, as one JSON body or as SSE chunks. A stream opens each
choice with a chunk whose delta carries the role, then content deltas; the chunk with the
last content carries finish_reason; with stream_options.include_usage a last chunk with no
choices carries the usage (with continuous_usage_stats every chunk carries the usage so
far). Logprobs use the chat shape (token, logprob, bytes, top_logprobs: the `top_logprobs`
most likely tokens).
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.sse import EventSourceResponse
from starlette.responses import Response

from tpaserve.api.engine_client import (
    EngineClient,
    final_output,
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
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    sse_response,
)
from tpaserve.api.request_policy import check_tools, screen
from tpaserve.api.structured import with_structured_outputs
from tpaserve.exceptions import SamplingParamsError
from tpaserve.frontend.outputs import Logprob

router = APIRouter(route_class=OpenAIRoute)


# template variables the server sets, and jinja's globals: a request's chat_template_kwargs
# cannot replace them
_TEMPLATE_OWN = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                           "raise_exception", "strftime_now", "range", "dict", "lipsum",
                           "cycler", "joiner", "namespace"})


def encode_chat(tokenizer, messages: list[ChatMessage], add_generation_prompt: bool | None,
                add_special_tokens: bool | None, continue_final_message: bool | None = None,
                template_kwargs: dict | None = None) -> list[int]:
    """Render the chat template and tokenize it. add_special_tokens None: add them (BOS, as
    for a completion prompt), but drop the added BOS when the template wrote one itself, so
    a prompt never starts with two. continue_final_message (vLLM, Hugging Face): the prompt
    ends right after the last message's content, for the model to continue it."""
    if continue_final_message and add_generation_prompt is not False:
        raise bad_request("continue_final_message: cannot be true while "
                          "add_generation_prompt is true (its default): set it to false",
                          "continue_final_message")
    own = sorted(_TEMPLATE_OWN & set(template_kwargs or {}))
    if own:
        raise bad_request(f"chat_template_kwargs: {own[0]!r} is set by the server (use the "
                          f"request's own field where there is one)", "chat_template_kwargs")
    dumped = [m.model_dump(exclude_none=True) for m in messages]
    text = tokenizer.apply_chat_template(
        dumped, add_generation_prompt=add_generation_prompt is not False,
        **(template_kwargs or {}))
    if continue_final_message:
        text = _cut_after_final(text, messages[-1])
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens is not False)
    bos = tokenizer.bos_token_id
    if add_special_tokens is None and bos is not None and ids[:2] == [bos, bos]:
        ids = ids[1:]
    return ids


def _cut_after_final(text: str, final: ChatMessage) -> str:
    """The rendered chat up to the end of the final message's content (as Hugging Face's
    apply_chat_template does: verbatim if the template kept it, else stripped)."""
    content = final.content if isinstance(final.content, str) else "".join(
        str(p.get("text", "")) for p in final.content or [])
    for needle in (content, content.strip()):
        at = text.rfind(needle) if needle else -1
        if at != -1:
            return text[:at + len(needle)]
    raise bad_request("continue_final_message: the chat template does not write the final "
                      "message's content, so it cannot be continued", "continue_final_message")


# OpenAI's fields a text-only base model cannot honour, with the values that ask for nothing
_TEXT_ONLY = {"audio": (None,), "modalities": (None, [], ["text"]),
              "web_search_options": (None,), "moderation": (None,)}


def _check_unsupported(body: ChatCompletionRequest) -> None:
    check_tools(body.tools, body.tool_choice, body.functions, body.function_call)
    for name, neutral in _TEXT_ONLY.items():
        if getattr(body, name) not in neutral:
            raise bad_request(f"{name}: not supported by this server, which serves "
                              f"text-only base models", name)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true",
                          "stream_options")
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    check_prompt_logprobs(body)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": sse_response(ChatCompletionChunk),
                              "description": "JSON, or with stream: true an SSE stream"},
                        **error_responses(400, 401, 404, 413, 500, 503)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    client: EngineClient = request.app.state.client
    screen(body, "/v1/chat/completions")
    model = client.check_model(body.model)
    _check_unsupported(body)
    ids = await off_loop(encode_chat, client.tokenizer_for("messages"), body.messages,
                         body.add_generation_prompt, body.add_special_tokens,
                         body.continue_final_message, body.chat_template_kwargs)
    ids = truncate_prompt(ids, body, client.max_model_len)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
        else body.max_tokens
    try:
        params = body.sampling_params(max_tokens,
                                      (body.top_logprobs or 0) if body.logprobs else None,
                                      body.prompt_logprobs)
    except SamplingParamsError as e:
        # two chat fields reach SamplingParams under another name: name the one sent
        sent = {"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"
                if body.max_completion_tokens is not None else "max_tokens"}.get(e.param, e.param)
        raise bad_request(sent + str(e).removeprefix(e.param), sent) from e
    params = with_structured_outputs(params, body)
    client.check_sequences(params.n)
    rid = new_request_id("chatcmpl")
    stream = client.generate(rid, ids, params, body.priority or 0)
    if body.stream:
        firsts = await open_streams(request, [stream])
        return EventSourceResponse(_sse(rid, model, body, client, len(ids), params.n,
                                        merge_streams([stream], firsts)))
    out = await until_disconnect(request, final_output(stream))
    as_ids = bool(body.return_tokens_as_token_ids)
    choices = [ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                          logprobs=_logprobs(client.tokenizer, c.token_ids, c.logprobs, as_ids)
                          if body.logprobs else None,
                          finish_reason=c.finish_reason, stop_reason=c.stop_reason)
               for c in out.outputs]
    usage = UsageInfo.of(len(ids), sum(len(c.token_ids) for c in out.outputs))
    plp = None if body.prompt_logprobs is None else render_prompt_logprobs(
        client.tokenizer, ids, out.prompt_logprobs, body.prompt_logprobs, as_ids)
    resp = ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage,
                                  prompt_logprobs=plp)
    return Response(resp.model_dump_json(), media_type="application/json")


async def _sse(rid: str, model: str, body: ChatCompletionRequest, client: EngineClient,
               n_prompt: int, n: int, outputs: AsyncIterator) -> AsyncIterator[str]:
    final_usage, continuous = usage_flags(body.stream_options)
    as_ids = bool(body.return_tokens_as_token_ids)

    def chunk(choice: ChatStreamChoice | None, usage: UsageInfo | None = None) -> str:
        if continuous and usage is None:        # vLLM: the usage so far in every chunk
            usage = UsageInfo.of(n_prompt, n_completion)
        c = ChatCompletionChunk(id=rid, model=model, choices=[choice] if choice else [],
                                usage=usage)
        return f"data: {c.model_dump_json()}\n\n"

    n_completion, closed = 0, set()        # closed: choices whose finish was sent
    try:
        yield "".join(chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                         content="")))
                      for i in range(n))
        async for _, out in outputs:
            events = []          # one write per engine step, however many choices moved
            for c in out.outputs:
                if c.index in closed:     # still in the output while a sibling runs on
                    continue
                n_completion += len(c.token_ids_delta)
                logprobs = (_logprobs(client.tokenizer, c.token_ids_delta, c.logprobs_delta,
                                      as_ids)
                            if body.logprobs and c.token_ids_delta else None)
                if not c.text_delta and c.finish_reason is None and logprobs is None:
                    continue
                if c.finish_reason is not None:
                    closed.add(c.index)
                events.append(chunk(ChatStreamChoice(
                    index=c.index, delta=DeltaMessage(content=c.text_delta), logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)))
            if events:
                yield "".join(events)
        if final_usage:
            yield chunk(None, UsageInfo.of(n_prompt, n_completion))
    except Exception as exc:                       # noqa: BLE001 - the stream has started
        yield sse_error(exc)
    finally:
        await outputs.aclose()
    yield "data: [DONE]\n\n"


def _logprobs(tokenizer, ids: list[int], entries: list[Logprob] | None,
              as_ids: bool) -> ChoiceLogprobs:
    def raw(tid: int, name: str) -> list[int]:
        # return_tokens_as_token_ids: the bytes are those of "token_id:<id>" (as vLLM)
        return list(name.encode() if as_ids else tokenizer.token_bytes(tid))

    content = []
    for tid, (lp, top) in zip(ids, entries or []):
        top_ids = [t for t, _ in top]
        names = token_names(tokenizer, [tid, *top_ids], as_ids)
        content.append(TokenLogprob(
            token=names[0], logprob=lp, bytes=raw(tid, names[0]),
            top_logprobs=[TopLogprob(token=name, logprob=l, bytes=raw(t, name))
                          for name, (t, l) in zip(names[1:], top)]))
    return ChoiceLogprobs(content=content)
