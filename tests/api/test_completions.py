"""/v1/completions through the official openai client (sync and async), against a real
server: text and token-id prompts, streaming, n > 1, seeds, usage, echo and logprobs
(checked against the model's own log-softmax over the prompt)."""
from __future__ import annotations

import asyncio
import math

import pytest

from tests.api.conftest import MODEL_NAME
from tests.reference import reference_prompt_logprobs

PROMPT = "the quick brown fox jumps over"
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def test_greedy_text_and_usage(server, tokenizer):
    c = server.client()
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id.startswith("cmpl-")
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert r.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    again = c.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    assert again.choices[0].text == choice.text


def test_default_max_tokens_is_16(server):
    r = server.client().completions.create(model=MODEL_NAME, prompt=PROMPT,
                                           extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16


def test_stream_equals_non_stream(server):
    c = server.client()
    whole = c.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    chunks = list(c.completions.create(model=MODEL_NAME, prompt=PROMPT, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stream_wire_format_ends_with_done(server):
    body = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=3, stream=True)
    with server.http() as h, h.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_n_greater_than_one(server):
    c = server.client()
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT, n=3, max_tokens=8, seed=7,
                             temperature=1.0, extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 24
    assert len({ch.text for ch in r.choices}) > 1          # siblings sample differently
    streamed = {0: "", 1: "", 2: ""}
    for ch in c.completions.create(model=MODEL_NAME, prompt=PROMPT, n=3, max_tokens=8, seed=7,
                                   temperature=1.0, stream=True,
                                   extra_body={"ignore_eos": True}):
        for choice in ch.choices:
            streamed[choice.index] += choice.text
    assert streamed == {ch.index: ch.text for ch in r.choices}


def test_seed_reproducible(server):
    c = server.client()

    def sample(seed: int) -> str:
        return c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10,
                                    temperature=1.0, seed=seed,
                                    extra_body={"ignore_eos": True}).choices[0].text
    a = sample(1234)
    assert sample(1234) == a
    assert any(sample(s) != a for s in (1, 2, 3))


def test_prompt_forms_and_choice_indices(server, tokenizer):
    c = server.client()
    ids = tokenizer.encode(PROMPT)
    by_text = c.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    by_ids = c.completions.create(model=MODEL_NAME, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    other = "hello world"
    many = c.completions.create(model=MODEL_NAME, prompt=[PROMPT, other], n=2, **GREEDY)
    assert [ch.index for ch in sorted(many.choices, key=lambda ch: ch.index)] == [0, 1, 2, 3]
    texts = {ch.index: ch.text for ch in many.choices}
    assert texts[0] == texts[1] == by_text.choices[0].text
    assert many.usage.prompt_tokens == len(ids) + len(tokenizer.encode(other))
    assert many.usage.completion_tokens == 4 * 12
    id_lists = c.completions.create(model=MODEL_NAME, prompt=[ids, tokenizer.encode(other)],
                                    **GREEDY)
    assert {ch.index: ch.text for ch in id_lists.choices} == {0: texts[0], 1: texts[2]}
    streamed = {}
    for ch in c.completions.create(model=MODEL_NAME, prompt=[PROMPT, other], stream=True,
                                   **GREEDY):
        for choice in ch.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert streamed == {0: texts[0], 1: texts[2]}


def test_stop_string(server):
    c = server.client()
    full = c.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY).choices[0].text
    stop = full[3:6]
    assert stop.strip()
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=[stop], **GREEDY)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]


def test_logprobs_shape(server, tokenizer):
    r = server.client().completions.create(model=MODEL_NAME, prompt=PROMPT, logprobs=3,
                                           **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[-1] <= len(r.choices[0].text)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 3 <= len(top) <= 4 and top[token] == pytest.approx(value)
        # greedy: the chosen token is the most likely one
        assert value == pytest.approx(max(top.values()))


def test_echo_logprobs_equal_model_log_softmax(server, tokenizer, ref_model):
    ids = tokenizer.encode(PROMPT)
    r = server.client().completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True,
                                           logprobs=2, **GREEDY)
    choice = r.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith(PROMPT) and len(lp.tokens) == len(ids) + 12
    assert lp.tokens[:len(ids)] == tokenizer.convert_ids_to_tokens(ids)
    ref = reference_prompt_logprobs(ref_model, ids, 2, vocab_size=tokenizer.vocab_size)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        want, want_top = ref[pos]
        assert lp.token_logprobs[pos] == pytest.approx(want, abs=1e-4)
        names = tokenizer.convert_ids_to_tokens([t for t, _ in want_top])
        for name, (_, value) in zip(names, want_top):
            assert lp.top_logprobs[pos][name] == pytest.approx(value, abs=1e-4)


def test_streamed_echo_with_logprobs_equals_the_whole_response(server):
    """The stream echoes the prompt with its logprobs first (in the step that completes the
    prompt), then the generated tokens; joined, it is the non-streamed choice."""
    c = server.client()
    whole = c.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=2,
                                 **GREEDY).choices[0]
    text, tokens, lps, offsets = "", [], [], []
    for chunk in c.completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True, logprobs=2,
                                      stream=True, **GREEDY):
        for ch in chunk.choices:
            if not text:
                assert ch.text.startswith(PROMPT)      # the echo comes first, whole
            text += ch.text
            if ch.logprobs is not None:
                tokens += ch.logprobs.tokens
                lps += ch.logprobs.token_logprobs
                offsets += ch.logprobs.text_offset
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert offsets == whole.logprobs.text_offset
    assert lps[0] is None and lps[1:] == pytest.approx(whole.logprobs.token_logprobs[1:], abs=1e-5)


def test_echo_with_zero_max_tokens_returns_the_prompt(server, tokenizer, ref_model):
    ids = tokenizer.encode(PROMPT)
    r = server.client().completions.create(model=MODEL_NAME, prompt=PROMPT, echo=True,
                                           max_tokens=0, logprobs=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    ref = reference_prompt_logprobs(ref_model, ids, 0, vocab_size=tokenizer.vocab_size)
    got = choice.logprobs.token_logprobs
    assert got[0] is None and len(got) == len(ids)
    assert got[1:] == pytest.approx([lp for lp, _ in ref[1:]], abs=1e-4)
    assert math.fsum(got[1:]) < 0


def test_echo_from_token_ids(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    r = server.client().completions.create(model=MODEL_NAME, prompt=ids, echo=True,
                                           max_tokens=0)
    assert r.choices[0].text == tokenizer.decode(ids)


def test_async_client(server):
    async def main():
        c = server.async_client()
        whole = await c.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
        text = ""
        async for ch in await c.completions.create(model=MODEL_NAME, prompt=PROMPT,
                                                   stream=True, **GREEDY):
            text += ch.choices[0].text if ch.choices else ""
        await c.close()
        return whole.choices[0].text, text
    whole, streamed = asyncio.run(main())
    assert whole == streamed and whole


def test_sampling_knobs_accepted(server):
    r = server.client().completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0.7, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, logit_bias={"5": -100}, user="u1",
        seed=3, extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1,
                            "min_tokens": 6, "stop_token_ids": [7], "ignore_eos": False})
    assert r.usage.completion_tokens == 6


def test_model_field_optional(server):
    with server.http() as h:
        r = h.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL_NAME


def test_multi_step_server_streams_the_same_text_in_fewer_chunks(server, start_server):
    """--num-scheduler-steps 4: decode rounds deliver several tokens per stream chunk;
    text, token counts and finish reasons equal the single-step server's."""
    ms = start_server("--num-scheduler-steps", "4", "--num-blocks", "512", api_key="k")
    ms.api_key = "k"
    want = server.client().completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    c = ms.client()
    whole = c.completions.create(model=MODEL_NAME, prompt=PROMPT, **GREEDY)
    assert whole.choices[0].text == want.choices[0].text
    assert whole.usage.completion_tokens == 12
    chunks = list(c.completions.create(model=MODEL_NAME, prompt=PROMPT, stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert "".join(texts) == want.choices[0].text
    assert len(texts) < 12                      # rounds of up to 4 tokens per chunk
    assert chunks[-1].usage.completion_tokens == 12
    stop = want.choices[0].text[5:7]
    cut = c.completions.create(model=MODEL_NAME, prompt=PROMPT, stop=[stop], **GREEDY)
    assert cut.choices[0].text == want.choices[0].text[:want.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
