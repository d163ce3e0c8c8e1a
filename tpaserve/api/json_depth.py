"""A nesting-depth limit on request bodies, applied before anything walks them recursively.

Validation (pydantic, the Unicode check in protocol.py, chat templates) recurses into the
values it checks, so a body nested a few hundred levels deep in some field used to end in a
RecursionError: a 500 and a long traceback per request. `check_depth` runs first, on the raw
body, and refuses such a body with a 400 naming the top-level field.

It costs nothing for ordinary bodies: the count of '[' and '{' bytes is an upper bound of
the depth, so only a body with more than MAX_JSON_DEPTH of them is parsed here, and then
walked with an explicit stack (never recursion). Bodies Python's own JSON parser cannot
read (deeper than its recursion limit, malformed) are left to FastAPI, which answers 400.
"""
from __future__ import annotations

import json

from tpaserve.exceptions import RequestRejected

# Containers inside containers, the body's object counted as 1. OpenAI bodies need a few
# (messages -> content parts); a JSON schema for structured outputs needs two per level of
# nested objects, so 64 leaves room for schemas 30 objects deep.
MAX_JSON_DEPTH = 64


def check_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> None:
    """Raises RequestRejected (a 400; param: the top-level field) if `body` nests deeper than
    `limit` containers."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return                                   # FastAPI parses it again and says why
    field = _too_deep(value, limit)
    if field is not None:
        where = f"{field}: " if field else "the request body "
        raise RequestRejected(f"{where}nests deeper than {limit} levels of arrays and "
                              f"objects", field or None)


def _too_deep(value: object, limit: int) -> str | None:
    """The top-level field ("" for the body itself) of the first path deeper than `limit`,
    or None."""
    stack: list[tuple[object, int, str]] = [(value, 1, "")]
    while stack:
        v, depth, field = stack.pop()
        if depth > limit:
            return field
        if isinstance(v, dict):
            stack.extend((x, depth + 1, field or str(k)) for k, x in v.items()
                         if isinstance(x, (dict, list)))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, field) for x in v if isinstance(x, (dict, list)))
    return None
