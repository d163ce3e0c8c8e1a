"""Pure functions of the load generator: metric definitions, SSE lines, workloads, arrivals."""
import math

import numpy as np
import pytest

from bench.client import DONE, RequestResult, parse_sse_line, request_body
from bench.metrics import batch_row, format_row, stats, summarize, tpot
from bench.workload import WORDS, make_requests, poisson_arrivals


def result(ttft, latency, n_out, itl=(), ok=True, status="200", prompt_len=5):
    return RequestResult(ok=ok, status=status, prompt_len=prompt_len, output_tokens=n_out,
                         ttft=ttft, latency=latency, itl=list(itl))


def test_stats_are_ms_with_linear_percentiles():
    s = stats([i / 1000 for i in range(1, 101)])                    # 1..100 ms
    assert s["mean"] == pytest.approx(50.5)
    assert s["median"] == pytest.approx(50.5)
    assert s["p99"] == pytest.approx(99.01)                          # 1 + 0.99 * 99
    assert stats([]) == dict(mean=None, median=None, p99=None)
    assert stats([0.25])["p99"] == pytest.approx(250.0)


def test_tpot_is_time_after_first_token_over_remaining_tokens():
    assert tpot(result(ttft=0.1, latency=1.0, n_out=10)) == pytest.approx(0.1)
    assert tpot(result(ttft=0.2, latency=0.5, n_out=2)) == pytest.approx(0.3)
    assert tpot(result(ttft=0.1, latency=0.1, n_out=1)) is None     # no token after the first


def test_summarize_throughput_latencies_and_errors():
    rs = [result(0.1, 1.0, 10, itl=[0.1] * 9), result(0.3, 2.1, 10, itl=[0.2] * 9),
          result(0.0, 0.0, 0, ok=False, status="503"), result(0, 0, 0, ok=False, status="503"),
          result(0, 0, 0, ok=False, status="ReadTimeout")]
    row = summarize(rs, duration_s=2.0, label="x", concurrency=4)
    assert (row["label"], row["concurrency"]) == ("x", 4)
    assert (row["completed"], row["failed"]) == (2, 3)
    assert row["errors"] == {"503": 2, "ReadTimeout": 1}
    assert row["request_throughput"] == pytest.approx(1.0)
    assert row["output_throughput"] == pytest.approx(10.0)          # 20 tokens / 2 s
    assert row["total_token_throughput"] == pytest.approx(15.0)     # + 10 prompt tokens
    assert row["mean_ttft_ms"] == pytest.approx(200.0)
    assert row["mean_tpot_ms"] == pytest.approx(150.0)              # (100 + 200) / 2
    assert row["median_itl_ms"] == pytest.approx(150.0)             # 9 x 100 and 9 x 200, pooled
    assert row["p99_e2el_ms"] == pytest.approx(1000 + 0.99 * 1100)
    text = format_row(row)
    assert "TTFT" in text and "503" in text


def test_summarize_with_nothing_completed():
    row = summarize([result(0, 0, 0, ok=False, status="ConnectError")], duration_s=0.0)
    assert row["completed"] == 0 and row["output_throughput"] == 0.0
    assert row["mean_ttft_ms"] is None
    assert "-" in format_row(row)


def test_batch_row_has_the_served_schema():
    row = batch_row("base", 4, 512, 256, ttft_s=0.5, total_s=10.5, itl_s=[0.04] * 255)
    served = summarize([result(0.1, 1.0, 10)], 1.0, label="s", concurrency=1,
                       request_rate="inf", num_prompts=1, sent=1, input_len=512, output_len=256)
    assert set(served) <= set(row)
    assert row["output_throughput"] == pytest.approx(4 * 256 / 10.5)
    assert row["mean_tpot_ms"] == pytest.approx(10_000 / 255)
    assert row["concurrency"] == 4 and row["completed"] == 4


def test_parse_sse_line():
    assert parse_sse_line('data: {"a": 1}') == {"a": 1}
    assert parse_sse_line('data:{"a": 2}') == {"a": 2}
    assert parse_sse_line("data: [DONE]") is DONE
    for other in ("", ": keep-alive", "event: message", "id: 3"):
        assert parse_sse_line(other) is None


def test_request_body():
    spec = make_requests(1, 4, 9, token_ids=True)[0]
    body = request_body(spec, "m", "completions")
    assert body["prompt"] == spec.prompt and body["max_tokens"] == 9
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    text = make_requests(1, 4, 9)[0]
    assert request_body(text, "m", "chat")["messages"] == [{"role": "user", "content": text.prompt}]
    with pytest.raises(ValueError, match="chat"):
        request_body(spec, "m", "chat")


def test_token_id_prompts_exact_reproducible_in_vocab():
    a = make_requests(50, 33, 7, seed=3, token_ids=True, vocab_size=100)
    assert all(len(s.prompt) == 33 == s.prompt_len and s.output_len == 7 for s in a)
    assert all(0 <= t < 100 for s in a for t in s.prompt)
    assert a == make_requests(50, 33, 7, seed=3, token_ids=True, vocab_size=100)
    assert a != make_requests(50, 33, 7, seed=4, token_ids=True, vocab_size=100)
    assert len({tuple(s.prompt) for s in a}) == 50


def test_word_prompts():
    specs = make_requests(5, 20, 3, seed=0)
    for s in specs:
        words = s.prompt.split(" ")
        assert len(words) == 20 == s.prompt_len and set(words) <= set(WORDS)


def test_shared_prefix_workload():
    specs = make_requests(12, 10, 4, seed=1, token_ids=True, shared_prefix_len=32,
                          num_prefixes=3)
    prefixes = [tuple(s.prompt[:32]) for s in specs]
    assert all(len(s.prompt) == 42 for s in specs)
    assert len(set(prefixes)) == 3
    assert all(prefixes[i] == prefixes[i % 3] for i in range(12))
    assert len({tuple(s.prompt[32:]) for s in specs}) == 12        # own suffixes


def test_poisson_arrivals_statistics():
    rate, n = 20.0, 20_000
    t = poisson_arrivals(n, rate, seed=0)
    gaps = np.diff(np.concatenate([[0.0], t]))
    assert np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)   # exponential: CV = 1
    counts = np.bincount(t.astype(int))[:-1]                       # arrivals per whole second
    assert counts.mean() == pytest.approx(rate, rel=0.03)
    assert counts.var() / counts.mean() == pytest.approx(1.0, rel=0.15)   # Poisson: var = mean
    assert np.array_equal(t, poisson_arrivals(n, rate, seed=0))
    assert np.array_equal(poisson_arrivals(5, math.inf), np.zeros(5))
    with pytest.raises(ValueError):
        poisson_arrivals(5, 0.0)
