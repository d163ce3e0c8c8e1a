"""Every Prometheus metric tpaserve exports, defined once, here.

Metric names are an interface: the Grafana dashboards and alert rules under deploy/ may only
query names defined in this module (tests/deploy checks it against a live /metrics). Names
follow vLLM's (`vllm:` -> `tpaserve:`) and every metric has the label `model_name`.
Counters are declared with their exposed `_total` name (prometheus-client would add the
suffix anyway), so a grep finds what Prometheus shows. Only counters end in `_total`, as
Prometheus' naming rules ask - with one exception kept for vLLM compatibility:
the histogram `iteration_tokens_total`.

Three gauges are also exported under vLLM's own names, as aliases set with the same values
(`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc`):
the model-server contract of the Gateway API Inference Extension, whose endpoint picker
scrapes those names from a vLLM-compatible server. Nothing else of tpaserve reads them.

Where each value is measured (the engine core runs in its own process):
  * the core times its steps and counts preemptions and prefix-cache lookups, and sends them
    with its state (queue lengths, blocks in use) after every step (engine/messages.
    SchedulerStats): `EngineMetrics.observe_core`, on the API process's event loop.
  * the frontend times each request as its outputs are processed (arrival, first token,
    every later token, its end; frontend/output_processor.IterationStats):
    `EngineMetrics.observe`, before those outputs reach their clients, so a client that has
    its response sees it counted. A latency is the frontend's, after the core's step.
  * `HTTP_REQUESTS` is counted by the server's middleware (api/server.py).

Memory numbers come from FactorCacheSpec only (bytes per token and per block), for the
factor cache and for the MHA model of the same size it is compared with.
"""
from __future__ import annotations

import bisect
import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

# No `*_created` series: they double the exposition and no dashboard reads them (vLLM too).
disable_created_metrics()

LABELS = ["model_name"]
FINISH_REASONS = ("stop", "length", "abort", "error")


def _buckets_1_2_5(limit: float) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (token counts of any model)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


TOKEN_BUCKETS = _buckets_1_2_5(1_000_000)
POW2_BUCKETS = [float(2**i) for i in range(16)]                     # 1 .. 32768
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
ITL_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0]
REQUEST_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0,
                   60.0, 120.0, 240.0, 480.0, 960.0]
STEP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 0.75, 1.0, 2.5, 5.0]


def _gauge(name: str, doc: str, labels: list[str]) -> Gauge:
    # several API processes: each keeps its own value; /metrics shows the largest of the
    # live ones (see render())
    return Gauge(name, doc, labels, multiprocess_mode="livemax")


# ---- scheduler state (gauges, at scrape time) ------------------------------------------------
NUM_REQUESTS_RUNNING = _gauge(
    "tpaserve:num_requests_running", "Sequences in the running batch (a request with n > 1 "
    "counts n).", LABELS)
NUM_REQUESTS_WAITING = _gauge(
    "tpaserve:num_requests_waiting", "Sequences waiting to run (preempted ones included).",
    LABELS)

# ---- vLLM's names of three gauges (the Gateway API Inference Extension scrapes them) -------
VLLM_NUM_REQUESTS_RUNNING = _gauge(
    "vllm:num_requests_running", "Alias of tpaserve:num_requests_running (vLLM's name).",
    LABELS)
VLLM_NUM_REQUESTS_WAITING = _gauge(
    "vllm:num_requests_waiting", "Alias of tpaserve:num_requests_waiting (vLLM's name).",
    LABELS)
VLLM_KV_CACHE_USAGE = _gauge(
    "vllm:kv_cache_usage_perc", "Alias of tpaserve:factor_cache_usage_perc (vLLM's name; "
    "0 to 1).", LABELS)

# ---- the factor cache (gauges) -----------------------------------------------------------
# blocks_total / bytes_total are gauges named as the project's metric list asks (the totals
# of the cache), although Prometheus keeps the _total suffix for counters by convention.
FACTOR_CACHE_USAGE = _gauge(
    "tpaserve:factor_cache_usage_perc", "Fraction of factor-cache blocks in use (0 to 1).",
    LABELS)
FACTOR_CACHE_BLOCKS_TOTAL = _gauge(
    "tpaserve:factor_cache_blocks_total", "Factor-cache blocks in total.", LABELS)
FACTOR_CACHE_BLOCKS_USED = _gauge(
    "tpaserve:factor_cache_blocks_used", "Factor-cache blocks referenced by a request.", LABELS)
FACTOR_CACHE_BYTES_TOTAL = _gauge(
    "tpaserve:factor_cache_bytes_total", "Bytes of the factor cache (all blocks).", LABELS)
FACTOR_CACHE_BYTES_USED = _gauge(
    "tpaserve:factor_cache_bytes_used", "Bytes of the factor-cache blocks in use.", LABELS)
FACTOR_CACHE_BYTES_PER_TOKEN = _gauge(
    "tpaserve:factor_cache_bytes_per_token", "Factor-cache bytes per token: layers * "
    "(R_K + R_V)(h + d_h) * itemsize for T6; layers * 2 n_kv d_h * itemsize for MHA / GQA / "
    "MQA (constant A: only the kv heads' keys and values are cached).", LABELS)
FACTOR_CACHE_BYTES_PER_TOKEN_BY_DTYPE = _gauge(
    "tpaserve:factor_cache_bytes_per_token_by_dtype", "Factor-cache bytes per token this "
    "model would take with each cache dtype (--cache-dtype; fp8: e4m3, one byte a number, "
    "the scales folded into the factors, so exactly half of bfloat16).",
    LABELS + ["cache_dtype"])
MHA_EQUIVALENT_BYTES_PER_TOKEN = _gauge(
    "tpaserve:mha_equivalent_bytes_per_token", "KV-cache bytes per token of the multi-head "
    "attention model the saving is measured against: layers * 2 h d_h * itemsize, with h = "
    "d_model / d_h for T6 (a same-size MHA model) and h = n_head for MHA / GQA / MQA (the "
    "same model with a kv head per query head; MHA itself: equal).", LABELS)
MHA_EQUIVALENT_CACHE_USED_BYTES = _gauge(
    "tpaserve:mha_equivalent_cache_used_bytes", "Bytes that same-size MHA model would need "
    "for the token slots of the blocks in use (used_blocks * block_size * its bytes/token).",
    LABELS)
CACHE_CONFIG_INFO = _gauge(
    "tpaserve:cache_config_info", "The factor cache's configuration, in labels (value 1).",
    LABELS + ["block_size", "num_blocks", "dtype", "num_layers", "num_heads", "head_dim",
              "k_rank", "v_rank", "mha_equivalent_heads", "enable_prefix_caching",
              "cache_dtype"])

# ---- the server ---------------------------------------------------------------------------
# Uptime for /dashboard (now - start) without the process collector, which multiprocess mode
# drops. Several API processes: the earliest live start.
SERVER_START_TIME = Gauge(
    "tpaserve:server_start_time_seconds", "Unix time at which this server's app started "
    "serving (its metrics were set up).", LABELS, multiprocess_mode="livemin")

# ---- tokens and requests (counters, from the step thread) --------------------------------
PROMPT_TOKENS = Counter(
    "tpaserve:prompt_tokens_total", "Prompt tokens of requests that returned a first output "
    "(prefix-cache hits included; once per request, not per sequence).", LABELS)
GENERATION_TOKENS = Counter(
    "tpaserve:generation_tokens_total", "Tokens generated (all sequences).", LABELS)
REQUEST_SUCCESS = Counter(
    "tpaserve:request_success_total", "Finished sequences by finish reason (stop, length, "
    "abort, error).", LABELS + ["finished_reason"])
NUM_PREEMPTIONS = Counter(
    "tpaserve:num_preemptions_total", "Preemptions: a running sequence's blocks freed to be "
    "recomputed later.", LABELS)
PREFIX_CACHE_QUERIES = Counter(
    "tpaserve:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
    LABELS)
PREFIX_CACHE_HITS = Counter(
    "tpaserve:prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", LABELS)

ENGINE_HOST_SECONDS = Counter(
    "tpaserve:engine_host_seconds_total", "Seconds the engine core's loop spent on host work: "
    "scheduling, launching steps, updating from their results. With device_wait: whether "
    "serving is bound by the host (little waiting) or by the device.", LABELS)
ENGINE_DEVICE_WAIT_SECONDS = Counter(
    "tpaserve:engine_device_wait_seconds_total", "Seconds the engine core's loop waited for "
    "the device to finish a step.", LABELS)

# ---- latencies and sizes (histograms, from the step thread) ------------------------------
TIME_TO_FIRST_TOKEN = Histogram(
    "tpaserve:time_to_first_token_seconds", "Arrival to the first generated token of a "
    "request.", LABELS, buckets=TTFT_BUCKETS)
INTER_TOKEN_LATENCY = Histogram(
    "tpaserve:inter_token_latency_seconds", "Time between two consecutive tokens of one "
    "sequence.", LABELS, buckets=ITL_BUCKETS)
E2E_REQUEST_LATENCY = Histogram(
    "tpaserve:e2e_request_latency_seconds", "Arrival to the last token of a request that "
    "finished (stop, length or error; aborted requests are not observed).", LABELS,
    buckets=REQUEST_BUCKETS)
REQUEST_QUEUE_TIME = Histogram(
    "tpaserve:request_queue_time_seconds", "Arrival to the first time the scheduler ran a "
    "request.", LABELS, buckets=REQUEST_BUCKETS)
REQUEST_PROMPT_TOKENS = Histogram(
    "tpaserve:request_prompt_tokens", "Prompt tokens per finished request.", LABELS,
    buckets=TOKEN_BUCKETS)
REQUEST_GENERATION_TOKENS = Histogram(
    "tpaserve:request_generation_tokens", "Generated tokens per finished request (all n "
    "sequences).", LABELS, buckets=TOKEN_BUCKETS)
ITERATION_TOKENS = Histogram(
    "tpaserve:iteration_tokens_total", "Tokens computed per engine step (prompt chunks and "
    "decodes).", LABELS, buckets=POW2_BUCKETS)
ENGINE_STEP_DURATION = Histogram(
    "tpaserve:engine_step_duration_seconds", "Wall time of one engine step: schedule, "
    "execute (device work included), update; with async scheduling, from the end of the "
    "step before (the steps' times add up to the engine's busy time).", LABELS,
    buckets=STEP_BUCKETS)
ENGINE_STEP_BATCH_SIZE = Histogram(
    "tpaserve:engine_step_batch_size", "Sequences computed in one engine step.", LABELS,
    buckets=POW2_BUCKETS)

# ---- HTTP (counted by api/server.py's middleware) ----------------------------------------
HTTP_REQUESTS = Counter(
    "tpaserve:http_requests_total", "HTTP responses by method, route template (e.g. "
    "/v1/models/{model:path}; 'unmatched' for paths no route serves) and status code.",
    LABELS + ["method", "route", "status"])


def observe_n(hist, value: float, n: int) -> None:
    """n observations of one value in one go (a multi-step round delivers n tokens with one
    gap between them; observing each costs a lock per token). Mirrors Histogram.observe,
    whose bucket and sum fields it updates; tests/deploy/test_metrics.py checks it against
    n observe() calls, so a change in prometheus-client shows."""
    hist._raise_if_not_observable()
    hist._sum.inc(value * n)
    hist._buckets[bisect.bisect_left(hist._upper_bounds, value)].inc(n)


def render() -> tuple[bytes, str]:
    """The exposition for /metrics: this process's registry, or with several API processes
    (PROMETHEUS_MULTIPROC_DIR set by the CLI before any of them starts) all of theirs
    merged: counters and histograms summed, gauges the largest of the live processes' (only
    API process 0 sets the engine's gauges; every process sets the static ones alike)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class EngineMetrics:
    """The metrics of one engine served under `model_name` (info: what the core reported)."""

    def __init__(self, info, model_name: str):
        self.info, self.model_name = info, model_name
        self._last = (0, 0, 0, 0.0, 0.0)  # the core's cumulative counters, as last seen
        label = dict(model_name=model_name)
        self._running = NUM_REQUESTS_RUNNING.labels(**label)
        self._waiting = NUM_REQUESTS_WAITING.labels(**label)
        self._usage = FACTOR_CACHE_USAGE.labels(**label)
        self._vllm_running = VLLM_NUM_REQUESTS_RUNNING.labels(**label)
        self._vllm_waiting = VLLM_NUM_REQUESTS_WAITING.labels(**label)
        self._vllm_usage = VLLM_KV_CACHE_USAGE.labels(**label)
        self._used = FACTOR_CACHE_BLOCKS_USED.labels(**label)
        self._used_bytes = FACTOR_CACHE_BYTES_USED.labels(**label)
        self._mha_used_bytes = MHA_EQUIVALENT_CACHE_USED_BYTES.labels(**label)
        self._prompt = PROMPT_TOKENS.labels(**label)
        self._generation = GENERATION_TOKENS.labels(**label)
        self._preemptions = NUM_PREEMPTIONS.labels(**label)
        self._prefix_queries = PREFIX_CACHE_QUERIES.labels(**label)
        self._prefix_hits = PREFIX_CACHE_HITS.labels(**label)
        self._host = ENGINE_HOST_SECONDS.labels(**label)
        self._wait = ENGINE_DEVICE_WAIT_SECONDS.labels(**label)
        # every finish reason shows from the start (as 0), so rate() works on the first one
        self._success = {r: REQUEST_SUCCESS.labels(model_name=model_name, finished_reason=r)
                         for r in FINISH_REASONS}
        self._ttft = TIME_TO_FIRST_TOKEN.labels(**label)
        self._itl = INTER_TOKEN_LATENCY.labels(**label)
        self._e2e = E2E_REQUEST_LATENCY.labels(**label)
        self._queue = REQUEST_QUEUE_TIME.labels(**label)
        self._req_prompt = REQUEST_PROMPT_TOKENS.labels(**label)
        self._req_generation = REQUEST_GENERATION_TOKENS.labels(**label)
        self._iter_tokens = ITERATION_TOKENS.labels(**label)
        self._step_time = ENGINE_STEP_DURATION.labels(**label)
        self._batch_size = ENGINE_STEP_BATCH_SIZE.labels(**label)
        self._set_static()
        self._set_usage(0)

    def _set_static(self) -> None:
        """What does not change while the engine lives: sizes and configuration."""
        info, name = self.info, self.model_name
        n = info.num_blocks
        SERVER_START_TIME.labels(name).set(time.time())
        FACTOR_CACHE_BLOCKS_TOTAL.labels(name).set(n)
        FACTOR_CACHE_BYTES_TOTAL.labels(name).set(n * info.bytes_per_block)
        FACTOR_CACHE_BYTES_PER_TOKEN.labels(name).set(info.bytes_per_token)
        for cache_dtype, nbytes in info.bytes_per_token_by_dtype.items():
            FACTOR_CACHE_BYTES_PER_TOKEN_BY_DTYPE.labels(name, cache_dtype).set(nbytes)
        MHA_EQUIVALENT_BYTES_PER_TOKEN.labels(name).set(info.mha_bytes_per_token)
        CACHE_CONFIG_INFO.labels(
            model_name=name, block_size=str(info.block_size), num_blocks=str(n),
            dtype=info.dtype, num_layers=str(info.n_layer), num_heads=str(info.n_head),
            head_dim=str(info.head_dim), k_rank=str(info.k_rank), v_rank=str(info.v_rank),
            mha_equivalent_heads=str(info.mha_heads),
            enable_prefix_caching=str(info.enable_prefix_caching).lower(),
            cache_dtype=info.cache_dtype or info.dtype).set(1)

    def _set_usage(self, used: int) -> None:
        info = self.info
        self._used.set(used)
        self._usage.set(used / info.num_blocks)
        self._vllm_usage.set(used / info.num_blocks)
        self._used_bytes.set(used * info.bytes_per_block)
        self._mha_used_bytes.set(used * info.block_size * info.mha_bytes_per_token)

    def observe_core(self, stats) -> None:
        """The core's state and step timings (an engine/messages.SchedulerStats)."""
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._vllm_running.set(stats.num_running)
        self._vllm_waiting.set(stats.num_waiting)
        self._set_usage(stats.num_blocks_used)
        for seconds, tokens, seqs in zip(stats.step_durations, stats.step_tokens,
                                         stats.step_seqs):
            self._step_time.observe(seconds)
            self._iter_tokens.observe(tokens)
            self._batch_size.observe(seqs)
        for v in stats.queue_times:
            self._queue.observe(v)
        now = (stats.num_preemptions, stats.prefix_queries, stats.prefix_hits,
               stats.host_seconds, stats.wait_seconds)
        for counter, new, old in zip((self._preemptions, self._prefix_queries,
                                      self._prefix_hits, self._host, self._wait), now,
                                     self._last):
            if new > old:
                counter.inc(new - old)
        self._last = now

    def observe(self, stats) -> None:
        """What output processing timed (a frontend/output_processor.IterationStats)."""
        self._prompt.inc(stats.prompt_tokens)
        self._generation.inc(stats.generation_tokens)
        for v in stats.ttfts:
            self._ttft.observe(v)
        for gap, n in stats.itls:
            observe_n(self._itl, gap, n)
        for f in stats.finished:
            for reason in f.finish_reasons:
                self._success[reason].inc()
            if "abort" not in f.finish_reasons:   # an abort's timing is the client's
                self._e2e.observe(f.e2e_latency)
                self._req_prompt.observe(f.num_prompt_tokens)
                self._req_generation.observe(f.num_generation_tokens)
