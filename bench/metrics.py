"""Load-run results -> one row of numbers (the JSON schema every bench tool writes) and its
one-screen text summary.

Definitions (per successful request, then aggregated; times in ms in the row):
  TTFT  time to the first streamed text
  TPOT  (e2e - TTFT) / (n_out - 1): mean time per output token after the first; requests
        with a single output token have none
  ITL   every gap between consecutive arrivals, pooled over requests
  E2EL  end-to-end latency
Each gets mean, median and p99 (numpy's linear-interpolation percentile). Throughputs divide
by the run's wall duration (first send to last completion): requests/s, output tokens/s,
and prompt + output tokens/s over successful requests. Failed requests count by status.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

from bench.client import RequestResult

STATS = ("mean", "median", "p99")
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def stats(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean / median / p99 of seconds, in ms; None for an empty sample."""
    if len(values_s) == 0:
        return dict.fromkeys(STATS)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return dict(mean=float(ms.mean()), median=float(np.median(ms)),
                p99=float(np.percentile(ms, 99)))


def tpot(r: RequestResult) -> float | None:
    """(e2e - ttft) / (n_out - 1) seconds, or None with fewer than two output tokens."""
    if r.output_tokens < 2:
        return None
    return (r.latency - r.ttft) / (r.output_tokens - 1)


def summarize(results: Sequence[RequestResult], duration_s: float, **config) -> dict:
    """The row: `config` (label, concurrency, request_rate, lengths...) then the numbers."""
    ok = [r for r in results if r.ok]
    samples = dict(ttft=[r.ttft for r in ok], e2el=[r.latency for r in ok],
                   tpot=[t for r in ok if (t := tpot(r)) is not None],
                   itl=[g for r in ok for g in r.itl])
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    row = dict(config)
    row.update(completed=len(ok), failed=len(results) - len(ok),
               errors=dict(Counter(r.status for r in results if not r.ok)),
               first_error=next((r.error for r in results if not r.ok), ""),
               duration_s=duration_s, total_input_tokens=in_tokens,
               total_output_tokens=out_tokens, request_throughput=per_s(len(ok)),
               output_throughput=per_s(out_tokens),
               total_token_throughput=per_s(in_tokens + out_tokens))
    for name in LATENCIES:
        for stat, value in stats(samples[name]).items():
            row[f"{stat}_{name}_ms"] = value
    return row


def _ms(v: float | None) -> str:
    return f"{'-':>10}" if v is None or math.isnan(v) else f"{v:10.2f}"


def format_row(row: dict) -> str:
    """One screen: what ran, throughputs, then a latency table."""
    rate = row.get("request_rate", "inf")
    head = (f"{row.get('label', '')}  concurrency={row.get('concurrency')}  "
            f"request_rate={rate}  prompt={row.get('input_len')}"
            f"{'+' + str(row['shared_prefix_len']) if row.get('shared_prefix_len') else ''}"
            f"  output={row.get('output_len')}")
    lines = [head.strip(), "-" * 64,
             f"completed / failed        {row['completed']} / {row['failed']}"
             + (f"   errors {row['errors']}" if row["errors"] else ""),
             f"duration                  {row['duration_s']:.2f} s",
             f"request throughput        {row['request_throughput']:.2f} req/s",
             f"output token throughput   {row['output_throughput']:.1f} tok/s",
             f"total token throughput    {row['total_token_throughput']:.1f} tok/s",
             f"{'latency (ms)':<16}" + "".join(f"{s:>10}" for s in STATS)]
    for name in LATENCIES:
        lines.append(f"{name.upper():<16}" + "".join(_ms(row[f'{s}_{name}_ms']) for s in STATS))
    if row["failed"] and row.get("first_error"):
        lines.append(f"first error: {row['first_error'][:200]}")
    return "\n".join(lines)


def batch_row(label: str, batch: int, input_len: int, output_len: int, ttft_s: float,
              total_s: float, itl_s: Sequence[float] = (), **config) -> dict:
    """The row of an offline batch (the baselines): `batch` requests that start together,
    get their first token after ttft_s and finish after total_s, with per-step gaps itl_s
    (may be unknown). Same schema and definitions as a served run, with concurrency =
    batch, so both plot on one axis."""
    one = dict(ok=True, status="200", prompt_len=input_len, output_tokens=output_len,
               ttft=ttft_s, latency=total_s, itl=list(itl_s))
    results = [RequestResult(**one) for _ in range(batch)]
    return summarize(results, total_s, label=label, concurrency=batch, request_rate="inf",
                     num_prompts=batch, sent=batch, input_len=input_len,
                     output_len=output_len, **config)
