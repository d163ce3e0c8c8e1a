"""StructuredOutputsParams: a constraint on what a request may generate, and its grammar.

Exactly one of `json` (a JSON schema), `json_object` (any JSON object), `regex`, `choice`
(one of these strings) or `grammar` (a Lark grammar, llguidance's dialect) is given, as in
vLLM's StructuredOutputsParams. The constraint compiles to one llguidance grammar string
(`grammar_text()`); llguidance (MIT, no torch) validates it here, where the request enters
(a SamplingParamsError naming `structured_outputs.<kind>` and quoting llguidance's message),
and the engine core compiles it against the tokenizer off its step loop (core/structured.py).

JSON is generated compactly (no whitespace between tokens: llguidance's
`whitespace_flexible: false`): a small model cannot wander into endless blank lines, and
the text is what `json.dumps(..., separators=(",", ":"))` would print. `strict` (OpenAI's
json_schema.strict) makes a schema keyword llguidance does not implement an error; without
it such keywords are ignored (llguidance's `lenient`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import llguidance

from tpaserve.exceptions import SamplingParamsError

__all__ = ["StructuredOutputsParams"]

_KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 1 << 20          # a schema/grammar longer than 1 MiB is refused


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | None = None               # a JSON schema, given as a dict or as its JSON text
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None            # Lark (llguidance), e.g. 'start: "yes" | "no"'
    strict: bool = False                  # json only: unknown schema keywords are errors

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.json, dict):
            put("json", json.dumps(self.json))          # key order kept: it is the output's
        if isinstance(self.choice, list):
            put("choice", tuple(self.choice))
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError(
                "structured_outputs", given or None,
                f"must give exactly one of {', '.join(_KINDS)}")
        kind = given[0]
        field = f"structured_outputs.{kind}"
        if kind in ("json", "regex", "grammar"):
            v = getattr(self, kind)
            if not isinstance(v, str):
                raise SamplingParamsError(field, v, "must be a string" + (
                    " or an object" if kind == "json" else ""))
            if len(v) > MAX_SPEC_CHARS:
                raise SamplingParamsError(field, f"<{len(v)} characters>",
                                          f"must be at most {MAX_SPEC_CHARS} characters")
        if kind == "json_object" and self.json_object is not True:
            raise SamplingParamsError(field, self.json_object, "must be true")
        if kind == "choice" and (not isinstance(self.choice, tuple) or not self.choice or
                                 not all(isinstance(c, str) and c for c in self.choice)):
            raise SamplingParamsError(field, self.choice,
                                      "must be a non-empty list of non-empty strings")
        if not isinstance(self.strict, bool):
            raise SamplingParamsError("structured_outputs.strict", self.strict,
                                      "must be a boolean")
        try:
            error = llguidance.LLMatcher.validate_grammar(self.grammar_text())
        except SamplingParamsError:
            raise
        except Exception as e:             # llguidance refuses what it cannot even parse
            error = f"{type(e).__name__}: {e}"
        if error:
            raise SamplingParamsError(field, _short(getattr(self, kind)),
                                      f"is not valid: {error.strip()}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def grammar_text(self) -> str:
        """The llguidance grammar (its JSON form) of this constraint. Raises
        SamplingParamsError when a `json` string is not JSON."""
        m = llguidance.LLMatcher
        if self.json is not None or self.json_object:
            schema: Any = {"type": "object"} if self.json_object else self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as e:
                    raise SamplingParamsError("structured_outputs.json", _short(self.json),
                                              f"is not valid JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise SamplingParamsError("structured_outputs.json", _short(self.json),
                                          "must be a JSON schema (an object)")
            options = {"whitespace_flexible": False, "lenient": not self.strict}
            return m.grammar_from_json_schema(schema, overrides=options)
        if self.regex is not None:
            return m.grammar_from_regex(self.regex)
        if self.choice is not None:
            # Lark string literals (JSON's escapes: \" \\ \n ...)
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
            return m.grammar_from_lark(f"start: {alts}")
        return m.grammar_from_lark(self.grammar)


def _short(v: Any, limit: int = 80) -> Any:
    s = v if isinstance(v, str) else repr(v)
    return s if len(s) <= limit else s[:limit] + "..."
