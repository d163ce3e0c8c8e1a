"""Hostile clients against one real server (second round): each case asserts the status and
the OpenAI error body where there is one, and that the server still answers /health; the
module ends with the leak check (no block held, no request running or waiting, no traceback
in the log) and prints the figures docs/reliability.md quotes.

The cases of the issue come first (deep nesting, metrics cardinality, priority, requests
that can never be admitted, a 10 MB prompt beside a running stream, stalled uploads,
non-finite sampling knobs, filesystem paths), then our own: Unicode edge cases, header and
chunked-encoding abuse, many connections, flapping and pipelining clients.
"""
from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time

import httpx
import pytest

from tests.reliability.common import check_error_body, error_of, metric, metrics, request
from tests.reliability.conftest import API_KEY, MODEL_NAME

BODY_LIMIT = 12 * 2**20
MAX_QUEUED = 8
MAX_SEQUENCES = 32
BODY_TIMEOUT = 1.0
SERVER_FLAGS = ("--max-request-body-bytes", str(BODY_LIMIT), "--num-blocks", "96",
                "--max-queued-requests", str(MAX_QUEUED), "--max-request-sequences",
                str(MAX_SEQUENCES), "--request-body-timeout", str(BODY_TIMEOUT),
                "--max-num-seqs", "16")

CMPL = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
AUTH = f"Authorization: Bearer {API_KEY}\r\n".encode()

TALLY: dict[str, int] = {"cases": 0, "5xx": 0, "503": 0}


def tally(status: int) -> None:
    TALLY["cases"] += 1
    if status == 503:
        TALLY["503"] += 1                 # documented overload/shutdown answers
    elif status >= 500:
        TALLY["5xx"] += 1


@pytest.fixture(scope="module")
def http(module_server):
    with module_server.http(timeout=30) as h:
        yield h


@pytest.fixture(autouse=True)
def still_alive(module_server):
    yield
    assert module_server.proc.poll() is None, "the server died"
    assert httpx.get(f"{module_server.url}/health", timeout=5).status_code == 200


def post(http: httpx.Client, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"}, **kw)
    else:
        r = http.post(path, json=body, **kw)
    tally(r.status_code)
    return r


def address(server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw(server, data: bytes, wait: float = 5.0, pause_after: float = 0.0) -> bytes:
    """Send bytes on a fresh connection; everything the server answers until it closes or
    `wait` passes without more."""
    with socket.create_connection(address(server), timeout=wait) as s:
        s.sendall(data)
        if pause_after:
            time.sleep(pause_after)
        out = []
        try:
            while chunk := s.recv(65536):
                out.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    reply = b"".join(out)
    if reply.startswith(b"HTTP/1.1 "):
        tally(int(reply[9:12]))
    return reply


def nested(depth: int, leaf="x") -> object:
    v: object = leaf
    for _ in range(depth):
        v = [v]
    return v


# ---- the cases ----------------------------------------------------------------------

@pytest.mark.parametrize("body,param", [
    ({**CMPL, "stop": nested(300)}, "stop"),
    ({**CMPL, "stop": nested(900)}, "stop"),
    ({**CMPL, "logit_bias": {"5": nested(200, 1)}}, "logit_bias"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "text",
                                                          "text": nested(300)}]}]},
     "messages"),
    ({**CMPL, "prompt": nested(120, 5)}, "prompt"),
    (nested(500), None),
], ids=["stop-300", "stop-900", "logit-bias", "chat-content", "prompt-ids", "top-level"])
def test_deep_nesting_is_400_naming_the_field(http, body, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = error_of(post(http, path, json.dumps(body).encode()), 400)
    assert err["param"] == param and "nests deeper than 64" in err["message"], err


def test_nesting_at_the_limit_is_an_ordinary_type_error(http):
    # 1 (the body) + 63 lists = 64: under the limit, so validation sees it and says why
    err = error_of(post(http, "/v1/completions", {**CMPL, "stop": nested(63)}), 400)
    assert err["param"] == "stop" and "nests" not in err["message"]


def series(url: str) -> set[str]:
    return set(metrics(url))


def test_metrics_series_stay_bounded_whatever_the_clients_send(module_server, http):
    """Thousands of distinct methods, paths, model names, keys and headers: the set of
    series on /metrics is the same after them as after one round of each kind."""
    methods = ["PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "REPORT",
               "PURGE", "TRACE", "MKACTIVITY", "CHECKOUT", "MERGE", "NOTIFY", "SUBSCRIBE"]

    def barrage(n: int, tag: str) -> None:
        bad_key = {"Authorization": "Bearer nope"}
        with httpx.Client(base_url=module_server.url, timeout=10) as anon:
            for i in range(n):
                tally(http.request(methods[i % len(methods)], "/v1/completions").status_code)
                tally(http.request(methods[i % len(methods)], f"/{tag}{i}").status_code)
                tally(http.get(f"/v1/models/{tag}-{i}").status_code)
                tally(http.get(f"/{tag}/{i}", headers={f"x-{tag}-{i}": str(i)}).status_code)
                tally(http.post("/v1/completions", json={**CMPL, "model": f"{tag}{i}"})
                      .status_code)
                tally(anon.post("/v1/completions", json=CMPL,
                                headers={**bad_key, "user-agent": f"{tag}{i}"}).status_code)
                tally(anon.get(f"/{tag}{i}").status_code)

    barrage(len(methods), "warm")
    series(module_server.url)                     # a scrape counts itself once
    before = series(module_server.url)
    barrage(300, "x")                             # 2,100 requests, every value distinct
    after = series(module_server.url)
    assert after == before, sorted(after ^ before)[:10]
    assert any('method=other' in s for s in after)


def test_priority_is_refused_under_fcfs(http):
    err = error_of(post(http, "/v1/completions", {**CMPL, "priority": -10}), 400)
    assert err["param"] == "priority" and "--scheduling-policy" in err["message"]
    assert post(http, "/v1/completions", {**CMPL, "priority": 0}).status_code == 200


def test_priority_policy_accepts_priorities_in_range(start_server):
    s = start_server("--scheduling-policy", "priority")
    with s.http(timeout=30) as h:
        assert post(h, "/v1/completions", {**CMPL, "priority": -10}).status_code == 200
        err = error_of(post(h, "/v1/completions", {**CMPL, "priority": 2**40}), 400)
        assert err["param"] == "priority"


@pytest.mark.parametrize("body,param,flag", [
    ({**CMPL, "n": MAX_QUEUED + 1}, "n", "--max-queued-requests"),
    ({**CMPL, "prompt": ["a", "b", "c"], "n": 3}, "prompt", "--max-queued-requests"),
    ({**CHAT, "n": MAX_QUEUED + 1}, "n", "--max-queued-requests"),
    ({**CMPL, "prompt": ["a"] * 1000, "n": 16}, "prompt", "--max-request-sequences"),
], ids=["n", "prompts-x-n", "chat-n", "1000-prompts-x-16"])
def test_requests_that_can_never_be_admitted_are_400(http, body, param, flag):
    start = time.monotonic()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    err = error_of(post(http, path, body), 400)
    assert err["param"] == param and flag in err["message"], err
    assert time.monotonic() - start < 2


def test_a_10mb_prompt_is_refused_without_stalling_others(module_server, http):
    """While a 10 MB prompt is read, parsed and refused (over --max-prompt-chars, before
    tokenizing), /health answers within 100 ms and a running stream keeps its pace."""
    stream_times: list[float] = []
    health: list[float] = []
    when: list[float] = []
    done = threading.Event()

    def stream():
        body = {**CMPL, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{module_server.url}/v1/completions", json=body,
                          headers=module_server.headers(), timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    stream_times.append(time.monotonic())
        done.set()

    def probe():
        with httpx.Client(base_url=module_server.url, timeout=5) as h:   # kept alive
            while not done.is_set():
                t = time.monotonic()
                assert h.get("/health").status_code == 200
                health.append(time.monotonic() - t)
                when.append(t)
                time.sleep(0.02)

    threading.Thread(target=stream, daemon=True).start()
    while len(stream_times) < 20:
        time.sleep(0.01)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    time.sleep(0.3)
    big = json.dumps({**CMPL, "prompt": "hello world " * (10 * 2**20 // 12)}).encode()
    t0 = time.monotonic()
    err = error_of(post(http, "/v1/completions", big), 400)
    t1 = time.monotonic()
    assert err["param"] == "prompt" and "--max-prompt-chars" in err["message"], err
    time.sleep(0.3)
    done.wait(60)
    prober.join(10)
    gaps_before = [b - a for a, b in zip(stream_times, stream_times[1:]) if b < t0]
    gaps_during = [b - a for a, b in zip(stream_times, stream_times[1:]) if t0 <= b <= t1 + 0.1]
    # the probes that overlapped the refusal (from the upload's start to its answer)
    window = [x for w, x in zip(when, health) if t0 - 0.1 <= w + x and w <= t1]
    print(f"\n/health during the refusal: {len(window)} probes, max "
          f"{max(window) * 1000:.0f} ms; refusal {(t1 - t0) * 1000:.0f} ms (upload included); "
          f"stream gaps: typical {statistics.median(gaps_before) * 1000:.1f} ms, during "
          f"{max(gaps_during, default=0) * 1000:.0f} ms")
    assert window and max(window) < 0.1, f"/health took {max(window) * 1000:.0f} ms"
    typical = statistics.median(gaps_before)
    assert max(gaps_during, default=0) < typical + 0.25, (typical, gaps_during)


def test_stalled_upload_is_408_and_closed(module_server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    start = time.monotonic()
    reply = raw(module_server, head + b'{"prompt": ', wait=BODY_TIMEOUT + 5)
    took = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_TIMEOUT * 0.9 < took < BODY_TIMEOUT + 4
    check_error_body(json.loads(reply.split(b"\r\n\r\n", 1)[1]))


def test_stalled_chunked_upload_is_408(module_server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    reply = raw(module_server, head + b"5\r\n{\"pro\r\n", wait=BODY_TIMEOUT + 5)
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]


def test_slow_but_steady_upload_is_served(module_server):
    """The timeout is for silence, not for the whole body: a body that keeps arriving,
    slower than the timeout in total, is served."""
    body = json.dumps(CMPL).encode()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    pieces = [body[i:i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
    with socket.create_connection(address(module_server), timeout=10) as s:
        s.sendall(head)
        for p in pieces:
            time.sleep(BODY_TIMEOUT * 0.5)
            s.sendall(p)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    tally(int(reply[9:12]))
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]


@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", 1e-300), ("repetition_penalty", 1e300), ("temperature", 1e300),
    ("temperature", 101.0)])
def test_sampling_knobs_outside_finite_math_are_400(http, field, value):
    err = error_of(post(http, "/v1/completions", {**CMPL, field: value}), 400)
    assert err["param"] == field


def test_no_filesystem_paths_in_responses(module_server, http, checkpoint):
    paths = {str(checkpoint.resolve()), str(checkpoint.resolve().parent)}
    bodies = [http.get(p).text for p in ("/v1/models", f"/v1/models/{MODEL_NAME}",
                                         "/tokenizer_info", "/version", "/openapi.json",
                                         "/v1/models/nope")]
    bodies += [post(http, "/v1/completions", b).text for b in (
        {**CMPL, "prompt": [1, 10**6]}, {**CMPL, "stop_token_ids": [10**6]}, b"{")]
    assert http.get("/v1/models").json()["data"][0]["root"] == MODEL_NAME
    for text in bodies:
        assert not any(p in text for p in paths), text[:500]


# ---- our own cases ----------------------------------------------------------------------

UNICODE_PROMPTS = {     # each fits the tiny model's 512-token context (byte fallback)
    "zalgo": "e" + "\u0301\u0316\u0337" * 40,
    "rtl-override": "\u202eabc\u202d def \u2066x\u2069",
    "zwj-emoji": "\U0001F469\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466 " * 5,
    "bom-nul": "\ufeff\x00hi\x00",
    "noncharacters": "\uffff\ufffe\U0010ffff\U0001ffff",
    "whitespace-only": " \t\u3000\u00a0" * 40,
    "private-use": "\ue000\U000f0000" * 20,
}


@pytest.mark.parametrize("prompt", UNICODE_PROMPTS.values(), ids=UNICODE_PROMPTS.keys())
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_unicode_edge_cases_are_served(http, prompt, stream):
    r = post(http, "/v1/completions", {**CMPL, "prompt": prompt, "stream": stream,
                                       "stop": ["\x00", "\u202e"], "logprobs": 2})
    assert r.status_code == 200, r.text[:300]
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]")
    else:
        json.loads(r.text)


def test_unicode_in_chat_roles_and_names(http):
    body = {**CHAT, "messages": [{"role": "user", "content": "\u202e\x00", "name": "\u0000x"}]}
    assert post(http, "/v1/chat/completions", body).status_code == 200


@pytest.mark.parametrize("body", [
    {**CMPL, "stop": ["a"] * 5000},
    {**CMPL, "stop": ["x" * 60000]},
    {**CMPL, "logit_bias": {str(i): 1 for i in range(20000)}},
    {**CMPL, "stop_token_ids": list(range(50000))},
    {**CHAT, "messages": [{"role": "user", "content": "hi"}] * 3000},
], ids=["5000-stops", "60k-stop", "20000-biases", "50000-stop-ids", "3000-messages"])
def test_oversized_lists_are_refused_or_served_quickly(http, body):
    start = time.monotonic()
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = post(http, path, body)
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        check_error_body(r.json())
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("request_bytes,want", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(200)) + b"\r\n", b"200"),
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 200_000 + b"\r\n\r\n", None),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Content-Length: abc\r\n\r\n{}", b"400"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n{}", b"400"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", None),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", b"400"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\n2;ext=\x01\x02\r\n{}\r\n0\r\n\r\n", None),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + AUTH +
     b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\n{}", None),
    (b"GET /" + b"a" * 60_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", None),
    (b"GET /health HTTP/1.0\r\n\r\n", b"200"),
    (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n\r\n", b"401"),
    (b"GET /v1/models/%00/../../etc/passwd HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n", b"404"),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100, None),   # TLS hello
    (b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /version HTTP/1.1\r\nHost: x\r\n"
     b"Connection: close\r\n\r\n", b"200"),
], ids=["200-headers", "200kb-header", "bad-content-length", "two-content-lengths",
        "cl-and-te", "bad-chunk-size", "chunk-extension-garbage", "huge-chunk-then-stall",
        "60kb-path", "http-1.0", "non-latin1-key", "nul-dotdot-path", "tls-on-plain",
        "pipelined"])
def test_protocol_abuse_is_answered_or_dropped_never_a_500(module_server, request_bytes, want):
    reply = raw(module_server, request_bytes, wait=BODY_TIMEOUT + 3)
    if want is not None:
        assert reply[9:12] == want, reply[:300]
    if reply.startswith(b"HTTP/1.1 ") or reply.startswith(b"HTTP/1.0 "):
        assert not reply[9:10] == b"5", reply[:300]
    if want == b"200" and b"/version" in request_bytes:
        assert reply.count(b"HTTP/1.1 200") == 2          # both pipelined requests answered
    if reply[9:12] in (b"401", b"404", b"408", b"413"):
        check_error_body(json.loads(reply.split(b"\r\n\r\n", 1)[1].split(b"\r\n")[0]))


def test_many_idle_connections_do_not_block_others(module_server, http):
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(address(module_server), timeout=5))
        for s in socks[::3]:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n")
        start = time.monotonic()
        assert post(http, "/v1/completions", CMPL).status_code == 200
        assert time.monotonic() - start < 5
    finally:
        for s in socks:
            s.close()


def test_flapping_clients_leave_nothing_behind(module_server):
    """Streams dropped after their first event, again and again, mixed with complete
    ones: the complete ones are served, and the dropped ones free everything."""
    async def main():
        async with httpx.AsyncClient(base_url=module_server.url, timeout=30,
                                     headers=module_server.headers()) as h:
            body = {**CMPL, "max_tokens": 64, "ignore_eos": True, "stream": True, "n": 2}
            for _ in range(6):
                results = await asyncio.gather(
                    *[request(h, "/v1/completions", body, max_events=1) for _ in range(3)],
                    request(h, "/v1/completions", {**body, "n": 1, "max_tokens": 8}))
                for r in results:
                    tally(r.status)
                # 3 x 2 + 1 sequences: within the queue's bound of 8 even if all wait
                assert all(r.status == 200 for r in results), [r.error for r in results]
                assert results[-1].done
    asyncio.run(main())


def test_overload_is_503_with_retry_after_never_a_500(module_server):
    async def main():
        async with httpx.AsyncClient(base_url=module_server.url, timeout=60,
                                     headers=module_server.headers()) as h:
            body = {**CMPL, "max_tokens": 16, "ignore_eos": True, "stream": True}
            return await asyncio.gather(*[request(h, "/v1/completions", body)
                                          for _ in range(64)])
    results = asyncio.run(main())
    for r in results:
        tally(r.status)
    assert {r.status for r in results} <= {200, 503}
    assert all(r.done and not r.error for r in results if r.status == 200)
    assert all(r.headers["retry-after"] for r in results if r.status == 503)


@pytest.mark.parametrize("body", [
    b'{"prompt": "a", "prompt": [1, 2], "max_tokens": 2}',
    b'\xef\xbb\xbf{"prompt": "a"}',
    b'{"prompt": "a", "max_tokens": 1e2}',
    b'{"prompt": "a", "seed": -1180591620717411303424}',
    b'{"prompt": "a", "max_tokens": 2, "n": 1.0}',
    b'1e999999',
    b'{"prompt": "a", "stop": "' + b"\\u0000" * 1000 + b'"}',
], ids=["duplicate-keys", "bom", "float-max-tokens", "huge-negative-seed", "float-n",
        "huge-number-body", "escaped-nuls-stop"])
def test_odd_json_is_answered_in_shape(http, body):
    r = post(http, "/v1/completions", body)
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        check_error_body(r.json())


def test_wrong_content_type_is_answered_in_shape(http):
    r = http.post("/v1/completions", content=json.dumps(CMPL),
                  headers={"content-type": "text/plain"})
    tally(r.status_code)
    assert r.status_code in (200, 400), r.text[:300]
    if r.status_code == 400:
        check_error_body(r.json())


def test_server_unharmed_and_figures(module_server, http):
    """Last: nothing leaked, nothing logged as unexpected; the figures for the docs."""
    deadline = time.monotonic() + 10
    while True:
        m = metrics(module_server.url)
        idle = (metric(m, "tpaserve:factor_cache_blocks_used") == 0
                and metric(m, "tpaserve:num_requests_running") == 0
                and metric(m, "tpaserve:num_requests_waiting") == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert idle, {k: v for k, v in m.items() if "num_requests" in k or "blocks_used" in k}
    log = module_server.log.read_text(errors="replace")
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert TALLY["5xx"] == 0, TALLY
    print(f"\nhostile cases: {TALLY['cases']} requests, 5xx other than 503: {TALLY['5xx']}, "
          f"503 (queue full): {TALLY['503']}, blocks leaked: 0")
