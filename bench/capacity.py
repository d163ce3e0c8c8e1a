"""How many sequences of context C fit in a cache budget: TPA vs same-size MHA and GQA.

    python -m bench.capacity --model t6-medium --cache-bytes 80GiB --plot capacity.png
    python -m bench.capacity --model t6-medium --verify http://127.0.0.1:8000 \
        --verify-context 4096 --vocab-size 1000 --json verify.json

Arithmetic, all paged the same way (a sequence takes ceil(C / block_size) whole blocks,
the budget holds floor(budget / bytes_per_block) blocks):
  TPA      FactorCacheSpec.bytes_per_token: L (R_K + R_V)(h + d_h) itemsize (the engine's own
           sizing, so these numbers and the server's have one source)
  MHA      FactorCacheSpec.mha_bytes_per_token: L * 2 * (d_model / d_h) * d_h * itemsize
  GQA-g    L * 2 * g * d_h * itemsize, g KV heads of the same d_h
--verify URL sends N concurrent requests of C tokens (prompt C - output) to a running
tpaserve and polls its /metrics, reporting the most requests it held running at once
(tpaserve:num_requests_running). N defaults to what the server's cache holds:
tpaserve:factor_cache_blocks_total // ceil(C / block_size).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch

from bench.presets import PRESETS, model_config
from bench.serve import Progress, normalize_base_url, run_load
from bench.workload import make_requests
from tpaserve.models.loader import DTYPES
from tpaserve.runner.factor_cache import FactorCacheSpec

RUNNING = "tpaserve:num_requests_running"
WAITING = "tpaserve:num_requests_waiting"
CACHE_USAGE = "tpaserve:factor_cache_usage_perc"
NUM_BLOCKS = "tpaserve:factor_cache_blocks_total"


@dataclass(frozen=True)
class CacheLayout:
    """One model's cache, as far as capacity goes: bytes per token, paged in blocks."""
    name: str
    elems_per_token_layer: int
    bytes_per_token: int
    block_size: int

    def bytes_per_seq(self, context: int) -> int:
        return math.ceil(context / self.block_size) * self.block_size * self.bytes_per_token

    def seqs_that_fit(self, budget: int, context: int) -> int:
        blocks = budget // (self.block_size * self.bytes_per_token)
        return blocks // math.ceil(context / self.block_size)


def layouts(spec: FactorCacheSpec, gqa_kv_heads: Sequence[int] = (4, 2)) -> list[CacheLayout]:
    """TPA (from the spec), the same-size MHA, then GQA with each number of KV heads."""
    per_layer = lambda b: b // (spec.n_layer * spec.itemsize)          # bytes -> numbers
    out = [CacheLayout("TPA", per_layer(spec.bytes_per_token), spec.bytes_per_token,
                       spec.block_size),
           CacheLayout(f"MHA-{spec.mha_heads}", per_layer(spec.mha_bytes_per_token),
                       spec.mha_bytes_per_token, spec.block_size)]
    for g in gqa_kv_heads:
        b = spec.n_layer * 2 * g * spec.head_dim * spec.itemsize
        out.append(CacheLayout(f"GQA-{g}", per_layer(b), b, spec.block_size))
    return out


def capacity_table(models: Sequence[CacheLayout], budget: int,
                   contexts: Sequence[int]) -> list[dict]:
    """One row per context: sequences that fit, per model, and TPA's ratio over MHA."""
    rows = []
    for c in contexts:
        row = dict(context=c, **{m.name: m.seqs_that_fit(budget, c) for m in models})
        mha = row[models[1].name]
        row["tpa_over_mha"] = row["TPA"] / mha if mha else math.inf
        rows.append(row)
    return rows


def format_table(models: Sequence[CacheLayout], budget: int, rows: Sequence[dict],
                 title: str) -> str:
    lines = [f"{title}: cache budget {budget / 2**30:.2f} GiB, block {models[0].block_size}"]
    lines += [f"  {m.name:<8} {m.elems_per_token_layer:>6} numbers/token/layer  "
              f"{m.bytes_per_token:>8} B/token" for m in models]
    names = [m.name for m in models]
    lines.append(f"{'context':>9}" + "".join(f"{n:>10}" for n in names) + f"{'TPA/MHA':>9}")
    for r in rows:
        lines.append(f"{r['context']:>9}" + "".join(f"{r[n]:>10}" for n in names)
                     + f"{r['tpa_over_mha']:>9.2f}")
    return "\n".join(lines)


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """"80GiB", "16GB", "1.5e9", "1073741824" -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 80GiB, 16GB, 1e9)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# ---------------------------------------------------------------------------- --verify

def read_gauges(text: str, names: Sequence[str]) -> dict[str, float]:
    """Prometheus exposition text -> {name: value summed over label sets} for `names`."""
    from prometheus_client.parser import text_string_to_metric_families
    wanted, found = set(names), {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


async def served_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(base_url + "/v1/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


async def verify(base_url: str, context: int, output_len: int, *, num_requests: int | None,
                 block_size: int, vocab_size: int, model: str | None = None,
                 poll_s: float = 0.05, seed: int = 0, timeout: float = 3600.0) -> dict:
    """Send num_requests requests of `context` tokens at once; poll /metrics until they end.
    Returns what was sent, what the server reported at most, and the outcome."""
    base_url = normalize_base_url(base_url)
    async with httpx.AsyncClient(timeout=30.0) as client:
        model = model or await served_model(client, base_url)

        async def scrape() -> dict[str, float]:
            resp = await client.get(base_url + "/metrics")
            resp.raise_for_status()
            return read_gauges(resp.text, (RUNNING, WAITING, CACHE_USAGE, NUM_BLOCKS))

        before = await scrape()
        if RUNNING not in before:
            raise SystemExit(f"{base_url}/metrics has no {RUNNING}: is this a tpaserve server?")
        server_blocks = int(before[NUM_BLOCKS]) if NUM_BLOCKS in before else None
        if num_requests is None:
            if server_blocks is None:
                raise SystemExit(f"no {NUM_BLOCKS} in /metrics: pass --verify-requests")
            num_requests = server_blocks // math.ceil(context / block_size)
        if num_requests < 1:
            raise SystemExit(f"the server's cache ({server_blocks} blocks of {block_size}) "
                             f"holds no sequence of {context} tokens")
        specs = make_requests(num_requests, context - output_len, output_len, seed=seed,
                              token_ids=True, vocab_size=vocab_size)
        load = asyncio.create_task(run_load(
            base_url, model, specs, np.zeros(len(specs)), endpoint="completions",
            timeout=timeout, progress=Progress(len(specs), "verify")))
        peak = dict.fromkeys((RUNNING, WAITING, CACHE_USAGE), 0.0)
        timeline = []
        start = time.perf_counter()
        while not load.done():
            try:
                g = await scrape()
            except httpx.HTTPError:
                g = {}
            timeline.append([round(time.perf_counter() - start, 3),
                             g.get(RUNNING), g.get(WAITING), g.get(CACHE_USAGE)])
            for k in peak:
                peak[k] = max(peak[k], g.get(k, 0.0))
            await asyncio.sleep(poll_s)
        results, duration = await load
    return dict(url=base_url, model=model, context=context, output_len=output_len,
                requested=num_requests, server_num_blocks=server_blocks, block_size=block_size,
                max_running=int(peak[RUNNING]), max_waiting=int(peak[WAITING]),
                max_cache_usage=peak[CACHE_USAGE],
                completed=sum(r.ok for r in results),
                failed=sum(not r.ok for r in results), duration_s=duration,
                first_error=next((f"{r.status} {r.error}" for r in results if not r.ok), ""),
                timeline=timeline)


def format_verify(v: dict, models: Sequence[CacheLayout] | None = None) -> str:
    lines = [f"verify {v['url']}: {v['requested']} concurrent requests of {v['context']} tokens "
             f"(prompt {v['context'] - v['output_len']} + output {v['output_len']})",
             f"  max running at once (/metrics): {v['max_running']} of {v['requested']}   "
             f"max waiting: {v['max_waiting']}   max cache usage: {v['max_cache_usage']:.0%}",
             f"  completed {v['completed']}, failed {v['failed']} in {v['duration_s']:.1f} s"]
    if v["server_num_blocks"] and models:
        budget = v["server_num_blocks"] * models[0].block_size * models[0].bytes_per_token
        fits = ", ".join(f"{m.name} {m.seqs_that_fit(budget, v['context'])}" for m in models)
        lines.append(f"  the server's cache ({v['server_num_blocks']} blocks = "
                     f"{budget / 2**30:.2f} GiB) holds sequences of this context: {fits}")
    if v["first_error"]:
        lines.append(f"  first error: {v['first_error'][:200]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="t6-medium",
                    help=f"preset ({', '.join(PRESETS)}), checkpoint dir or config.json")
    ap.add_argument("--cache-bytes", type=parse_bytes, default=parse_bytes("80GiB"))
    ap.add_argument("--contexts", default="1024,4096,16384,32768,131072")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES) + ["fp8"],
                    help="the cache's dtype (fp8: --cache-dtype fp8, e4m3, 1 byte a number; "
                         "MHA / GQA then counted at 1 byte too)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gqa-kv-heads", default="4,2")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--plot", metavar="PNG", help="cache bytes per sequence vs context")
    v = ap.add_argument_group("--verify: against a running tpaserve")
    v.add_argument("--verify", metavar="URL")
    v.add_argument("--served-model-name", default=None, help="default: the server's first")
    v.add_argument("--verify-context", type=int, default=4096)
    v.add_argument("--verify-output-len", type=int, default=256,
                   help="long enough that the first requests are still running when the "
                        "server has admitted the last")
    v.add_argument("--verify-requests", type=int, default=None)
    v.add_argument("--vocab-size", type=int, default=50257, help="prompt ids < this")
    v.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = model_config(args.model)
    dtype = torch.float8_e4m3fn if args.dtype == "fp8" else DTYPES[args.dtype]
    spec = FactorCacheSpec.from_model(cfg, dtype, args.block_size)
    models = layouts(spec, [int(g) for g in args.gqa_kv_heads.split(",") if g])
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = capacity_table(models, args.cache_bytes, contexts)
    print(format_table(models, args.cache_bytes, rows, f"{cfg.name} ({args.dtype})"))
    result = dict(model=cfg.name, dtype=args.dtype, cache_bytes=args.cache_bytes,
                  block_size=args.block_size,
                  bytes_per_token={m.name: m.bytes_per_token for m in models},
                  elems_per_token_layer={m.name: m.elems_per_token_layer for m in models},
                  rows=rows)
    if args.verify:
        if args.verify_output_len >= args.verify_context:
            raise SystemExit("--verify-output-len must be smaller than --verify-context")
        v = asyncio.run(verify(args.verify, args.verify_context, args.verify_output_len,
                               num_requests=args.verify_requests, block_size=args.block_size,
                               vocab_size=args.vocab_size, model=args.served_model_name,
                               seed=args.seed))
        print(format_verify(v, models))
        result["verify"] = v
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        from bench.plots import plot_capacity
        grid = sorted(set(contexts) | {2**k for k in range(8, 18)})
        plot_capacity(grid, {m.name: [m.bytes_per_seq(c) for c in grid] for m in models},
                      args.plot, args.cache_bytes)
    return result


if __name__ == "__main__":
    main()
