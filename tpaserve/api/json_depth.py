"""A nesting-depth limit on request bodies, applied before anything walks them recursively.

Validation (pydantic, the Unicode check in protocol.py, chat templates) recurses into the
values it checks, so a body nested a few hundred levels deep in some field used to end in a
RecursionError: a 500 and a long traceback per request. `check_depth` runs first, on the
parsed body, and refuses such a body with a 400 naming the top-level field.

It walks with an explicit stack (never recursion) and looks only at containers: a list of
scalars (a token-id prompt) is passed over with one C-level pass over its element types.
The body is parsed once: the route parses it through Starlette's `request.json()`, which
caches the value for FastAPI's own handler. Bodies Python's JSON parser cannot read (deeper
than its recursion limit, malformed) are left to FastAPI, which answers 400.
"""
from __future__ import annotations

from tpaserve.exceptions import RequestRejected

# Containers inside containers, the body's object counted as 1. OpenAI bodies need a few
# (messages -> content parts); a JSON schema for structured outputs needs two per level of
# nested objects, so 64 leaves room for schemas 30 objects deep.
MAX_JSON_DEPTH = 64
_CONTAINERS = (dict, list)


def check_depth(value: object, limit: int = MAX_JSON_DEPTH) -> None:
    """Raises RequestRejected (a 400; param: the top-level field) if the parsed JSON
    `value` nests deeper than `limit` containers."""
    stack: list[tuple[object, int, str]] = [(value, 1, "")]
    while stack:
        v, depth, field = stack.pop()
        if depth > limit:
            where = f"{field}: " if field else "the request body "
            raise RequestRejected(f"{where}nests deeper than {limit} levels of arrays and "
                                  f"objects", field or None)
        if type(v) is dict:
            stack.extend((x, depth + 1, field or str(k)) for k, x in v.items()
                         if type(x) in _CONTAINERS)
        elif type(v) is list and not set(map(type, v)).isdisjoint(_CONTAINERS):
            stack.extend((x, depth + 1, field) for x in v if type(x) in _CONTAINERS)
