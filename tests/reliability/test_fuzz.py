"""Schemathesis against the app's own OpenAPI document, in process: the FastAPI app from
build_app over a real AsyncLLM (its engine core a spawned process) and a tiny model, driven through ASGI (no socket), every
operation, data that fits the schema (positive) and data that does not (negative).

What must hold for every generated request:
  * no 5xx (not_a_server_error);
  * the status, content type, headers and body are the documented ones (status_code /
    content_type / response_headers / response_schema conformance); streamed responses are
    checked event by event against the documented SSE item schema;
  * every 4xx is exactly the OpenAI error body {"error": {message, type, param, code}};
  * schema-invalid data is refused with a 4xx (negative_data_rejection): nothing the schema
    forbids gets through lax coercion (true for an int, "3" for a number, negative
    max_tokens, ...). The value ranges in the schema are the ones SamplingParams enforces
    (protocol.py writes them in), so this also checks the document against the validator.

Not checked: positive_data_acceptance. The schema cannot say what depends on the model or
on other fields (token ids < vocabulary, prompt + max_tokens <= context, min_tokens <=
max_tokens, top_logprobs without logprobs...), so some schema-valid requests get 400s.

Examples per operation and mode: TPASERVE_FUZZ_EXAMPLES (default 40, derandomized so CI is
reproducible; set TPASERVE_FUZZ_SEED to explore other examples).
"""
from __future__ import annotations

import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import make_async_llm
from tests.reliability.common import check_error_body
from tests.reliability.conftest import API_KEY, MODEL_NAME
from tpaserve.api.server import build_app
from tpaserve.args import ServerArgs

EXAMPLES = int(os.environ.get("TPASERVE_FUZZ_EXAMPLES") or 40)
SEED = os.environ.get("TPASERVE_FUZZ_SEED")
CONTEXT = 64            # small, so that generated max_tokens and n finish quickly

OPERATIONS = [
    ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info"),
    ("GET", "/v1/models"), ("GET", "/v1/models/{model}"),
    ("GET", "/health"), ("GET", "/version"), ("GET", "/metrics"),
]
# every operation with valid data; invalid data where there is a body to spoil (a path
# parameter takes any string)
RUNS = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + \
       [(m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"]


def openai_error_body(ctx, response, case) -> bool | None:
    """Every 4xx/5xx is exactly OpenAI's error body (no FastAPI `detail`, no extra keys)."""
    if response.status_code < 400:
        return None
    check_error_body(json.loads(response.content))
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          openai_error_body]


@pytest.fixture(scope="module")
def schema(checkpoint):
    # room for n = 128 sequences at once: the soak, not the fuzzer, exercises preemption
    llm = make_async_llm(checkpoint, num_blocks=128 * CONTEXT // 16, block_size=16,
                         max_model_len=CONTEXT, max_num_seqs=128)
    app = build_app(llm, MODEL_NAME, ServerArgs(api_key=API_KEY,
                                               max_request_body_bytes=256 * 1024))
    loaded = schemathesis.openapi.from_asgi("/openapi.json", app,
                                            headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        yield loaded
    finally:
        shutdown_lifespans()          # the app's lifespan: stops the engine core process
        llm.shutdown(timeout=5)


def test_every_operation_is_fuzzed(schema):
    documented = {(method.upper(), path) for path, methods in schema.raw_schema["paths"].items()
                  for method in methods}
    assert documented == set(OPERATIONS)


def test_streams_and_errors_are_documented(schema):
    paths = schema.raw_schema["paths"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
        assert {"400", "404", "413", "500", "503"} <= set(responses)
        assert "422" not in responses           # validation errors are 400s here
        assert "Retry-After" in responses["503"]["headers"]
    assert set(paths["/health"]["get"]["responses"]) >= {"200", "503"}


@pytest.mark.parametrize("method,path,mode", RUNS, ids=[f"{m}-{p}-{g}" for m, p, g in RUNS])
def test_fuzz(schema, method, path, mode):
    operation = schema[path][method]
    cases = operation.as_strategy(generation_mode=mode)
    if "{model}" in path and mode is GenerationMode.POSITIVE:
        # random names are 404s; the served name must come up too
        cases = cases | operation.as_strategy(path_parameters={"model": MODEL_NAME})

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED is None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def run(case):
        r = case.call_and_validate(headers={"Authorization": f"Bearer {API_KEY}"},
                                   checks=CHECKS, timeout=60)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

    statuses: dict[int, int] = {}

    if SEED is not None:
        run = seed(int(SEED))(run)
    run()
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses, f"no example was served: {statuses}"
