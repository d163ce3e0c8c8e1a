"""Paged prefill/extend kernel timing on the device (T6-medium shape, bf16): a chunk of n
queries of one sequence at the end of a context of L tokens (chunked prefill of a long
prompt, or a prompt after a prefix-cache hit), checked against the torch reference first.

    PYTHONPATH=. python3 bench/prefill.py [--configs 64,64,4,2 ...] [--out DIR]

FLOPs counted: per head, the causal (query, position) pairs x (R_K + R_V) x 2 d_h (the
q . B_K and p . B_V products of every rank, as the kernel computes them).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton

from tests.kernels.paged_case import make_case, rel_err
from tpaserve.kernels.prefill import PrefillConfig, prefill_attention

T6 = dict(h=47, d_h=64, r_k=2, r_v=2, bs=16)
POINTS = [(2048, 2048), (2048, 8192), (2048, 32768), (512, 512), (512, 4096)]   # (n, L)


def case(n: int, L: int, seed: int = 0):
    return make_case([L], [n], T6["h"], T6["d_h"], T6["r_k"], T6["r_v"], T6["bs"],
                     torch.bfloat16, "cuda", seed=seed)


def flops(n: int, L: int) -> float:
    pairs = sum(L - n + i + 1 for i in range(n))
    return pairs * T6["h"] * (T6["r_k"] + T6["r_v"]) * 2 * T6["d_h"]


def run(c, cfg):
    return prefill_attention(c.q, *c.caches(), *c.metadata()[:3], c.max_query_len, config=cfg)


def engine_steps(prompt_len: int = 32768) -> list[dict]:
    """A whole T6-medium engine prefilling one long prompt in chunks of 2048 (the default
    budget): wall time of each step, as the context grows."""
    import time

    from bench.engine_step import MEDIUM, make_model
    from tpaserve.config import ModelConfig
    from tpaserve.frontend.llm_engine import build_engine
    from tpaserve.sampling_params import SamplingParams
    cfg = ModelConfig(**{**MEDIUM, "max_position": prompt_len + 256})
    eng = build_engine(make_model(cfg), cache_memory=4 * 2**30)
    eng.add_request("long", [i % 50000 + 1 for i in range(prompt_len)],
                    SamplingParams(max_tokens=1, temperature=0))
    rows = []
    while eng.has_unfinished_requests():
        req = eng.core.scheduler.requests.get("long#0")
        ctx = req.num_computed_tokens if req else -1
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        rows.append(dict(context_before=ctx, ms=1e3 * (time.perf_counter() - t)))
    for r in rows[::4] + rows[-1:]:
        print(f"engine prefill step at context {r['context_before']}: {r['ms']:.1f} ms", flush=True)
    print(f"engine: {prompt_len} tokens in {sum(r['ms'] for r in rows):.0f} ms", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="*", default=["64,64,4,2"],
                    help="block_m,block_n,num_warps,num_stages ...")
    ap.add_argument("--engine", action="store_true", help="also time a whole engine prefill")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    if a.engine:
        engine_steps()
    cfgs = [PrefillConfig(*map(int, s.split(","))) for s in a.configs]
    c = case(300, 1000, seed=1)
    want = c.reference()
    for cfg in cfgs:
        print(f"check {cfg}: rel err {rel_err(run(c, cfg), want):.2e}", flush=True)
    rows = []
    print("| n | L | config | ms | TFLOP/s |")
    print("|---|---|---|---|---|")
    for n, L in POINTS:
        c = case(n, L)
        for cfg in cfgs:
            ms = triton.testing.do_bench(lambda: run(c, cfg), warmup=5, rep=50)
            tf = flops(n, L) / ms / 1e9
            rows.append(dict(n=n, L=L, config=list(cfg.__dict__.values()), ms=ms, tflops=tf))
            print(f"| {n} | {L} | {tuple(cfg.__dict__.values())} | {ms:.2f} | {tf:.1f} |",
                  flush=True)
        del c
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "prefill.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
