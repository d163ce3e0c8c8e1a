"""What happens to a request field that tpaserve does not serve, decided once, here.

The policy is vLLM's, stated field by field in docs/api.md (tests/api/test_request_policy.py
sends every row of that table through a real server):

  * every field of OpenAI's completions and chat schemas is declared in protocol.py, typed
    strictly; those that mean nothing for a base model (store, metadata, service_tier...)
    are accepted and have no effect;
  * a field whose meaning tpaserve cannot honour (tools to call, audio out, web search,
    vLLM's beam search...) is a 400 naming it, unless it carries its neutral value (null,
    false, [] ...): ignoring it would silently change what the client asked for;
  * a field unknown to both OpenAI and vLLM is dropped, with one warning line naming it:
    newer clients keep working, and the operator can see what was dropped.

protocol.py lets unknown fields through (extra="allow"); `screen(body, route)` runs first in
every endpoint, refuses or drops them, and leaves no extra on the parsed body.
"""
from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from tpaserve.api.errors import bad_request

logger = logging.getLogger("tpaserve.api")


def _neutral(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


def _same(value: Any, options: tuple) -> bool:
    """`value` is one of `options`, type included (true is not 1)."""
    return any(type(value) is type(o) and value == o for o in options)


# vLLM's extensions that tpaserve does not implement: field -> why. Accepted with a neutral
# value (null, false, [], {}, and the extra values listed in NEUTRAL), refused otherwise.
VLLM_UNSUPPORTED = {
    "use_beam_search": "beam search is not supported",
    "length_penalty": "length_penalty only applies to beam search, which is not supported",
    "allowed_token_ids": "allowed_token_ids is not supported",
    "bad_words": "bad_words is not supported",
    "logits_processors": "custom logits processors are not supported",
    "chat_template": "per-request chat templates are not supported; the server uses the "
                     "tokenizer's template",
    "documents": "documents (retrieval-augmented templates) are not supported",
    "mm_processor_kwargs": "this server serves text-only models",
    "cache_salt": "cache_salt is not supported; start the server with "
                  "--no-enable-prefix-caching to share no cached prompt between requests",
    "kv_transfer_params": "disaggregated prefill (KV transfer) is not supported",
    "vllm_xargs": "vllm_xargs (custom sampling extensions) is not supported",
    "request_id": "client-chosen request ids are not supported; the server assigns them",
    "return_token_ids": "return_token_ids is not supported; use logprobs with "
                        "return_tokens_as_token_ids",
    "prompt_embeds": "prompt embeddings are not supported",
    "echo": "echo is only supported by /v1/completions",
    "best_of": "best_of > 1 is not supported; use n",
}
NEUTRAL = {"length_penalty": (1, 1.0), "use_beam_search": (False,), "best_of": (1,)}

# Structured-output fields are declared in protocol.py and served by api/structured.py; one
# vLLM knob of theirs changes the output and is not offered, so it is refused, never ignored.
STRUCTURED_OUTPUTS = ("guided_whitespace_pattern",)


def screen(body: BaseModel, route: str) -> None:
    """Refuse the unsupported extras of `body` (400 naming the field), drop the unknown
    ones with one warning line, and clear them all (nothing unknown reaches a template)."""
    ignored: list[str] = []
    for path, model in _models(body, ""):
        extra = model.__pydantic_extra__ or {}
        for name, value in extra.items():
            param = f"{path}{name}"
            if path or name not in VLLM_UNSUPPORTED and name not in STRUCTURED_OUTPUTS:
                ignored.append(param)
            elif name in STRUCTURED_OUTPUTS:
                if not (_neutral(value) or value == {"type": "text"}):
                    raise bad_request(f"{param}: not supported; JSON is generated in "
                                      f"compact form (no whitespace between tokens)", param)
            elif not (_neutral(value) or _same(value, NEUTRAL.get(name, ()))):
                raise bad_request(f"{param}: {VLLM_UNSUPPORTED[name]}", param)
        extra.clear()
    if ignored:
        logger.warning("%s: ignored field(s) unknown to OpenAI and vLLM: %s", route,
                       _names(ignored))


MAX_LOGGED_NAMES = 20


def _names(params: list[str]) -> str:
    """The names for the log: a client's names cannot forge log lines (newlines, control
    characters are escaped) nor flood it (at most MAX_LOGGED_NAMES, 100 characters each)."""
    shown = [(p if p.isprintable() else repr(p))[:100] for p in params[:MAX_LOGGED_NAMES]]
    more = len(params) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def _models(model: BaseModel, path: str):
    """(path prefix, model) for `model` and every request model nested in it."""
    yield path, model
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                at = f"{path}{name}[{i}]." if isinstance(value, list) else f"{path}{name}."
                yield from _models(item, at)


def check_tools(tools: list | None, tool_choice: Any, functions: list | None,
                function_call: Any) -> None:
    """Base models have no tool-call format: a request that lets the model call a tool is a
    400 saying so. tool_choice "none" (and history messages of earlier tool calls) are
    fine: the model is asked for text only. The tools are not shown to the model."""
    for listed, choice, what, chooser in ((tools, tool_choice, "tools", "tool_choice"),
                                          (functions, function_call, "functions",
                                           "function_call")):
        if listed and choice != "none":
            raise bad_request(
                f"{what}: this server serves base models, which have no tool-call format; "
                f"{what} can only be sent with {chooser} \"none\"", what)
        if not listed and choice not in (None, "none"):
            raise bad_request(f"{chooser}: needs {what}, and this server only accepts "
                              f"{chooser} \"none\"", chooser)
