"""Serving load generator for any OpenAI-compatible endpoint (tpaserve, vLLM, ...).

    python -m bench.serve --base-url http://127.0.0.1:8000 --model t6-medium \
        --token-ids --vocab-size 50257 --input-len 512 --output-len 256 \
        --concurrency 1,4,16,64,256 --num-prompts 8,16,64,256,512 --json out.json --plot out.png

Requests arrive as a Poisson process of --request-rate requests/s (inf: all at once), with at
most --concurrency in flight (a client-side semaphore; the clock of a request starts when it
is sent, so client queueing is not in its latency). A comma list in --concurrency and/or
--request-rate sweeps every combination; --num-prompts is one value or one per point. Every
point is one row (bench/metrics.py) in one JSON file: {"config": ..., "rows": [...]}.
Timing and token counting: bench/client.py.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from bench.client import RequestResult, send
from bench.metrics import format_row, summarize
from bench.workload import RequestSpec, make_requests, poisson_arrivals


class Progress:
    """`done/total` on stderr: redrawn in place on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int, label: str = "", enabled: bool = True):
        self.total, self.label, self.done = total, label, 0
        self.enabled = enabled and total > 0
        self.tty = sys.stderr.isatty()
        self._last_decile = -1

    def step(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            filled = 30 * self.done // self.total
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                             f"{self.done}/{self.total}")
            if self.done == self.total:
                sys.stderr.write("\n")
        elif (decile := 10 * self.done // self.total) != self._last_decile:
            self._last_decile = decile
            sys.stderr.write(f"{self.label} {self.done}/{self.total}\n")
        sys.stderr.flush()


def normalize_base_url(url: str) -> str:
    """Accept http://host:port, .../ and .../v1 alike."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def run_load(base_url: str, model: str, specs: Sequence[RequestSpec],
                   arrivals: Sequence[float], *, concurrency: int | None = None,
                   endpoint: str = "completions", headers: dict | None = None,
                   extra_body: dict | None = None, max_time: float | None = None,
                   timeout: float = 3600.0,
                   progress: Progress | None = None) -> tuple[list[RequestResult], float]:
    """Send specs[i] at arrivals[i] s after the start (bounded by `concurrency` in flight).
    After `max_time` s no new request is sent; those already sent finish. Returns the
    results of the requests sent, in send order, and the wall duration."""
    base_url = normalize_base_url(base_url)
    limit = concurrency or len(specs) or 1
    gate = asyncio.Semaphore(limit)
    http_limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)

    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout), limits=http_limits) as client:
        async def one(spec: RequestSpec) -> RequestResult:
            try:
                return await send(client, base_url, spec, model, endpoint, headers, extra_body)
            finally:
                gate.release()
                if progress:
                    progress.step()

        tasks = []
        start = time.perf_counter()
        for spec, at in zip(specs, arrivals):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            if max_time is not None and time.perf_counter() - start > max_time:
                gate.release()
                break
            tasks.append(asyncio.create_task(one(spec)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    return results, duration


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def sweep_points(args: argparse.Namespace) -> list[dict]:
    """Every (request_rate, concurrency) combination with its number of prompts."""
    points = [dict(request_rate=r, concurrency=c)
              for r, c in itertools.product(args.request_rate, args.concurrency)]
    if len(args.num_prompts) not in (1, len(points)):
        raise SystemExit(f"--num-prompts has {len(args.num_prompts)} values for "
                         f"{len(points)} sweep points: give one, or one per point")
    counts = args.num_prompts * len(points) if len(args.num_prompts) == 1 else args.num_prompts
    for p, n in zip(points, counts):
        p["num_prompts"] = n
    return points


def _rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate      # JSON has no infinity


def _headers(args: argparse.Namespace) -> dict | None:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None


async def run_point(args: argparse.Namespace, point: dict, seed: int) -> dict:
    conc = point["concurrency"] or None
    specs = make_requests(point["num_prompts"], args.input_len, args.output_len, seed=seed,
                          token_ids=args.token_ids, vocab_size=args.vocab_size,
                          shared_prefix_len=args.shared_prefix_len,
                          num_prefixes=args.num_prefixes)
    arrivals = poisson_arrivals(len(specs), point["request_rate"], seed=seed + 1)
    label = f"c={conc or 'inf'} rate={_rate_label(point['request_rate'])}"
    progress = Progress(len(specs), label, enabled=not args.no_progress and len(specs) >= 16)
    results, duration = await run_load(
        args.base_url, args.model, specs, arrivals, concurrency=conc, endpoint=args.endpoint,
        headers=_headers(args), extra_body=dict(temperature=args.temperature),
        max_time=args.max_time, timeout=args.timeout, progress=progress)
    return summarize(results, duration, label=args.label, model=args.model,
                     endpoint=args.endpoint, concurrency=conc,
                     request_rate=_rate_label(point["request_rate"]),
                     num_prompts=point["num_prompts"], sent=len(results),
                     input_len=args.input_len, output_len=args.output_len,
                     temperature=args.temperature, shared_prefix_len=args.shared_prefix_len,
                     num_prefixes=args.num_prefixes if args.shared_prefix_len else 0)


async def warm_up(args: argparse.Namespace) -> None:
    """A few requests first, not measured (compilation, CUDA graphs, connection set-up)."""
    specs = make_requests(args.warmup, args.input_len, min(args.output_len, 16),
                          seed=args.seed + 10_000, token_ids=args.token_ids,
                          vocab_size=args.vocab_size)
    results, _ = await run_load(args.base_url, args.model, specs, np.zeros(len(specs)),
                                endpoint=args.endpoint, headers=_headers(args),
                                timeout=args.timeout,
                                extra_body=dict(temperature=args.temperature))
    bad = [r for r in results if not r.ok]
    if bad:
        raise SystemExit(f"warm-up: {len(bad)} of {len(results)} requests failed: "
                         f"{bad[0].status} {bad[0].error}")


def write_json(path: str, config: dict, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(dict(config=config, rows=rows), indent=1))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="the model name the server serves")
    ap.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    ap.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    ap.add_argument("--label", default="", help="names this run's rows (e.g. the server)")
    ap.add_argument("--request-rate", type=_floats, default=[math.inf],
                    help="requests/s, Poisson arrivals; inf = all at once; comma list sweeps")
    ap.add_argument("--concurrency", type=_ints, default=[0],
                    help="max requests in flight (0 = unbounded); comma list sweeps")
    ap.add_argument("--num-prompts", type=_ints, default=[100],
                    help="requests per point: one value, or one per sweep point")
    ap.add_argument("--input-len", type=int, default=512,
                    help="prompt tokens (--token-ids) or words, after any shared prefix")
    ap.add_argument("--output-len", type=int, default=128,
                    help="max_tokens, with ignore_eos so every request generates exactly this")
    ap.add_argument("--token-ids", action="store_true",
                    help="send prompts as token-id lists (completions only): exact lengths")
    ap.add_argument("--vocab-size", type=int, default=50257,
                    help="token ids are drawn from [0, vocab-size): the server's tokenizer's")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="sampling temperature sent with every request (0: greedy)")
    ap.add_argument("--shared-prefix-len", type=int, default=0)
    ap.add_argument("--num-prefixes", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    ap.add_argument("--max-time", type=float, default=None,
                    help="per point: stop sending new requests after this many seconds")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per request, seconds")
    ap.add_argument("--json", metavar="OUT", help="write {config, rows} here")
    ap.add_argument("--plot", metavar="PNG", help="plot the rows (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.token_ids and args.endpoint == "chat":
        ap.error("--token-ids needs --endpoint completions (chat messages are text)")
    if any(c < 0 for c in args.concurrency) or any(r <= 0 for r in args.request_rate):
        ap.error("--concurrency must be >= 0 and --request-rate > 0")
    return args


def run_config(args: argparse.Namespace) -> dict:
    """The flags, as JSON can hold them (no infinity), without the API key."""
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    config["request_rate"] = [_rate_label(r) for r in args.request_rate]
    return config


async def amain(args: argparse.Namespace) -> list[dict]:
    if args.warmup:
        await warm_up(args)
    rows = []
    for i, point in enumerate(sweep_points(args)):
        row = await run_point(args, point, seed=args.seed + 7919 * i)
        print(format_row(row) + "\n", flush=True)
        rows.append(row)
        if args.json:        # after every point, so a cut-off sweep keeps what it measured
            write_json(args.json, run_config(args), rows)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = asyncio.run(amain(args))
    if args.plot:
        from bench.plots import plot_serving
        plot_serving(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
