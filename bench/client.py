"""One streamed OpenAI request, timed: the only place bench/ speaks HTTP to a model server.

Timing rule (as in vLLM's benchmark_serving, so numbers compare): the clock starts just
before the request is sent. An arrival is an SSE event whose choice carries non-empty text
(completions) or delta content (chat), or a finish_reason; role-only and usage-only events
are not arrivals. A server that holds back a token's text (an incomplete UTF-8 sequence, a
skipped special token) delivers it with a later arrival. The first arrival is TTFT, the gaps
between later arrivals are the inter-token latencies (ITL); end-to-end latency ends at
`data: [DONE]`. Output tokens are usage.completion_tokens (stream_options.include_usage)
when the server reports it, else the number of arrivals.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from bench.workload import RequestSpec

DONE = object()         # the `data: [DONE]` sentinel


@dataclass
class RequestResult:
    ok: bool = False
    status: str = ""                    # HTTP status code, or an exception's class name
    error: str = ""
    prompt_len: int = 0                 # usage.prompt_tokens, else the workload's length
    output_tokens: int = 0
    ttft: float = 0.0                   # s
    latency: float = 0.0                # s, end to end
    itl: list[float] = field(default_factory=list)    # s, gaps between arrivals
    start: float = 0.0                  # perf_counter at send


def parse_sse_line(line: str) -> dict | object | None:
    """One SSE line -> its parsed `data:` payload, DONE for `data: [DONE]`, None for
    anything else (comments, blank lines, event:/id: fields). Every OpenAI event is a
    single data line."""
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    return DONE if payload == "[DONE]" else json.loads(payload)


def request_body(spec: RequestSpec, model: str, endpoint: str,
                 extra: dict | None = None) -> dict:
    """The JSON body; `extra` fields (e.g. temperature), then the spec's own, override the
    defaults."""
    body: dict = dict(model=model, max_tokens=spec.output_len, ignore_eos=True, stream=True,
                      stream_options={"include_usage": True}, temperature=0.0)
    if endpoint == "chat":
        if not isinstance(spec.prompt, str):
            raise ValueError("the chat endpoint takes text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    return body | (extra or {}) | (spec.extra or {})


def _delivers(choice: dict) -> bool:
    """Whether a completions or chat chunk's choice is an arrival (see the timing rule)."""
    text = choice.get("text") or (choice.get("delta") or {}).get("content")
    return bool(text) or choice.get("finish_reason") is not None


ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


async def send(client: httpx.AsyncClient, base_url: str, spec: RequestSpec, model: str,
               endpoint: str = "completions", headers: dict | None = None,
               extra_body: dict | None = None) -> RequestResult:
    """Stream one request and time it; never raises (failures are in the result)."""
    res = RequestResult(prompt_len=spec.prompt_len)
    url = base_url + ENDPOINT_PATHS[endpoint]
    body = request_body(spec, model, endpoint, extra_body)
    arrivals: list[float] = []
    res.start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            res.status = str(resp.status_code)
            if resp.status_code != 200:
                res.error = (await resp.aread()).decode(errors="replace")[:500]
                return res
            done = False
            async for line in resp.aiter_lines():
                now = time.perf_counter()                 # before parsing: when it came
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event is DONE:
                    done = True
                    break
                if "error" in event:
                    res.status = "stream-error"
                    res.error = json.dumps(event["error"])[:500]
                    return res
                if any(_delivers(c) for c in event.get("choices") or ()):
                    arrivals.append(now)
                if event.get("usage"):
                    usage = event["usage"]
                    res.output_tokens = usage.get("completion_tokens") or 0
                    res.prompt_len = usage.get("prompt_tokens") or res.prompt_len
            end = time.perf_counter()
    except (httpx.HTTPError, OSError, json.JSONDecodeError) as e:
        res.status, res.error = type(e).__name__, str(e)[:500]
        return res
    if not done or not arrivals:
        res.status = "incomplete"
        res.error = "stream ended without [DONE]" if not done else "nothing streamed"
        return res
    res.ok = True
    res.ttft = arrivals[0] - res.start
    res.itl = [b - a for a, b in zip(arrivals, arrivals[1:])]
    res.latency = end - res.start
    res.output_tokens = res.output_tokens or len(arrivals)
    return res
