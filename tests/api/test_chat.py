"""/v1/chat/completions through the openai client: the tokenizer's chat template, streaming
(role first), usage, finish reasons, logprobs in the chat shape."""
from __future__ import annotations

import asyncio

import pytest

from tests.api.conftest import MODEL_NAME
from tpaserve.api.chat import encode_chat
from tpaserve.api.protocol import ChatMessage

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello world"}]
GREEDY = dict(temperature=0, max_tokens=10, extra_body={"ignore_eos": True})


def prompt_ids(tokenizer, messages=MESSAGES) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages))


def test_chat_non_stream(server, tokenizer):
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt_ids(tokenizer))
    assert r.usage.completion_tokens == 10


def test_prompt_is_the_chat_template_rendered(server, tokenizer):
    """The chat request must generate exactly what a completion of the rendered template
    generates (same prompt ids, greedy)."""
    c = server.client()
    chat = c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    plain = c.completions.create(model=MODEL_NAME, prompt=prompt_ids(tokenizer), **GREEDY)
    assert chat.choices[0].message.content == plain.choices[0].text


def test_content_parts(server):
    c = server.client()
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are "},
                                            {"type": "text", "text": "terse."}]},
             MESSAGES[1]]
    a = c.chat.completions.create(model=MODEL_NAME, messages=parts, **GREEDY)
    b = c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_stream(server):
    c = server.client()
    whole = c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **GREEDY)
    chunks = list(c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.finish_reason is None
    assert all(ch.choices[0].delta.role is None for ch in chunks[1:] if ch.choices)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_n_and_stream_indices(server):
    c = server.client()
    kw = dict(model=MODEL_NAME, messages=MESSAGES, n=2, seed=11, max_tokens=6,
              temperature=1.0, extra_body={"ignore_eos": True})
    whole = c.chat.completions.create(**kw)
    assert sorted(ch.index for ch in whole.choices) == [0, 1]
    roles, texts = set(), {0: "", 1: ""}
    for ch in c.chat.completions.create(stream=True, **kw):
        for choice in ch.choices:
            if choice.delta.role:
                roles.add(choice.index)
            texts[choice.index] += choice.delta.content or ""
    assert roles == {0, 1}
    assert texts == {ch.index: ch.message.content for ch in whole.choices}


def test_chat_logprobs(server, tokenizer):
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=MESSAGES,
                                                logprobs=True, top_logprobs=3, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 10
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)   # greedy
        assert entry.top_logprobs[0].token == entry.token
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token or \
            entry.token.startswith("bytes:")
    streamed = []
    for ch in server.client().chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, logprobs=True, top_logprobs=3, stream=True,
            **GREEDY):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])


def test_chat_stop_and_max_completion_tokens(server):
    c = server.client()
    r = c.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, temperature=0,
                                  max_completion_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def test_async_chat(server):
    async def main():
        c = server.async_client()
        rs = await asyncio.gather(*(c.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, **GREEDY) for _ in range(3)))
        await c.close()
        return [r.choices[0].message.content for r in rs]
    texts = asyncio.run(main())
    assert len(set(texts)) == 1


class _BosTemplateTokenizer:
    """A tokenizer whose template writes the BOS text and whose encode parses it (as
    tokenizer.json tokenizers do)."""
    bos_token_id = 1

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return "<s>" + "".join(m["content"] for m in messages)

    def encode(self, text, add_special_tokens=True):
        ids = [1] if text.startswith("<s>") else []
        ids += [ord(c) for c in text.removeprefix("<s>")]
        return ([1] if add_special_tokens else []) + ids


def test_encode_chat_never_doubles_bos():
    tok, msgs = _BosTemplateTokenizer(), [ChatMessage(role="user", content="ab")]
    assert encode_chat(tok, msgs, True, None) == [1, 97, 98]
    assert encode_chat(tok, msgs, True, False) == [1, 97, 98]
    assert encode_chat(tok, msgs, True, True) == [1, 1, 97, 98]      # asked for explicitly
