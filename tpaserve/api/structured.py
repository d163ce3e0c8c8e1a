"""Structured outputs over HTTP: the request fields that constrain the output, mapped to one
StructuredOutputsParams (tpaserve/structured_outputs.py), with each error naming the field
the client sent.

    response_format   OpenAI: {"type": "text" | "json_object"} or {"type": "json_schema",
                      "json_schema": {"name": str, "schema": {...}, "strict": bool}}
    structured_outputs  vLLM: {"json": schema | str, "regex": str, "choice": [str],
                      "grammar": str (Lark), "json_object": true}, one of them
    guided_json, guided_regex, guided_choice, guided_grammar   vLLM's older spelling

At most one of these may be given (a 400 says which ones clashed). A malformed schema,
regex or grammar is a 400 whose `param` is the field and whose message is llguidance's.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from tpaserve.api.errors import bad_request
from tpaserve.api.protocol import SamplingRequest
from tpaserve.exceptions import SamplingParamsError
from tpaserve.sampling_params import SamplingParams
from tpaserve.structured_outputs import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}
_VLLM_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def with_structured_outputs(params: SamplingParams, body: SamplingRequest) -> SamplingParams:
    """`params` with the body's output constraint, if it has one. Raises a 400 APIError."""
    given = [f for f in ("response_format", "structured_outputs", *_GUIDED)
             if getattr(body, f, None) is not None]
    if getattr(body, "response_format", None) is not None and \
            body.response_format.get("type") == "text":
        given.remove("response_format")               # the default: no constraint
    if not given:
        return params
    if len(given) > 1:
        raise bad_request(f"give at most one output constraint; got {', '.join(given)}",
                          given[1])
    field = given[0]
    if field == "response_format":
        kwargs, names = _response_format(body.response_format)
    elif field == "structured_outputs":
        kwargs, names = _vllm(body.structured_outputs)
    else:
        kwargs = {_GUIDED[field]: getattr(body, field)}
        names = {f"structured_outputs.{_GUIDED[field]}": field}
    try:
        spec = StructuredOutputsParams(**kwargs)
    except SamplingParamsError as e:
        sent = names.get(e.param, e.param if field == "structured_outputs" else field)
        raise bad_request(sent + str(e).removeprefix(e.param), sent) from e
    return dataclasses.replace(params, structured_outputs=spec)


def _response_format(rf: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    kind = rf.get("type")
    if kind == "json_object":
        return {"json_object": True}, {"structured_outputs.json_object": "response_format"}
    if kind != "json_schema":
        raise bad_request(f"response_format.type must be 'text', 'json_object' or "
                          f"'json_schema', got {kind!r}", "response_format.type")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad_request("response_format.json_schema must be an object with a 'schema'",
                          "response_format.json_schema")
    schema = js.get("schema")
    if not isinstance(schema, dict):
        raise bad_request(f"response_format.json_schema.schema must be a JSON schema (an "
                          f"object), got {schema!r}", "response_format.json_schema.schema")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad_request(f"response_format.json_schema.strict must be a boolean, got "
                          f"{strict!r}", "response_format.json_schema.strict")
    return {"json": schema, "strict": bool(strict)}, {
        "structured_outputs.json": "response_format.json_schema.schema"}


def _vllm(so: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    unknown = sorted(set(so) - set(_VLLM_KEYS))
    if unknown:
        raise bad_request(f"structured_outputs.{unknown[0]} is not supported; give one of "
                          f"{', '.join(_VLLM_KEYS)}", f"structured_outputs.{unknown[0]}")
    return dict(so), {}
