"""Every Prometheus metric tpaserve exports, defined once, here.

Metric names are an interface: the Grafana dashboards under deploy/ may only query names
defined in this module. Names follow vLLM's (`vllm:` -> `tpaserve:`), and every metric has
the label `model_name`. Counters are declared with their exposed `_total` name
(prometheus-client would add the suffix anyway), so a grep finds what Prometheus shows.

Two kinds of updates, both reading the engine, never request bodies:
  * `EngineMetrics.observe(out)` for every RequestOutput the engine emits (token counts,
    finished requests) and `observe_abort` for a request dropped before it finished;
  * `EngineMetrics.refresh()` copies the engine's gauges (queue lengths, cache usage) and
    its own counters (preemptions, prefix-cache lookups) at scrape time.
`refresh` only reads ints and list lengths the step thread writes, so it needs no lock.
"""
from __future__ import annotations

from prometheus_client import Counter, Gauge, disable_created_metrics

# No `*_created` series: they double the exposition and no dashboard reads them (vLLM too).
disable_created_metrics()

LABELS = ["model_name"]

NUM_REQUESTS_RUNNING = Gauge(
    "tpaserve:num_requests_running", "Sequences in the running batch (a request with n > 1 "
    "counts n).", LABELS)
NUM_REQUESTS_WAITING = Gauge(
    "tpaserve:num_requests_waiting", "Sequences waiting to run (preempted ones included).",
    LABELS)
FACTOR_CACHE_USAGE = Gauge(
    "tpaserve:factor_cache_usage_perc", "Fraction of factor-cache blocks in use (0 to 1).",
    LABELS)
FACTOR_CACHE_USED_BLOCKS = Gauge(
    "tpaserve:factor_cache_used_blocks", "Factor-cache blocks referenced by a request.", LABELS)
FACTOR_CACHE_NUM_BLOCKS = Gauge(
    "tpaserve:factor_cache_num_blocks", "Factor-cache blocks in total.", LABELS)

PROMPT_TOKENS = Counter(
    "tpaserve:prompt_tokens_total", "Prompt tokens of requests that started generating "
    "(prefix-cache hits included).", LABELS)
GENERATION_TOKENS = Counter(
    "tpaserve:generation_tokens_total", "Tokens generated.", LABELS)
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

FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineMetrics:
    """The metrics of one LLMEngine served under `model_name`."""

    def __init__(self, engine, model_name: str):
        self.engine, self.model_name = engine, model_name
        self._last = dict(preemptions=0, prefix_queries=0, prefix_hits=0)
        label = dict(model_name=model_name)
        self._running = NUM_REQUESTS_RUNNING.labels(**label)
        self._waiting = NUM_REQUESTS_WAITING.labels(**label)
        self._usage = FACTOR_CACHE_USAGE.labels(**label)
        self._used = FACTOR_CACHE_USED_BLOCKS.labels(**label)
        self._total = FACTOR_CACHE_NUM_BLOCKS.labels(**label)
        self._prompt = PROMPT_TOKENS.labels(**label)
        self._generation = GENERATION_TOKENS.labels(**label)
        self._preemptions = NUM_PREEMPTIONS.labels(**label)
        self._prefix_queries = PREFIX_CACHE_QUERIES.labels(**label)
        self._prefix_hits = PREFIX_CACHE_HITS.labels(**label)
        # every finish reason shows from the start (as 0), so rate() works on the first one
        self._success = {r: REQUEST_SUCCESS.labels(model_name=model_name, finished_reason=r)
                         for r in FINISH_REASONS}
        self.refresh()

    def observe(self, out, first: bool) -> None:
        """One RequestOutput of a request; `first`: its first output (prompt is counted)."""
        if first:
            self._prompt.inc(len(out.prompt_token_ids))
        self._generation.inc(sum(len(c.token_ids_delta) for c in out.outputs))
        if out.finished:
            for c in out.outputs:
                self._success[c.finish_reason or "abort"].inc()

    def observe_abort(self, num_sequences: int) -> None:
        """A request dropped before it finished (client went away)."""
        self._success["abort"].inc(num_sequences)

    def refresh(self) -> None:
        eng = self.engine
        sched, blocks = eng.scheduler, eng.blocks
        self._running.set(len(sched.running))
        self._waiting.set(len(sched.waiting))
        self._used.set(blocks.num_used)
        self._total.set(blocks.num_blocks)
        self._usage.set(blocks.usage)
        for key, value, counter in (
                ("preemptions", sched.num_preemptions, self._preemptions),
                ("prefix_queries", blocks.prefix_queries, self._prefix_queries),
                ("prefix_hits", blocks.prefix_hits, self._prefix_hits)):
            if value > self._last[key]:
                counter.inc(value - self._last[key])
            self._last[key] = value
