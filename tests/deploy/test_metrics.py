"""/metrics after real traffic (the official openai client against a real server): each metric
exists and moves as it should. Every test reads the counters before and after its own
traffic; the tests of one server run one after another, so the differences are exact."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.api.conftest import API_KEY, MODEL_NAME
from tests.deploy.conftest import BLOCK_SIZE, NUM_BLOCKS, delta, scrape, value
from tpaserve.models.loader import load_config

PROMPT_IDS = list(range(20, 33))         # 13 token ids: a known prompt length
IGNORE_EOS = {"ignore_eos": True}

# every name of issue 6, as exposed (histograms by their _count sample)
REQUIRED = [
    "tpaserve:num_requests_running", "tpaserve:num_requests_waiting",
    "tpaserve:prompt_tokens_total", "tpaserve:generation_tokens_total",
    "tpaserve:request_success_total", "tpaserve:num_preemptions_total",
    "tpaserve:prefix_cache_queries_total", "tpaserve:prefix_cache_hits_total",
    "tpaserve:time_to_first_token_seconds_count", "tpaserve:inter_token_latency_seconds_count",
    "tpaserve:e2e_request_latency_seconds_count", "tpaserve:request_queue_time_seconds_count",
    "tpaserve:request_prompt_tokens_count", "tpaserve:request_generation_tokens_count",
    "tpaserve:iteration_tokens_total_count", "tpaserve:factor_cache_usage_perc",
    "tpaserve:factor_cache_blocks_total", "tpaserve:factor_cache_blocks_used",
    "tpaserve:factor_cache_bytes_total", "tpaserve:factor_cache_bytes_used",
    "tpaserve:factor_cache_bytes_per_token", "tpaserve:mha_equivalent_bytes_per_token",
    "tpaserve:mha_equivalent_cache_used_bytes", "tpaserve:engine_step_duration_seconds_count",
    "tpaserve:engine_step_batch_size_count", "tpaserve:cache_config_info",
    "tpaserve:http_requests_total", "tpaserve:engine_host_seconds_total",
    "tpaserve:engine_device_wait_seconds_total", "tpaserve:server_start_time_seconds",
    # vLLM's names of three gauges: the Gateway API Inference Extension's contract
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
]


def wait_for(pred, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "not reached in time"
        time.sleep(0.02)


def test_every_metric_is_exposed_with_model_name(metrics_server):
    metrics_server.client().completions.create(model=MODEL_NAME, prompt=PROMPT_IDS,
                                               max_tokens=2)
    samples = scrape(metrics_server.url)
    names = {n for n, _ in samples}
    assert not [n for n in REQUIRED if n not in names]
    assert all(dict(labels).get("model_name") == MODEL_NAME for _, labels in samples)


def test_token_counters_equal_the_usage_returned(metrics_server):
    c = metrics_server.client()
    before = scrape(metrics_server.url)
    usages = []
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=7, n=2,
                             extra_body=IGNORE_EOS)
    usages.append(r.usage)
    r = c.completions.create(model=MODEL_NAME, prompt=[PROMPT_IDS, PROMPT_IDS[:5]],
                             max_tokens=4, extra_body=IGNORE_EOS)     # two engine requests
    usages.append(r.usage)
    chunks = list(c.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "count the tokens"}],
        max_tokens=6, stream=True, stream_options={"include_usage": True},
        extra_body=IGNORE_EOS))
    usages.append(chunks[-1].usage)
    after = scrape(metrics_server.url)
    prompt = sum(u.prompt_tokens for u in usages)
    generated = sum(u.completion_tokens for u in usages)
    assert generated == 2 * 7 + 2 * 4 + 6
    assert delta(before, after, "tpaserve:prompt_tokens_total") == prompt
    assert delta(before, after, "tpaserve:generation_tokens_total") == generated
    # per finished request (4 engine requests): sizes as histograms
    assert delta(before, after, "tpaserve:request_prompt_tokens_sum") == prompt
    assert delta(before, after, "tpaserve:request_generation_tokens_sum") == generated
    assert delta(before, after, "tpaserve:request_prompt_tokens_count") == 4
    assert delta(before, after, "tpaserve:e2e_request_latency_seconds_count") == 4
    # per sequence: 2 + 2 + 1, all cut by max_tokens
    assert delta(before, after, "tpaserve:request_success_total", finished_reason="length") == 5
    assert delta(before, after, "tpaserve:request_success_total", finished_reason="stop") == 0


def test_latencies_are_measured_per_token(metrics_server):
    """One streamed request, alone on the server: one queue time, one TTFT, one inter-token
    latency per later token, one end-to-end latency, each no longer than the client saw."""
    n = 12
    c = metrics_server.client()
    before = scrape(metrics_server.url)
    start = time.monotonic()
    first = None
    for chunk in c.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=n,
                                      stream=True, extra_body=IGNORE_EOS):
        if first is None:
            first = time.monotonic() - start
    total = time.monotonic() - start
    after = scrape(metrics_server.url)
    d = lambda name: delta(before, after, name)        # noqa: E731
    assert d("tpaserve:request_queue_time_seconds_count") == 1
    assert d("tpaserve:time_to_first_token_seconds_count") == 1
    assert d("tpaserve:inter_token_latency_seconds_count") == n - 1
    assert d("tpaserve:e2e_request_latency_seconds_count") == 1
    queue = d("tpaserve:request_queue_time_seconds_sum")
    ttft = d("tpaserve:time_to_first_token_seconds_sum")
    itl = d("tpaserve:inter_token_latency_seconds_sum")
    e2e = d("tpaserve:e2e_request_latency_seconds_sum")
    assert 0 <= queue <= ttft <= first
    assert ttft < e2e <= total
    assert itl == pytest.approx(e2e - ttft, abs=1e-6)   # the gaps add up to the decode time
    # the engine steps: one prefill of the whole prompt, then n - 1 decodes of one token
    assert d("tpaserve:engine_step_duration_seconds_count") == n
    assert d("tpaserve:engine_step_batch_size_sum") == n
    assert d("tpaserve:iteration_tokens_total_sum") == len(PROMPT_IDS) + n - 1
    assert 0 < d("tpaserve:engine_step_duration_seconds_sum") <= e2e
    # the core's loop: host work and waiting for the device, within the request's time
    assert 0 < d("tpaserve:engine_host_seconds_total") <= e2e
    assert 0 <= d("tpaserve:engine_device_wait_seconds_total") <= e2e
    assert value(after, "tpaserve:time_to_first_token_seconds_bucket", le="+Inf") >= 1


def test_cache_gauges_follow_the_blocks_and_return_to_zero(metrics_server, checkpoint):
    mc = load_config(checkpoint)
    # float32 on CPU; the same formulas as FactorCacheSpec, written out
    per_token = mc.n_layer * (mc.k_rank + mc.v_rank) * (mc.n_head + mc.head_dim) * 4
    mha_per_token = mc.n_layer * 2 * (mc.n_embd // mc.head_dim) * mc.head_dim * 4
    assert mha_per_token > per_token
    s = scrape(metrics_server.url)
    assert value(s, "tpaserve:factor_cache_bytes_per_token") == per_token
    assert value(s, "tpaserve:mha_equivalent_bytes_per_token") == mha_per_token
    assert value(s, "tpaserve:factor_cache_blocks_total") == NUM_BLOCKS
    assert value(s, "tpaserve:factor_cache_bytes_total") == NUM_BLOCKS * BLOCK_SIZE * per_token
    assert value(s, "tpaserve:cache_config_info", block_size=str(BLOCK_SIZE), dtype="float32",
                 enable_prefix_caching="false", num_blocks=str(NUM_BLOCKS),
                 k_rank=str(mc.k_rank), v_rank=str(mc.v_rank)) == 1

    body = {"model": MODEL_NAME, "prompt": PROMPT_IDS, "max_tokens": 200, "stream": True,
            **IGNORE_EOS}
    with metrics_server.http() as h, h.stream("POST", "/v1/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(40):                 # 13 + 40 tokens: 4 blocks
            next(lines)
        s = scrape(metrics_server.url)
        used = value(s, "tpaserve:factor_cache_blocks_used")
        assert used >= 4 and value(s, "tpaserve:num_requests_running") == 1
        assert value(s, "tpaserve:factor_cache_usage_perc") == used / NUM_BLOCKS
        assert value(s, "vllm:kv_cache_usage_perc") == used / NUM_BLOCKS     # the aliases
        assert value(s, "vllm:num_requests_running") == 1
        assert value(s, "tpaserve:factor_cache_bytes_used") == used * BLOCK_SIZE * per_token
        assert value(s, "tpaserve:mha_equivalent_cache_used_bytes") == \
            used * BLOCK_SIZE * mha_per_token
        assert list(lines)[-1] == "data: [DONE]"     # read the stream to its end
    s = scrape(metrics_server.url)
    for name in ("tpaserve:factor_cache_blocks_used", "tpaserve:factor_cache_usage_perc",
                 "tpaserve:factor_cache_bytes_used", "tpaserve:mha_equivalent_cache_used_bytes",
                 "tpaserve:num_requests_running", "tpaserve:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
                 "vllm:num_requests_waiting"):
        assert value(s, name) == 0, name


def test_preemptions_are_counted_when_the_cache_is_too_small(metrics_server):
    """8 requests of 13 + 100 tokens need 8 blocks each; the cache has 24: the scheduler
    admits what fits for now and preempts as they grow. Nothing is lost or counted twice."""
    n_req, max_tokens = 8, 100
    before = scrape(metrics_server.url)

    async def run():
        async with metrics_server.async_client() as c:
            return await asyncio.gather(*[
                c.completions.create(model=MODEL_NAME, prompt=PROMPT_IDS, max_tokens=max_tokens,
                                     temperature=0, extra_body=IGNORE_EOS)
                for _ in range(n_req)])
    outs = asyncio.run(run())
    after = scrape(metrics_server.url)
    assert all(o.usage.completion_tokens == max_tokens for o in outs)
    assert delta(before, after, "tpaserve:num_preemptions_total") > 0
    assert delta(before, after, "tpaserve:generation_tokens_total") == n_req * max_tokens
    assert delta(before, after, "tpaserve:prompt_tokens_total") == n_req * len(PROMPT_IDS)
    assert delta(before, after, "tpaserve:request_queue_time_seconds_count") == n_req
    assert value(after, "tpaserve:factor_cache_blocks_used") == 0


def test_an_abort_is_counted_and_not_timed(metrics_server):
    before = scrape(metrics_server.url)
    body = {"model": MODEL_NAME, "prompt": PROMPT_IDS, "max_tokens": 300, "stream": True,
            **IGNORE_EOS}
    with metrics_server.http() as h, h.stream("POST", "/v1/completions", json=body) as r:
        lines = (line for line in r.iter_lines() if line)
        for _ in range(3):
            next(lines)
    wait_for(lambda: delta(before, scrape(metrics_server.url), "tpaserve:request_success_total",
                           finished_reason="abort") == 1)
    after = scrape(metrics_server.url)
    assert delta(before, after, "tpaserve:e2e_request_latency_seconds_count") == 0
    assert delta(before, after, "tpaserve:time_to_first_token_seconds_count") == 1
    assert value(after, "tpaserve:factor_cache_blocks_used") == 0


def test_http_requests_by_route_template_and_status(metrics_server):
    url = metrics_server.url
    before = scrape(url)
    with metrics_server.http() as h:
        assert h.get("/v1/models").status_code == 200
        assert h.get(f"/v1/models/{MODEL_NAME}").status_code == 200
        assert h.get("/v1/models/no-such-model").status_code == 404
        assert h.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert h.get("/no/such/path").status_code == 404
        assert h.get("/v1/completions").status_code == 405
    assert httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": "x"}
                      ).status_code == 401                       # no API key
    assert httpx.get(f"{url}/health").status_code == 200
    after = scrape(url)

    def d(route: str, status: int, method: str = "GET") -> float:
        return delta(before, after, "tpaserve:http_requests_total", route=route,
                     status=str(status), method=method)
    assert d("/v1/models", 200) == 1
    assert d("/v1/models/{model:path}", 200) == 1         # the template, not the name
    assert d("/v1/models/{model:path}", 404) == 1
    assert d("/v1/completions", 404, "POST") == 1
    assert d("/v1/completions", 401, "POST") == 1
    assert d("/v1/completions", 405) == 1
    assert d("unmatched", 404) == 1
    assert d("/health", 200) == 1
    assert not any(API_KEY in str(k) or "no-such-model" in str(k) for k in after)


def test_prefix_cache_queries_and_hits_count_tokens(prefix_server):
    """A 40-token prompt twice, blocks of 16: the second request finds its first 2 blocks
    (the last prompt token is always computed, so at most 39 tokens can hit)."""
    prompt = list(range(40, 80))
    c = prefix_server.client()
    before = scrape(prefix_server.url)
    for _ in range(2):
        c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=1)
    after = scrape(prefix_server.url)
    assert delta(before, after, "tpaserve:prefix_cache_queries_total") == 2 * len(prompt)
    assert delta(before, after, "tpaserve:prefix_cache_hits_total") == 2 * BLOCK_SIZE
    assert value(after, "tpaserve:cache_config_info", enable_prefix_caching="true") == 1


def test_observe_n_equals_n_observations():
    """The ITL histogram takes a round's tokens in one call; it must equal n observe()s."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tpaserve.frontend.metrics import ITL_BUCKETS, observe_n
    one, many = CollectorRegistry(), CollectorRegistry()
    a = Histogram("x", "x", buckets=ITL_BUCKETS, registry=one)
    b = Histogram("x", "x", buckets=ITL_BUCKETS, registry=many)
    for amount, n in [(0.0004, 3), (0.001, 2), (0.0123, 8), (0.5, 1), (99.0, 4), (0.03, 0)]:
        observe_n(a, amount, n)
        for _ in range(n):
            b.observe(amount)
    assert generate_latest(one) == generate_latest(many)
