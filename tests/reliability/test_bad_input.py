"""Bad input against a real server: every case is a 400 (413 for a body over the limit) in
the OpenAI error shape, naming the field in `param` where there is one, and the server is
unharmed afterwards: healthy, no block held, no traceback logged, and a greedy request
still returns what it returned before the barrage.

Lax coercion is covered field by field: for every typed field of every request model,
values pydantic's lax mode would convert (true for an int, "3" for an int, 2.0 for an int,
1 for a bool...) must be refused, naming that field.
"""
from __future__ import annotations

import json
import socket
import types
import typing

import httpx
import pytest

from tests.reliability.common import error_of, metric, metrics
from tests.reliability.conftest import MODEL_NAME
from tpaserve.api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

BODY_LIMIT = 64 * 1024
SERVER_FLAGS = ("--max-request-body-bytes", str(BODY_LIMIT), "--num-blocks", "64",
                "--no-enable-prefix-caching")
VOCAB = 320                      # the tiny sentencepiece tokenizer's (the model pads to 332)

CMPL = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PROBE = {"model": MODEL_NAME, "prompt": "the quick brown fox", "max_tokens": 8,
         "temperature": 0}


def raw(base: dict, **fields: str) -> bytes:
    """`base` as JSON with some fields given as raw JSON text (NaN, Infinity, 1e400...)."""
    text = json.dumps(base)[:-1]
    return (text + "".join(f', "{k}": {v}' for k, v in fields.items()) + "}").encode()


def cmpl(**kw) -> dict:
    return {**CMPL, **kw}


def chat(**kw) -> dict:
    return {**CHAT, **kw}


# (id, path, body (dict -> JSON, bytes -> as is), param the error must name; None: no field)
CASES = [
    # not JSON, not UTF-8, not an object, no body
    ("invalid-json", "/v1/completions", b'{"model": "tiny-t6", "prompt": "hi",', None),
    ("truncated-string", "/v1/completions", b'{"prompt": "hi', None),
    ("invalid-utf8", "/v1/completions", b'{"prompt": "caf\xe9 \xff"}', None),
    ("invalid-utf8-chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', None),
    ("deeply-nested", "/v1/completions", b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}",
     None),
    ("too-many-digits", "/v1/completions", b'{"prompt": "hi", "n": 1' + b"0" * 5000 + b"}",
     None),
    ("array-body", "/v1/completions", [1, 2], None),
    ("string-body", "/v1/chat/completions", "hello", None),
    ("null-body", "/tokenize", None, None),
    ("empty-body", "/v1/completions", b"", None),
    ("missing-prompt", "/v1/completions", {"model": MODEL_NAME}, "prompt"),
    # text that is not Unicode (half a surrogate pair, valid JSON escape)
    ("lone-surrogate", "/v1/completions", b'{"prompt": "hi \\ud800"}', "prompt"),
    ("lone-surrogate-chat", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    ("lone-surrogate-part", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud83d"}]}]}',
     "messages"),
    ("lone-surrogate-stop", "/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"]}', "stop"),
    ("lone-surrogate-tokenize", "/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    # huge n, max_tokens
    ("huge-n", "/v1/completions", cmpl(n=10**6), "n"),
    ("n-past-max", "/v1/chat/completions", chat(n=129), "n"),
    ("n-zero", "/v1/completions", cmpl(n=0), "n"),
    ("huge-max-tokens", "/v1/completions", cmpl(max_tokens=10**30), "max_tokens"),
    ("max-tokens-past-context", "/v1/chat/completions", chat(max_tokens=600), "max_tokens"),
    ("negative-max-tokens", "/v1/completions", cmpl(max_tokens=-1), "max_tokens"),
    ("negative-max-completion-tokens", "/v1/chat/completions",
     chat(max_completion_tokens=-5), "max_completion_tokens"),
    ("prompt-past-context", "/v1/completions", cmpl(prompt=[5] * 600), "prompt"),
    ("huge-top-logprobs", "/v1/chat/completions", chat(logprobs=True, top_logprobs=10**9),
     "top_logprobs"),
    ("huge-logprobs", "/v1/completions", cmpl(logprobs=21), "logprobs"),
    # token ids outside the vocabulary
    ("token-id-vocab", "/v1/completions", cmpl(prompt=[1, VOCAB]), "prompt"),
    ("token-id-padding-row", "/v1/completions", cmpl(prompt=[1, VOCAB + 5]), "prompt"),
    ("token-id-negative", "/v1/completions", cmpl(prompt=[1, -1]), "prompt"),
    ("token-id-bigint", "/v1/completions", cmpl(prompt=[1, 2**70]), "prompt"),
    ("token-id-in-batch", "/v1/completions", cmpl(prompt=[[1, 2], [3, VOCAB]]), "prompt"),
    ("stop-token-id", "/v1/completions", cmpl(stop_token_ids=[VOCAB]), "stop_token_ids"),
    ("logit-bias-token", "/v1/chat/completions", chat(logit_bias={str(VOCAB): 1}), "logit_bias"),
    ("detokenize-vocab", "/detokenize", {"tokens": [5, VOCAB]}, "tokens"),
    ("detokenize-negative", "/detokenize", {"tokens": [-7]}, "tokens"),
    # NaN and infinite floats (Python's JSON parser reads NaN, Infinity and 1e400 = inf)
    ("nan-temperature", "/v1/completions", raw(CMPL, temperature="NaN"), "temperature"),
    ("inf-top-p", "/v1/completions", raw(CMPL, top_p="Infinity"), "top_p"),
    ("minus-inf-penalty", "/v1/chat/completions", raw(CHAT, presence_penalty="-Infinity"),
     "presence_penalty"),
    ("overflow-inf", "/v1/completions", raw(CMPL, frequency_penalty="1e400"),
     "frequency_penalty"),
    ("nan-min-p", "/v1/chat/completions", raw(CHAT, min_p="NaN"), "min_p"),
    ("nan-logit-bias", "/v1/completions", raw(CMPL, logit_bias='{"5": NaN}'), "logit_bias"),
    ("nan-repetition", "/v1/completions", raw(CMPL, repetition_penalty="NaN"),
     "repetition_penalty"),
    # wrong types
    ("prompt-number", "/v1/completions", cmpl(prompt=5), "prompt"),
    ("prompt-object", "/v1/completions", cmpl(prompt={"text": "hi"}), "prompt"),
    ("prompt-mixed", "/v1/completions", cmpl(prompt=[1, "a"]), "prompt"),
    ("prompt-bool-ids", "/v1/completions", cmpl(prompt=[1, True]), "prompt"),
    ("messages-string", "/v1/chat/completions", chat(messages="hi"), "messages"),
    ("content-number", "/v1/chat/completions",
     chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    ("stop-number", "/v1/completions", cmpl(stop=5), "stop"),
    ("logit-bias-list", "/v1/completions", cmpl(logit_bias=[1, 2]), "logit_bias"),
    ("stream-options-list", "/v1/completions", cmpl(stream=True, stream_options=[]),
     "stream_options"),
    ("model-number", "/v1/chat/completions", chat(model=7), "model"),
    ("tokens-strings", "/detokenize", {"tokens": ["a"]}, "tokens[0]"),
    # empty prompts and conversations, unknown roles
    ("empty-prompt", "/v1/completions", cmpl(prompt=""), "prompt"),
    ("empty-prompt-list", "/v1/completions", cmpl(prompt=[]), "prompt"),
    ("empty-prompt-in-list", "/v1/completions", cmpl(prompt=["a", ""]), "prompt"),
    ("empty-id-list", "/v1/completions", cmpl(prompt=[[]]), "prompt"),
    ("empty-messages", "/v1/chat/completions", chat(messages=[]), "messages"),
    ("empty-messages-tokenize", "/tokenize", {"messages": []}, "messages"),
    ("unknown-role", "/v1/chat/completions",
     chat(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    ("unknown-role-tokenize", "/tokenize", {"messages": [{"role": "bot", "content": "x"}]},
     "messages"),
    ("missing-role", "/v1/chat/completions", chat(messages=[{"content": "hi"}]),
     "messages[0].role"),
]


@pytest.fixture(scope="module")
def http(module_server):
    with module_server.http(timeout=30) as h:
        yield h


@pytest.fixture(scope="module")
def baseline(http) -> str:
    """A greedy completion before any bad input."""
    r = http.post("/v1/completions", json=PROBE)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def post(http: httpx.Client, path: str, body) -> httpx.Response:
    if isinstance(body, bytes):
        return http.post(path, content=body, headers={"content-type": "application/json"})
    return http.post(path, json=body)


@pytest.mark.parametrize("path,body,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_400_naming_the_field(http, baseline, path, body, param):
    err = error_of(post(http, path, body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    if param is not None:
        assert param.split("[")[0] in err["message"], err


def _coercible(annotation) -> list:
    """Values lax validation would convert into this (optional) scalar type."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = set(typing.get_args(annotation)) - {type(None)} if union else {annotation}
    if args == {int}:
        return [True, "3", 2.0]
    if args == {float}:
        return [True, "0.5"]
    if args == {bool}:
        return [1, 0, "true", "yes"]
    if args == {str}:
        return [7, ["x"]]
    return []


COERCION = [(path, base, name, value)
            for path, model, base in [("/v1/completions", CompletionRequest, CMPL),
                                      ("/v1/chat/completions", ChatCompletionRequest, CHAT),
                                      ("/tokenize", TokenizeRequest, {"prompt": "hi"}),
                                      ("/detokenize", DetokenizeRequest, {"tokens": [5]})]
            for name, field in model.model_fields.items()
            for value in _coercible(field.annotation)]


@pytest.mark.parametrize("path,base,name,value", COERCION,
                         ids=[f"{c[0]}:{c[2]}={c[3]!r}" for c in COERCION])
def test_no_lax_coercion(http, path, base, name, value):
    err = error_of(post(http, path, {**base, name: value}), 400)
    assert err["param"] == name, err


def test_coercion_covers_the_typed_fields():
    names = {c[2] for c in COERCION}
    assert {"n", "max_tokens", "temperature", "stream", "echo", "seed", "logprobs",
            "top_logprobs", "ignore_eos", "add_special_tokens", "model"} <= names


def test_bodies_over_the_limit_are_413(module_server, http):
    big = json.dumps({**CMPL, "prompt": "x" * (BODY_LIMIT + 1)}).encode()
    err = error_of(post(http, "/v1/completions", big), 413)
    assert str(BODY_LIMIT) in err["message"] and err["code"] == "request_too_large"

    def chunks():                 # no Content-Length: the limit holds while reading
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]
    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error_of(r, 413)
    # a Content-Length smaller than the body: the rest is garbage to the HTTP parser,
    # which answers and drops the connection; the server stays up (checked below)
    host, port = module_server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n"
                     b"Content-Type: application/json\r\n\r\n" + big[:4096])
        assert sock.recv(100).startswith(b"HTTP/1.1 4")


def test_server_unharmed(module_server, http, baseline):
    """Last in this module: after every case above the server is as it was."""
    assert module_server.proc.poll() is None
    assert httpx.get(f"{module_server.url}/health", timeout=5).status_code == 200
    r = http.post("/v1/completions", json=PROBE)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == baseline
    m = metrics(module_server.url)
    assert metric(m, "tpaserve:factor_cache_blocks_used") == 0
    assert metric(m, "tpaserve:num_requests_running") == 0
    assert metric(m, "tpaserve:num_requests_waiting") == 0
    log = module_server.log.read_text(errors="replace")
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
