"""The request policy of docs/api.md, row by row, through the real server: the test reads
the documented tables and sends each field.

  supported   served (200; a stream ends with [DONE] and carries no error)
  no effect   served, and generates exactly what the same request without the field does
  refused     400 whose param names the field; the same field with null is served
  ignored     served, and the server logs one warning line naming the field
  structured outputs   never dropped silently: a 400, or served without an ignore warning

Also: every field of the installed openai SDK's request types is in the table, every
declared field takes null as its default, and known fields keep their strict types.
"""
from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import MODEL_NAME
from tpaserve.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
ROUTES = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_ROW = re.compile(r"^\| `([^`]+)` \| (\w+) \| ([a-z ]+) \| `(.*)` \| .*\|$")
USER = {"role": "user", "content": "hello world"}
# fields a value needs beside it to mean something
COMPANIONS = {"top_logprobs": {"logprobs": True}, "stream_options": {"stream": True},
              "continue_final_message": {"add_generation_prompt": False}}


def table() -> list[tuple[str, str, str, typing.Any]]:
    """(field, endpoint, policy, example) for every row, `both` split in two."""
    rows = []
    for line in DOC.read_text().splitlines():
        m = _ROW.match(line)
        if m:
            field, where, policy, example = m.groups()
            for endpoint in (("completions", "chat") if where == "both" else (where,)):
                rows.append((field, endpoint, policy, json.loads(example)))
    return rows


ROWS = table()


def base(endpoint: str) -> dict:
    common = {"model": MODEL_NAME, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    if endpoint == "completions":
        return {**common, "prompt": "hello world"}
    return {**common, "messages": [USER]}


def with_field(endpoint: str, field: str, value) -> dict:
    body = base(endpoint)
    if field.startswith("stream_options."):
        body.update(stream=True, stream_options={field.split(".", 1)[1]: value})
    elif field.startswith("messages[]."):
        key = field.split(".", 1)[1]
        msg = {"role": "tool" if key == "tool_call_id" else "assistant", "content": "ok"}
        msg[key] = value
        body["messages"] = [USER, msg, USER]
    else:
        body.update({field: value, **COMPANIONS.get(field, {})})
    return body


def send(server, endpoint: str, body: dict) -> tuple[httpx.Response, str]:
    """The response and its generated text (streams: the content of every chunk)."""
    with server.http() as h:
        r = h.post(ROUTES[endpoint], json=body)
    if r.status_code != 200:
        return r, ""
    if not body.get("stream"):
        choice = r.json()["choices"][0]
        return r, choice["text"] if endpoint == "completions" else choice["message"]["content"]
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line]
    assert events[-1] == "[DONE]", r.text
    chunks = [json.loads(e) for e in events[:-1]]
    assert not any("error" in c for c in chunks), r.text
    return r, "".join((c["choices"][0].get("text") or c["choices"][0].get("delta", {})
                       .get("content") or "") for c in chunks if c["choices"])


_BASELINES: dict[tuple, str] = {}


def baseline(server, endpoint: str, stream: bool = False) -> str:
    """The text of base(endpoint) (greedy, so one request per server, endpoint and mode)."""
    key = (server.url, endpoint, stream)
    if key not in _BASELINES:
        _BASELINES[key] = send(server, endpoint, {**base(endpoint), "stream": stream})[1]
    return _BASELINES[key]


def log_since(server, offset: int) -> str:
    with open(server.log, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def _ids(rows):
    return [f"{r[1]}:{r[0]}" for r in rows]


def test_the_table_is_read():
    policies = {r[2] for r in ROWS}
    assert policies == {"supported", "no effect", "refused", "structured outputs", "ignored"}
    assert len(ROWS) > 100


SUPPORTED = [r for r in ROWS if r[2] == "supported"]


@pytest.mark.parametrize("field,endpoint,policy,example", SUPPORTED, ids=_ids(SUPPORTED))
def test_supported(server, field, endpoint, policy, example):
    r, _ = send(server, endpoint, with_field(endpoint, field, example))
    assert r.status_code == 200, r.text


NO_EFFECT = [r for r in ROWS if r[2] == "no effect"]


@pytest.mark.parametrize("field,endpoint,policy,example", NO_EFFECT, ids=_ids(NO_EFFECT))
def test_no_effect(server, field, endpoint, policy, example):
    body = with_field(endpoint, field, example)
    r, text = send(server, endpoint, body)
    assert r.status_code == 200, r.text
    assert text == baseline(server, endpoint, bool(body.get("stream")))


REFUSED = [r for r in ROWS if r[2] == "refused"]


@pytest.mark.parametrize("field,endpoint,policy,example", REFUSED, ids=_ids(REFUSED))
def test_refused_unless_neutral(server, field, endpoint, policy, example):
    r, _ = send(server, endpoint, with_field(endpoint, field, example))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"], err
    r, _ = send(server, endpoint, with_field(endpoint, field, None))
    assert r.status_code == 200, r.text


STRUCTURED = [r for r in ROWS if r[2] == "structured outputs"]


@pytest.mark.parametrize("field,endpoint,policy,example", STRUCTURED, ids=_ids(STRUCTURED))
def test_structured_outputs_are_never_dropped_silently(server, field, endpoint, policy,
                                                       example):
    offset = server.log.stat().st_size
    r, _ = send(server, endpoint, with_field(endpoint, field, example))
    assert r.status_code in (200, 400), r.text
    if r.status_code == 200:
        assert field not in log_since(server, offset)


IGNORED = [r for r in ROWS if r[2] == "ignored"]


@pytest.mark.parametrize("field,endpoint,policy,example", IGNORED, ids=_ids(IGNORED))
def test_unknown_fields_are_ignored_with_one_warning(server, field, endpoint, policy,
                                                     example):
    offset = server.log.stat().st_size
    body = with_field(endpoint, field, example)
    body.update(stream=True, stream_options={"include_usage": True, "bogus_option": 1})
    if endpoint == "chat":
        body["messages"] = [{**USER, "bogus_key": "x"}]
    r, text = send(server, endpoint, body)
    assert r.status_code == 200, r.text
    assert text == baseline(server, endpoint, stream=True)   # dropped, nothing else changed
    lines = [line for line in log_since(server, offset).splitlines() if "ignored field" in line]
    assert len(lines) == 1, lines
    assert f"{field}, stream_options.bogus_option" in lines[0]
    assert ROUTES[endpoint] in lines[0]
    if endpoint == "chat":
        assert "messages[0].bogus_key" in lines[0]


def _sdk_fields(module) -> set[str]:
    return set(module.CompletionCreateParamsBase.__annotations__)


def test_every_openai_field_is_in_the_table():
    from openai.types import completion_create_params
    from openai.types.chat import chat_completion_stream_options_param
    from openai.types.chat import completion_create_params as chat_params
    from openai.types.chat.chat_completion_message import ChatCompletionMessage
    documented = {(f, e) for f, e, _, _ in ROWS}
    wanted = {(f, "completions") for f in _sdk_fields(completion_create_params)}
    wanted |= {(f, "chat") for f in _sdk_fields(chat_params)}
    options = chat_completion_stream_options_param.ChatCompletionStreamOptionsParam
    wanted |= {(f"stream_options.{f}", e) for f in options.__annotations__
               for e in ("completions", "chat")}
    wanted |= {(f"messages[].{f}", "chat") for f in ChatCompletionMessage.model_fields}
    assert not wanted - documented, sorted(wanted - documented)


def test_every_declared_field_is_in_the_table():
    documented = {(f, e) for f, e, _, _ in ROWS}
    declared = {(f, "completions") for f in CompletionRequest.model_fields}
    declared |= {(f, "chat") for f in ChatCompletionRequest.model_fields}
    declared |= {(f"messages[].{f}", "chat") for f in ChatMessage.model_fields}
    assert not declared - documented, sorted(declared - documented)


def _optional(model) -> list[str]:
    # priority is not nullable yet (issue #16 reworks it)
    return [name for name, f in model.model_fields.items()
            if not f.is_required() and name != "priority"]


NULLS = [("completions", f) for f in _optional(CompletionRequest)] + \
        [("chat", f) for f in _optional(ChatCompletionRequest)]


@pytest.mark.parametrize("endpoint,field", NULLS, ids=[f"{e}:{f}" for e, f in NULLS])
def test_null_means_the_default(server, endpoint, field):
    r, text = send(server, endpoint, {**base(endpoint), field: None})
    assert r.status_code == 200, r.text
    if field not in ("max_tokens", "temperature", "ignore_eos"):   # base() sets these
        assert text == baseline(server, endpoint)
    if (endpoint, field) == ("completions", "max_tokens"):         # OpenAI's default
        assert r.json()["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize("endpoint,body,param", [
    ("chat", {"metadata": "x"}, "metadata"),
    ("chat", {"metadata": {"k": 1}}, "metadata.k"),
    ("chat", {"chat_template_kwargs": [1]}, "chat_template_kwargs"),
    ("chat", {"store": 1}, "store"),
    ("chat", {"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]},
     "messages[0].tool_call_id"),
    ("completions", {"stream": True, "stream_options": {"continuous_usage_stats": "yes"}},
     "stream_options.continuous_usage_stats"),
    ("completions", {"truncate_prompt_tokens": "3"}, "truncate_prompt_tokens"),
    ("completions", {"return_tokens_as_token_ids": 1}, "return_tokens_as_token_ids"),
])
def test_known_fields_keep_strict_types(server, endpoint, body, param):
    r, _ = send(server, endpoint, {**base(endpoint), **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_logged_names_cannot_forge_or_flood_the_log():
    from tpaserve.api.request_policy import MAX_LOGGED_NAMES, _names
    line = _names(["ok", "x\nERROR forged", *(f"f{i}" for i in range(50))])
    assert "\n" not in line and "'x\\nERROR forged'" in line
    assert line.endswith(f" and {52 - MAX_LOGGED_NAMES} more")
