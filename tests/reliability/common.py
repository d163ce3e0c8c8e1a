"""Helpers shared by the reliability tests: OpenAI error bodies, /metrics, /proc, SSE, and the
expected output of a greedy request.

The oracle for generated text is `reference_generate` (the naive, cache-free model run):
its tokens, rendered to text by the same detokenizer and stop-string matcher the engine uses,
token by token as the engine feeds them. Under load (batching, preemption, disconnects of
other requests) a completed request must still produce exactly that.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tpaserve.frontend.sequence import SequenceState, StopStringMatcher
from tpaserve.models.detokenizer import IncrementalDetokenizer
from tpaserve.sampling_params import SamplingParams

ERROR_KEYS = {"message", "type", "param", "code"}


def error_of(r: httpx.Response, status: int) -> dict:
    """The `error` object of an OpenAI error response with this status (shape checked)."""
    assert r.status_code == status, f"{r.status_code} != {status}: {r.text[:500]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    return check_error_body(r.json())


def check_error_body(body: object) -> dict:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], str), err
    assert "Traceback" not in err["message"], err
    return err


def metrics(url: str) -> dict[str, float]:
    """Every sample on /metrics as {"name{label=value,...}": value}, labels sorted."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (KeyError if none)."""
    want = [f"{k}={v}" for k, v in labels.items()]
    hits = [v for k, v in samples.items()
            if k.split("{", 1)[0] == name and all(w in k for w in want)]
    if not hits:
        raise KeyError(f"no sample {name}{labels} on /metrics")
    return sum(hits)


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS in /proc/PID/status), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def core_pid(server) -> int:
    """The engine core process of a server, from its start-up log line."""
    m = re.search(r"engine core process (\d+)", server.log.read_text(errors="replace"))
    assert m, "no engine core pid in the log"
    return int(m[1])


def process_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def sse_data(lines: list[str]) -> list[str]:
    """The `data:` payloads of an SSE body's lines, in order."""
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


def stream_events(payloads: list[str]) -> tuple[list[dict], bool]:
    """JSON events of a stream and whether it ended with [DONE] (and only there)."""
    done = bool(payloads) and payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1], payloads
    return [json.loads(p) for p in (payloads[:-1] if done else payloads)], done


@dataclass(frozen=True)
class Expected:
    text: str
    finish_reason: str
    num_tokens: int


def expected_output(tokenizer, prompt_ids: list[int], ref_tokens: list[int],
                    max_tokens: int, stop: tuple[str, ...] = ()) -> Expected:
    """What a greedy request must return, given the reference tokens of its prompt
    (`reference_generate` with a max_tokens at least as large; greedy runs are prefixes of
    each other). Stops at eos, at max_tokens, or at the first stop string."""
    eos = tokenizer.eos_token_id
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop=stop)
    seq = SequenceState(0, params, IncrementalDetokenizer(tokenizer, prompt_ids),
                        StopStringMatcher(params.stop, False))
    tokens = ref_tokens[:max_tokens]
    for i, tok in enumerate(tokens):
        reason = None
        if tok == eos:
            reason = "stop"
        elif i == len(tokens) - 1:
            reason = "length"
        if seq.advance([tok], [], reason, None) is not None or reason is not None:
            return Expected(seq.out.text, seq.out.finish_reason, i + 1)
    raise AssertionError("no reference tokens")


@dataclass
class Result:
    """One request's outcome, streamed or not. texts/finish are per choice index."""
    status: int
    texts: dict[int, str]
    finish: dict[int, str | None]
    error: dict | None = None        # the error object: of a non-200, or the stream's event
    done: bool = False               # a stream ended with data: [DONE]
    headers: httpx.Headers | None = None
    seconds: float = 0.0


def _choice_text(choice: dict) -> str:
    if "text" in choice:
        return choice["text"]
    part = choice.get("message") or choice.get("delta") or {}
    return part.get("content") or ""


async def request(h: httpx.AsyncClient, path: str, body: dict,
                  max_events: int | None = None) -> Result:
    """POST `body`; a stream is read to its end, or only `max_events` events (then the
    connection is dropped: a client disconnect)."""
    start = time.monotonic()
    if not body.get("stream"):
        r = await h.post(path, json=body)
        res = Result(r.status_code, {}, {}, headers=r.headers)
        if r.status_code != 200:
            res.error = check_error_body(r.json())
        else:
            for c in r.json()["choices"]:
                res.texts[c["index"]] = _choice_text(c)
                res.finish[c["index"]] = c["finish_reason"]
        res.seconds = time.monotonic() - start
        return res
    async with h.stream("POST", path, json=body) as r:
        res = Result(r.status_code, {}, {}, headers=r.headers)
        if r.status_code != 200:
            res.error = check_error_body(json.loads(await r.aread()))
            res.seconds = time.monotonic() - start
            return res
        n = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            assert not res.done, f"event after [DONE]: {data}"
            if data == "[DONE]":
                res.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                assert res.error is None, "two error events"
                res.error = check_error_body(event)
                continue
            assert res.error is None, f"event after the error event: {data}"
            for c in event["choices"]:
                i = c["index"]
                res.texts[i] = res.texts.get(i, "") + _choice_text(c)
                if c.get("finish_reason") is not None:
                    assert res.finish.get(i) is None, f"choice {i} finished twice: {body} {data}"
                res.finish[i] = c.get("finish_reason") or res.finish.get(i)
            n += 1
            if max_events is not None and n >= max_events:
                break
    res.seconds = time.monotonic() - start
    return res
