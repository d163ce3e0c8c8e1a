"""Every failure is an OpenAI error body {"error": {message, type, param, code}} with the
right status: 400 bad values and validation (never FastAPI's 422), 401 keys, 404 models and
paths, 413 bodies (declared or chunked), 503 + Retry-After for a full queue."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from tests.api.conftest import BODY_LIMIT, MAX_MODEL_LEN, MODEL_NAME

PROMPT = "hello world"


def error_of(r: httpx.Response, status: int, type_: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    err = body["error"]
    assert err["type"] == type_ and err["message"]
    assert "Traceback" not in r.text
    return err


def post(server, path: str, body, **kw) -> httpx.Response:
    with server.http() as h:
        if isinstance(body, (dict, list)):
            return h.post(path, json=body, **kw)
        return h.post(path, content=body, **kw)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("max_tokens", -1), ("n", 0),
    ("top_k", -2), ("min_p", 2.0), ("presence_penalty", 3), ("logprobs", 50), ("seed", 2**70),
    ("logit_bias", {"x": 1}), ("stop", [""]), ("repetition_penalty", 0),
])
def test_invalid_sampling_values_are_400_naming_the_field(server, field, value):
    r = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT, field: value})
    err = error_of(r, 400, "invalid_request_error")
    assert err["param"] == field


@pytest.mark.parametrize("body,param", [
    ({"model": MODEL_NAME, "prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 1.5}, "max_tokens"),
    ({"model": MODEL_NAME}, "prompt"),
    ({"model": MODEL_NAME, "prompt": []}, "prompt"),
    ({"model": MODEL_NAME, "prompt": [1, "a"]}, "prompt"),
    ({"model": MODEL_NAME, "prompt": PROMPT, "stream": "maybe"}, "stream"),
])
def test_validation_failures_are_400_not_422(server, body, param):
    err = error_of(post(server, "/v1/completions", body), 400, "invalid_request_error")
    assert err["param"] == param and param in err["message"]


def test_chat_validation_names_nested_field(server):
    r = post(server, "/v1/chat/completions",
             {"model": MODEL_NAME, "messages": [{"content": "hi"}]})
    err = error_of(r, 400, "invalid_request_error")
    assert err["param"] == "messages[0].role"
    r = post(server, "/v1/chat/completions",
             {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]})
    assert "wizard" in error_of(r, 400, "invalid_request_error")["message"]
    r = post(server, "/v1/chat/completions", {"model": MODEL_NAME, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert error_of(r, 400, "invalid_request_error")["param"] == "messages"


def test_bad_json_and_non_object_bodies(server):
    err = error_of(post(server, "/v1/completions", b"{not json",
                        headers={"content-type": "application/json"}),
                   400, "invalid_request_error")
    assert "JSON" in err["message"]
    error_of(post(server, "/v1/completions", [1, 2]), 400, "invalid_request_error")


def test_token_ids_outside_the_vocabulary(server, tokenizer):
    v = tokenizer.vocab_size
    err = error_of(post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": [1, v]}),
                   400, "invalid_request_error")
    assert str(v) in err["message"] and err["param"] == "prompt"
    err = error_of(post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": [1, -3]}),
                   400, "invalid_request_error")
    # the model's padded rows (vocab <= id < model vocab) are outside too
    error_of(post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": [1, v + 3]}),
             400, "invalid_request_error")
    err = error_of(post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT,
                                                     "logit_bias": {str(v + 1): 5}}),
                   400, "invalid_request_error")
    assert err["param"] == "logit_bias"
    error_of(post(server, "/detokenize", {"tokens": [v]}), 400, "invalid_request_error")


def test_prompt_longer_than_the_context_names_both_numbers(server):
    ids = [5] * (MAX_MODEL_LEN + 3)
    err = error_of(post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": ids,
                                                     "max_tokens": 4}),
                   400, "invalid_request_error")
    assert str(MAX_MODEL_LEN) in err["message"] and str(MAX_MODEL_LEN + 7) in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model=MODEL_NAME, prompt=[5] * 10,
                                           max_tokens=MAX_MODEL_LEN)
    assert e.value.body["param"] == "max_tokens"


def test_unsupported_fields_are_rejected_saying_so(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="suffix"):
        c.completions.create(model=MODEL_NAME, prompt=PROMPT, suffix="end")
    with pytest.raises(openai.BadRequestError, match="best_of"):
        c.completions.create(model=MODEL_NAME, prompt=PROMPT, best_of=2)
    with pytest.raises(openai.BadRequestError, match="tools"):
        c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                  tools=[{"type": "function", "function": {"name": "f"}}])


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="gpt-4", prompt=PROMPT)
    assert e.value.body["type"] == "not_found_error" and e.value.body["param"] == "model"
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4", messages=[
            {"role": "user", "content": "x"}])
    with server.http() as h:
        error_of(h.get("/v1/models/gpt-4"), 404, "not_found_error")
        error_of(h.get("/no/such/path"), 404, "not_found_error")
        error_of(h.get("/v1/completions"), 405, "invalid_request_error")


def test_auth(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0).models.list()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": server.api_key},
                    {"Authorization": f"Basic {server.api_key}"}):
        r = httpx.post(f"{server.url}/v1/completions", headers=headers,
                       json={"model": MODEL_NAME, "prompt": PROMPT})
        err = error_of(r, 401, "authentication_error")
        assert err["code"] == "invalid_api_key"
        error_of(httpx.post(f"{server.url}/tokenize", headers=headers, json={"prompt": "x"}),
                 401, "authentication_error")
    for open_path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{open_path}").status_code == 200
    assert server.client().models.list().data[0].id == MODEL_NAME


def test_oversized_body_is_413(server):
    big = {"model": MODEL_NAME, "prompt": "x" * (BODY_LIMIT + 10)}
    err = error_of(post(server, "/v1/completions", big), 413, "invalid_request_error")
    assert str(BODY_LIMIT) in err["message"]

    def chunks():           # no Content-Length: the limit must hold while reading
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i:i + 8192]
    r = post(server, "/v1/completions", chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    error_of(r, 413, "invalid_request_error")
    # a body just under the limit still works
    ok = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": PROMPT,
                                           "user": "u" * (BODY_LIMIT // 2), "max_tokens": 1})
    assert ok.status_code == 200


def test_a_queue_bound_that_refuses_everything_is_refused_at_start_up():
    """--max-queued-requests 0 would refuse every request (all pass through the queue)
    while /health says 200: one line at start-up instead. (Queue full under load, 503 +
    Retry-After: tests/reliability/test_overload.py.)"""
    r = subprocess.run([sys.executable, "-m", "tpaserve", "--max-queued-requests", "0",
                        "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "--max-queued-requests must be >= 1" in r.stderr
