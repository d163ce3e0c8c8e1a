"""vLLM's request extensions, each checked for what it does (docs/api.md lists them), through
the official openai client and a real server; and tools only with tool_choice "none", with
a client's own response messages sent back."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.api.conftest import MODEL_NAME

PROMPT = "the quick brown fox jumps over"
GREEDY = dict(model=MODEL_NAME, prompt=PROMPT, temperature=0, max_tokens=8)
CHAT = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "hello world"}],
            temperature=0, max_tokens=6)


def first_ids(c, n: int, **extra) -> list[int]:
    """The greedy completion's token ids (logprobs named token_id:<id>)."""
    r = c.completions.create(**{**GREEDY, "max_tokens": n}, logprobs=0, extra_body={
        "return_tokens_as_token_ids": True, "ignore_eos": True, **extra})
    return [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]


def test_return_tokens_as_token_ids(server, tokenizer):
    c = server.client()
    r = c.completions.create(**GREEDY, logprobs=2, extra_body={
        "return_tokens_as_token_ids": True, "ignore_eos": True})
    lp = r.choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    assert tokenizer.decode(ids) == r.choices[0].text
    assert all(k.startswith("token_id:") for top in lp.top_logprobs for k in top)
    chat = c.chat.completions.create(**CHAT, logprobs=True, top_logprobs=2, extra_body={
        "return_tokens_as_token_ids": True, "ignore_eos": True})
    for entry in chat.choices[0].logprobs.content:
        assert entry.token.startswith("token_id:") and bytes(entry.bytes) == \
            entry.token.encode()
        assert all(t.token.startswith("token_id:") for t in entry.top_logprobs)


def test_min_tokens_and_stop_token_ids(server):
    c = server.client()
    t0 = first_ids(c, 1)[0]
    stopped = c.completions.create(**GREEDY, extra_body={"stop_token_ids": [t0]})
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = c.completions.create(**GREEDY, extra_body={"stop_token_ids": [t0],
                                                      "min_tokens": 4})
    assert held.usage.completion_tokens >= 4


def test_ignore_eos_and_skip_special_tokens(server, tokenizer):
    eos = tokenizer.eos_token_id
    c = server.client()
    bias = {str(eos): 100}          # the model says eos at once
    r = c.completions.create(**GREEDY, logit_bias=bias)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = c.completions.create(**GREEDY, logit_bias=bias, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.choices[0].text == ""
    eos_text = tokenizer.convert_ids_to_tokens([eos])[0]
    r = c.completions.create(**GREEDY, logit_bias=bias, extra_body={
        "ignore_eos": True, "skip_special_tokens": False})
    assert r.choices[0].text == eos_text * 8


def test_include_stop_str_in_output(server):
    c = server.client()
    text = c.completions.create(**GREEDY, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[3:6]
    cut = text[:text.index(stop)]
    r = c.completions.create(**GREEDY, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    r = c.completions.create(**GREEDY, stop=[stop], extra_body={
        "ignore_eos": True, "include_stop_str_in_output": True})
    assert r.choices[0].text == cut + stop


def test_truncate_prompt_tokens(server, tokenizer):
    c = server.client()
    ids = tokenizer.encode(PROMPT)
    r = c.completions.create(**GREEDY, extra_body={"truncate_prompt_tokens": 3,
                                                   "ignore_eos": True})
    assert r.usage.prompt_tokens == 3
    same = c.completions.create(**{**GREEDY, "prompt": ids[-3:]},
                                extra_body={"ignore_eos": True})
    assert r.choices[0].text == same.choices[0].text
    whole = c.completions.create(**GREEDY, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == len(ids)
    chat = c.chat.completions.create(**CHAT, extra_body={"truncate_prompt_tokens": 2})
    assert chat.usage.prompt_tokens == 2
    for bad in (0, -2, 10**6):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(**GREEDY, extra_body={"truncate_prompt_tokens": bad})
        assert e.value.body["param"] == "truncate_prompt_tokens"


def test_prompt_logprobs(server, tokenizer):
    c = server.client()
    ids = tokenizer.encode(PROMPT)
    r = c.completions.create(**GREEDY, extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    # the prompt's own token is always there; with it, at most the 2 best
    echo = c.completions.create(**{**GREEDY, "max_tokens": 1}, echo=True, logprobs=2)
    scored = echo.choices[0].logprobs.token_logprobs[:len(ids)]
    for pos, (tid, row) in enumerate(zip(ids[1:], plp[1:]), 1):
        assert str(tid) in row and 1 <= len(row) <= 3
        assert row[str(tid)]["logprob"] == pytest.approx(scored[pos], abs=1e-4)
        ranks = sorted(e["rank"] for e in row.values() if e["rank"] is not None)
        assert ranks[:2] == [1, 2]
        assert row[str(tid)]["decoded_token"] == tokenizer.convert_ids_to_tokens([tid])[0]
    chat = c.chat.completions.create(**CHAT, extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    assert len(plp) == chat.usage.prompt_tokens and all(len(row) == 1 for row in plp[1:])
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(**GREEDY, stream=True, extra_body={"prompt_logprobs": 1})
    assert e.value.body["param"] == "prompt_logprobs"


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_continuous_usage_stats(server, route):
    c = server.client()
    kw = dict(stream=True, stream_options={"include_usage": True,
                                           "continuous_usage_stats": True},
              extra_body={"ignore_eos": True})
    if route == "completions":
        chunks = list(c.completions.create(**GREEDY, **kw))
    else:
        chunks = list(c.chat.completions.create(**CHAT, **kw))
    assert all(ch.usage is not None for ch in chunks)
    done = [ch.usage.completion_tokens for ch in chunks]
    assert done == sorted(done) and done[-1] == (8 if route == "completions" else 6)
    assert len({ch.usage.prompt_tokens for ch in chunks}) == 1
    assert chunks[-1].choices == []          # include_usage's last chunk stays last


def test_tools_only_with_tool_choice_none(server):
    c = server.client()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    plain = c.chat.completions.create(**CHAT)
    r = c.chat.completions.create(**CHAT, tools=tools, tool_choice="none")
    assert r.choices[0].message.content == plain.choices[0].message.content
    for choice in ("auto", "required", {"type": "function",
                                        "function": {"name": "get_weather"}}):
        with pytest.raises(openai.BadRequestError, match="tool") as e:
            c.chat.completions.create(**CHAT, tools=tools, tool_choice=choice)
        assert e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError, match="tool-call format"):
        c.chat.completions.create(**CHAT, tools=tools)            # default choice: auto


def test_responses_and_tool_history_round_trip(server):
    """The client appends its own response message (model_dump: refusal, annotations,
    tool_calls... as null) and a tool result, then asks again."""
    c = server.client()
    messages = [{"role": "user", "content": "hello world"}]
    r = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4)
    messages.append(r.choices[0].message.model_dump())
    messages.append({"role": "user", "content": "and again"})
    r2 = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    r3 = c.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=4,
                                   tool_choice="none")
    assert r3.choices[0].finish_reason in ("stop", "length")


def test_continue_final_message(server, tokenizer):
    msgs = [{"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "The answer is"}]
    with server.http() as h:
        t = h.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False,
                                      "continue_final_message": True}).json()
        rendered = tokenizer.apply_chat_template(msgs, add_generation_prompt=False)
        assert rendered.endswith("The answer is")
        assert t["tokens"] == tokenizer.encode(rendered)
        r = h.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": msgs, "continue_final_message": True,
            "add_generation_prompt": False, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == t["count"]
        r = h.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": msgs, "continue_final_message": True})
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "continue_final_message"


def test_chat_template_kwargs_refuses_the_servers_own(server):
    with server.http() as h:
        r = h.post("/v1/chat/completions", json={**CHAT, "chat_template_kwargs": {
            "messages": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


# ---- a server with a chat template that reads a variable, and CORS on ----------------

TEMPLATE = ("{% if shout %}LOUD {% endif %}{% for m in messages %}{{ m['role'] }}: "
            "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:"
            "{% endif %}")


@pytest.fixture(scope="module")
def templated(checkpoint, tmp_path_factory):
    import shutil

    from tests.api.conftest import launch, stop
    root = tmp_path_factory.mktemp("templated")
    ckpt = root / "ckpt"
    shutil.copytree(checkpoint, ckpt)
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    s = launch(ckpt, root / "tpaserve.log", "--allowed-origins", "https://app.example",
               "--max-num-seqs", "4")
    try:
        yield s
    finally:
        stop(s)


def test_chat_template_kwargs_and_continue_in_a_real_template(templated):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure,"}]
    with templated.http() as h:
        plain = h.post("/tokenize", json={"messages": msgs[:1]}).json()
        loud = h.post("/tokenize", json={"messages": msgs[:1],
                                         "chat_template_kwargs": {"shout": True}}).json()
        assert loud["count"] > plain["count"]
        r = h.post("/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": msgs[:1], "max_tokens": 1,
            "chat_template_kwargs": {"shout": True}}).json()
        assert r["usage"]["prompt_tokens"] == loud["count"]
        # the template ends each message with a newline: continuing cuts it off
        cont = h.post("/tokenize", json={"messages": msgs, "add_generation_prompt": False,
                                         "continue_final_message": True,
                                         "return_token_strs": True}).json()
        closed = h.post("/tokenize", json={"messages": msgs,
                                           "add_generation_prompt": False}).json()
        assert cont["tokens"] == closed["tokens"][:cont["count"]]
        assert cont["count"] < closed["count"]


def test_cors(templated, server):
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(f"{templated.url}/v1/chat/completions", headers=pre)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(f"{templated.url}/v1/chat/completions",
                      headers={**pre, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{templated.url}/v1/models", headers={
        "Origin": "https://app.example", **templated.headers()})
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    # the default: no CORS headers
    r = httpx.get(f"{server.url}/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers


def load_becomes(server, n: int, timeout: float = 10.0) -> bool:
    """/load reaches n (a request's count drops once its response is sent in full, a moment
    after the client read it)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if httpx.get(f"{server.url}/load").json() == {"server_load": n}:
            return True
        time.sleep(0.05)
    return False


def test_health_ping_load(server):
    for path in ("/health", "/ping"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
        r = httpx.head(f"{server.url}{path}")
        assert r.status_code == 200 and r.content == b""
    assert httpx.post(f"{server.url}/ping").status_code == 200
    assert load_becomes(server, 0)
    # one stream open: load 1 while it runs, 0 after
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 200, "stream": True,
            "ignore_eos": True}
    with server.http() as h, h.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        assert httpx.get(f"{server.url}/load").json() == {"server_load": 1}
        assert [line for line in lines if line][-1] == "data: [DONE]"
    assert load_becomes(server, 0)


def test_cors_flags_take_vllms_json_form_or_plain_values():
    from tpaserve.api.cli import build_parser
    from tpaserve.args import ServerArgs

    def cors(*argv: str):
        return ServerArgs.from_cli_args(build_parser().parse_args(list(argv))).cors()
    assert cors() is None
    assert cors("--allowed-origins", '["https://a.example", "https://b.example"]',
                "--allowed-methods", "GET", "POST", "--allow-credentials") == {
        "allow_origins": ["https://a.example", "https://b.example"],
        "allow_methods": ["GET", "POST"], "allow_headers": ["*"], "allow_credentials": True}
    with pytest.raises(SystemExit) as e:
        cors("--allowed-origins", "[not json")
    assert e.value.code == 2
