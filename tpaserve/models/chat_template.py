"""Chat templates: turn an OpenAI-style message list into prompt text.

Where the template comes from, first match wins (the Hugging Face conventions):
  1. `chat_template.jinja` next to the tokenizer;
  2. the "chat_template" string in the tokenizer's `tokenizer_config.json` (or, when that is
     a list of {"name", "template"}, the one named "default", else the first);
  3. DEFAULT_CHAT_TEMPLATE, a plain transcript with one "Role: content" line per message
     (role capitalised), lines separated by "\\n", and a last line "Assistant:" when
     add_generation_prompt is set:

         System: You are terse.
         User: Hi
         Assistant:

Invariant: a template only ever sees validated messages: role is one of ALLOWED_ROLES and
content is a str (a list of {"type": "text", "text": ...} parts is concatenated; None is "").
Templates render in jinja2's immutable sandbox with the variables `messages`,
`add_generation_prompt`, `bos_token`, `eos_token` and the helpers templates on the Hub use:
`raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that keeps non-ASCII text.
Every failure (bad message, template syntax, raise_exception) is a ChatTemplateError, a
ValueError, so the HTTP layer can answer 400.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tpaserve.exceptions import ChatTemplateError

ALLOWED_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})

# Whitespace control ("-") makes the output independent of trim_blocks / lstrip_blocks.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{{ '\\n' if not loop.last or add_generation_prompt else '' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)

TEMPLATE_FILE = "chat_template.jinja"


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # jinja2's own tojson escapes <, >, & and non-ASCII for HTML; prompts want the text as is.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    # trim_blocks / lstrip_blocks: the settings Hub templates are written against.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    return env


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatTemplateError(
            f"{where}.content must be a string or a list of text parts, "
            f"got {type(content).__name__}")
    texts: list[str] = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text":
            raise ChatTemplateError(
                f"{where}.content[{k}]: part type {kind!r} is not supported; "
                "only {'type': 'text', 'text': ...} parts are")
        text = part.get("text")
        if not isinstance(text, str):
            raise ChatTemplateError(f"{where}.content[{k}].text must be a string, got {text!r}")
        texts.append(text)
    return "".join(texts)


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Validated copies of `messages` with str content; other keys pass through untouched."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for n, message in enumerate(messages):
        where = f"messages[{n}]"
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ChatTemplateError(
                f"{where}: unknown role {role!r}; expected one of {sorted(ALLOWED_ROLES)}")
        out.append({**message, "content": _content_text(message.get("content"), where)})
    return out


class ChatTemplate:
    """A compiled jinja2 chat template and where it came from (for error messages)."""

    def __init__(self, source: str, origin: str):
        self.source = source
        self.origin = origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template from {origin} does not compile: {e}") from e

    @classmethod
    def default(cls) -> ChatTemplate:
        return cls(DEFAULT_CHAT_TEMPLATE, "the built-in default")

    @classmethod
    def find(cls, tokenizer_dir: Path, tokenizer_config: Mapping[str, Any]) -> ChatTemplate:
        """The template for a tokenizer in `tokenizer_dir` (see the module docstring)."""
        file = tokenizer_dir / TEMPLATE_FILE
        if file.is_file():
            return cls(file.read_text(encoding="utf-8"), str(file))
        origin = f"{tokenizer_dir / 'tokenizer_config.json'} (chat_template)"
        source = tokenizer_config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default", next(iter(named.values()), None))
        if source is None:
            return cls.default()
        if not isinstance(source, str):
            raise ChatTemplateError(f"{origin} must be a string, got {type(source).__name__}")
        return cls(source, origin)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
        """`extra`: more variables for the template (a request's chat_template_kwargs, e.g.
        enable_thinking); they cannot replace the ones named here."""
        normalized = normalize_messages(messages)
        try:
            return self._template.render(
                **extra, messages=normalized, add_generation_prompt=add_generation_prompt,
                bos_token=bos_token, eos_token=eos_token)
        except ChatTemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, LookupError, AttributeError,
                ArithmeticError) as e:
            # a template computing on the request's values (extra variables of any JSON
            # type included) fails on the request: a 400, never a 500
            raise ChatTemplateError(f"chat template from {self.origin} failed: {e}") from e
