"""Structured outputs over HTTP, on the bundled demo model (t6-demo) through a real server
and the official openai client: response_format json_schema outputs parse and validate
(jsonschema), regex and choice constraints hold (vLLM's structured_outputs and guided_*
spellings), unconstrained requests batched with constrained ones get exactly their
unconstrained text, streaming gives the same text, and every malformed constraint is a 400
whose `param` names the field."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest

from tests.api.conftest import Server

MODEL = "t6-demo"
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
                         "age": {"type": "integer", "minimum": 1, "maximum": 99},
                         "kind": {"enum": ["lady", "gentleman", "child"]}},
          "required": ["name", "age", "kind"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema",
                   "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
EMAIL = r"[a-z]{3,8}@[a-z]{3,6}\.(com|org)"
CHOICES = ["Elizabeth", "Jane", "Mr. Darcy"]
PROMPTS = ["Describe Elizabeth", "Who is Mr. Bingley?", "Tell me about Jane",
           "Lydia ran off with", "Mrs. Bennet said", "A single man in possession",
           "Lady Catherine", "The ball at Netherfield", "Mr. Collins proposed",
           "Charlotte Lucas", "Pemberley", "Mr. Wickham", "Kitty and Lydia",
           "Mary played the piano", "Georgiana Darcy", "Colonel Fitzwilliam",
           "Sir William Lucas", "The letter", "Longbourn", "Meryton"]


async def _gather(server: Server, calls):
    async with server.async_client(timeout=300.0) as client:
        return await asyncio.gather(*(c(client) for c in calls))


def test_json_schema_outputs_of_20_prompts_parse_and_validate(demo_server):
    def call(i: int, prompt: str):
        knobs = dict(temperature=0) if i % 2 else dict(temperature=0.8, seed=i)
        return lambda c: c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=48,
            response_format=RESPONSE_FORMAT, **knobs)
    outs = asyncio.run(_gather(demo_server, [call(i, p) for i, p in enumerate(PROMPTS)]))
    for out in outs:
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_regex_and_choice_hold_in_every_spelling(demo_server):
    client = demo_server.client(timeout=300.0)
    base = dict(model=MODEL, prompt="Her letter was addressed to", max_tokens=24)
    for extra in ({"structured_outputs": {"regex": EMAIL}}, {"guided_regex": EMAIL}):
        out = client.completions.create(**base, n=2, temperature=1.0, seed=3, extra_body=extra)
        for c in out.choices:
            assert re.fullmatch(EMAIL, c.text) and c.finish_reason == "stop", (extra, c)
    for extra in ({"structured_outputs": {"choice": CHOICES}}, {"guided_choice": CHOICES}):
        out = client.completions.create(**base, n=3, temperature=1.0, extra_body=extra,
                                        logprobs=5)
        assert all(c.text in CHOICES and c.finish_reason == "stop" for c in out.choices), out
        # the masked distribution's logprobs: only tokens that can start a choice are listed
        first = out.choices[0].logprobs.top_logprobs[0]
        assert first and all(any(ch.startswith(t) for ch in CHOICES) for t in first), first
    grammar = 'start: "Dear " NAME ","\nNAME: /[A-Z][a-z]{2,7}/'
    out = client.completions.create(**base, temperature=0,
                                    extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"Dear [A-Z][a-z]{2,7},", out.choices[0].text), out.choices[0].text


def test_unconstrained_requests_keep_their_output_beside_constrained_ones(demo_server):
    prompts = PROMPTS[:4]

    def plain(p):
        return lambda c: c.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                              temperature=0)

    def constrained(p):
        return lambda c: c.completions.create(
            model=MODEL, prompt=p, max_tokens=24, temperature=0,
            extra_body={"structured_outputs": {"json": PERSON}})
    alone = asyncio.run(_gather(demo_server, [plain(p) for p in prompts]))
    mixed = asyncio.run(_gather(demo_server, [f(p) for p in prompts
                                              for f in (plain, constrained)]))
    assert [o.choices[0].text for o in mixed[::2]] == [o.choices[0].text for o in alone]


def test_streaming_gives_the_same_text(demo_server):
    client = demo_server.client(timeout=300.0)
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Describe Jane"}],
              max_tokens=48, temperature=0, response_format=RESPONSE_FORMAT)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = client.chat.completions.create(**kw, stream=True)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == full
    jsonschema.validate(json.loads(full), PERSON)
    kw = dict(model=MODEL, prompt="Write to", max_tokens=24, temperature=0,
              extra_body={"guided_regex": EMAIL})
    full = client.completions.create(**kw).choices[0].text
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True))
    assert streamed == full and re.fullmatch(EMAIL, full)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "strin"}}}}, "response_format.json_schema.schema",
     "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", "JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": PERSON, "strict": "yes"}}}, "response_format.json_schema.strict",
     "boolean"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex", "unclosed group"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json", "not valid JSON"),
    ({"structured_outputs": {"json": 5}}, "structured_outputs.json", "string or an object"),
    ({"structured_outputs": {"pattern": "a"}}, "structured_outputs.pattern", "not supported"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
    ({"guided_json": "{bad"}, "guided_json", "not valid JSON"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "at most one"),
    ({"guided_choice": [1, 2]}, "guided_choice[0]", "valid string"),
]


@pytest.mark.parametrize("extra,param,says", BAD, ids=[b[1] + f"-{i}" for i, b in enumerate(BAD)])
def test_malformed_constraints_are_400_naming_the_field(demo_server, extra, param, says):
    client = demo_server.client()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}],
                                       extra_body=extra)
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    assert says in err["message"], err
