"""Skinny GEMM (tpaserve/kernels/linear.py) against cuBLAS (F.linear) at T6-medium's per-layer
GEMM shapes and decode batch sizes (run on the device machine, PYTHONPATH=.).

    python3 bench/gemm.py [--sweep] [--jobs 14] [--ms 1,2,4,8,16,32,64,128] [--fresh-x]
        [--out $OUT]

1. Correctness first: every shape x M, bf16, the launcher's default config against F.linear
   (relative-norm error vs an fp32 reference, both cuBLAS's and ours), and a second call
   must give bit-identical output (split-K counters reset, reduction order fixed).
2. Timing: CUDA-graph replay of R back-to-back calls that rotate over copies of the weight
   (> 200 MB of copies, so weights come from HBM as in a decode step, never from L2); time
   per call = replay time / R, median of 5 replays. This includes the ~1 us gap between
   kernels in a graph, as the decode step pays it.
3. --sweep: tile configs per (shape, M) (compiled in parallel by --jobs worker processes
   first), each checked against F.linear before it is timed; best per point.

GB/s = weight bytes / time (x and y are KB). Writes $OUT/gemm.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict

import torch
import torch.nn.functional as F
import triton

from tpaserve.kernels import linear as lk
from tpaserve.kernels.linear import SkinnyConfig

# T6-medium per-layer GEMMs: (name, N, K); y (M, N) = x (M, K) @ W (N, K)^T
SHAPES = [("qkv", 1120, 1024), ("attn_proj", 1024, 3008), ("mlp_fc", 5472, 1024),
          ("mlp_proj", 1024, 2736)]
MS = [1, 2, 4, 8, 16, 32, 64, 128]
ROTATE_BYTES = 240e6        # weight copies per timed graph: several times the 50 MB L2
DT = torch.bfloat16


def log(*a):
    print(*a, flush=True)


def copy_gbs() -> float:
    try:
        from bench.kernels import copy_bandwidth
        return copy_bandwidth()
    except Exception as e:                      # bench/kernels.py imports the decode kernel
        log(f"copy bandwidth not measured ({type(e).__name__}: {e})")
        return float("nan")


# ----------------------------------------------------------------------------- candidates

def candidates(M: int, N: int, K: int, sms: int) -> list[SkinnyConfig]:
    """Tile designs x the split-K values that put ~1-4 programs on every SM, and for
    M <= 8 the CUDA-core broadcast path with few W rows and long K steps per program."""
    bm = max(16, triton.next_power_of_2(M))
    if bm <= 16:
        designs = [(16, 128, 6, 4), (16, 128, 8, 4), (16, 64, 8, 4), (16, 256, 4, 4),
                   (32, 128, 4, 4), (32, 128, 6, 4), (32, 64, 8, 4), (64, 128, 4, 8)]
    elif bm <= 64:
        designs = [(16, 256, 3, 4), (16, 128, 4, 4), (16, 128, 6, 4), (32, 128, 4, 4),
                   (32, 128, 5, 4), (32, 64, 6, 4), (64, 64, 5, 4)]
    else:
        designs = [(16, 64, 4, 4), (16, 128, 3, 4), (32, 64, 4, 4), (32, 128, 3, 8),
                   (64, 64, 3, 8)]
    out = []
    for bn, bk, st, w in designs:
        if st * (bm + bn) * bk * 2 > 200 * 1024:                 # shared memory
            continue
        tiles = -(-N // bn) * -(-M // bm)
        s1 = 1
        while tiles * s1 < sms and s1 < 16:
            s1 *= 2
        for s in sorted({1, max(1, s1 // 2), s1, s1 * 2}):
            if tiles * s > 5 * sms and s > 1:
                continue
            if s > 1 and -(-K // s) < bk:
                continue
            out.append(SkinnyConfig(bm, bn, bk, s, w, st, True))
    if M <= 8:                                                   # CUDA-core broadcast
        kmax = triton.next_power_of_2(K)
        for bn in (1, 2, 4, 8):
            for bk in (512, 1024, 2048, 4096):
                if bk > kmax or (bk == 512 and bn < 8):
                    continue
                for w in (4, 8):
                    if M * bn * bk > 128 * 32 * w:                # fp32 products / thread
                        continue
                    for s in ((1, 2) if K > 2 * bk else (1,)):
                        for st in ((2,) if K > bk else (1,)):
                            out.append(SkinnyConfig(M, bn, bk, s, w, st, False))
    return out


def _precompile(jobs: list[tuple[int, int, int, SkinnyConfig]]) -> list[str]:
    """Worker: launch each config once at its real shape (fills Triton's disk cache)."""
    errors = []
    for M, N, K, cfg in jobs:
        try:
            x = torch.randn(M, K, device="cuda", dtype=DT)
            w = torch.randn(N, K, device="cuda", dtype=DT)
            lk.linear(x, w, config=cfg)
            torch.cuda.synchronize()
        except Exception as e:
            errors.append(f"{M} {N} {K} {cfg}: {type(e).__name__}: {str(e)[:200]}")
    return errors


def precompile_all(points, jobs: int) -> None:
    """Compile every (config, specialization) once, spread over worker processes."""
    seen, work = set(), []
    for M, N, K, cfgs in points:
        for c in cfgs:
            k_split = -(-(-(-K // c.split_k)) // c.block_k) * c.block_k
            key = (c.block_m, c.block_n, c.block_k, -(-K // k_split), c.num_warps,
                   c.num_stages, c.dot, K % c.block_k == 0)         # what the kernel sees
            if key not in seen:
                seen.add(key)
                work.append((M, N, K, c))
    log(f"precompiling {len(work)} kernels on {jobs} processes")
    t0 = time.time()
    import multiprocessing as mp
    chunks = [work[i::jobs] for i in range(jobs)]
    try:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            for errs in ex.map(_precompile, chunks):
                for e in errs[:3]:
                    log("  compile error:", e)
    except Exception as e:
        log(f"parallel precompile failed ({type(e).__name__}: {e}); compiling serially")
    log(f"precompile {time.time() - t0:.1f} s")


# --------------------------------------------------------------------------------- timing

def graph_time_us(calls) -> float:
    """calls: one callable per weight copy. Median over 5 replays of the per-call time."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in calls:
            f()
    g.replay()
    torch.cuda.synchronize()
    reps = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        reps.append(s.elapsed_time(e) * 1e3 / len(calls))
    del g
    return statistics.median(reps)


class Point:
    def __init__(self, N, K, M, weights, fresh_x=False):
        self.N, self.K, self.M = N, K, M
        self.ws = weights
        self.x = torch.randn(M, K, device="cuda", dtype=DT)
        # fresh_x: a different x per call too (x not left in L2/L1 by the previous call)
        self.xs = [torch.randn(M, K, device="cuda", dtype=DT) for _ in weights] if fresh_x \
            else [self.x] * len(weights)
        self.y = torch.empty(M, N, device="cuda", dtype=DT)
        self.ref = F.linear(self.x.float(), weights[0].float())

    def err(self, y) -> float:
        return ((y.float() - self.ref).norm() / self.ref.norm()).item()

    def cublas(self) -> float:
        return graph_time_us([lambda w=w, x=x: F.linear(x, w) for w, x in zip(self.ws, self.xs)])

    def ours(self, cfg) -> float:
        return graph_time_us([lambda w=w, x=x: lk.linear(x, w, self.y, config=cfg)
                              for w, x in zip(self.ws, self.xs)])


def check(points_ms) -> bool:
    ok_all = True
    for name, N, K in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=DT) * 0.05
        for M in points_ms:
            x = torch.randn(M, K, device="cuda", dtype=DT)
            ref = F.linear(x.float(), w.float())
            a = lk.linear(x, w)
            b = lk.linear(x, w)
            e_ours = ((a.float() - ref).norm() / ref.norm()).item()
            e_cub = ((F.linear(x, w).float() - ref).norm() / ref.norm()).item()
            same = torch.equal(a, b)
            ok = e_ours < max(2 * e_cub, 5e-3) and same
            ok_all &= ok
            log(f"check {name:9s} M={M:3d} err {e_ours:.1e} (cuBLAS {e_cub:.1e}) "
                f"repeat-identical={same} {'ok' if ok else 'FAIL'}")
    return ok_all


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--jobs", type=int, default=14)
    ap.add_argument("--ms", default=",".join(map(str, MS)))
    ap.add_argument("--fresh-x", action="store_true", help="rotate x as well as W")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    ms = [int(m) for m in a.ms.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, sms=sms, command=" ".join(sys.argv), rows=[])
    res["copy_gbs"] = cb = copy_gbs()
    log(f"{res['device']} torch {torch.__version__} triton {triton.__version__}, {sms} SMs, "
        f"copy {cb:.0f} GB/s")
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gemm.json")
    cands = {}
    if a.sweep:
        for _, N, K in SHAPES:
            for M in ms:
                cands[(N, K, M)] = candidates(M, N, K, sms)
        if a.jobs > 1:
            precompile_all([(M, N, K, c) for (N, K, M), c in cands.items()], a.jobs)
    res["check_ok"] = check(ms)
    for name, N, K in SHAPES:
        copies = max(20, math.ceil(ROTATE_BYTES / (N * K * 2)))
        weights = [torch.randn(N, K, device="cuda", dtype=DT) * 0.05 for _ in range(copies)]
        nbytes = N * K * 2
        for M in ms:
            p = Point(N, K, M, weights, a.fresh_x)
            cfg = lk.skinny_config(M, N, K, torch.device("cuda"))
            t_cub = p.cublas()
            t_def = p.ours(cfg)
            row = dict(shape=name, N=N, K=K, M=M, bytes=nbytes, cublas_us=t_cub,
                       ours_us=t_def, ours_config=asdict(cfg), use_skinny=lk.use_skinny(M, N, K),
                       cublas_gbs=nbytes / t_cub / 1e3, ours_gbs=nbytes / t_def / 1e3)
            if a.sweep:
                swept = []
                for c in cands[(N, K, M)]:
                    try:
                        p.y.fill_(float("nan"))
                        lk.linear(p.x, weights[0], p.y, config=c)
                        e = p.err(p.y)
                        if not e < 1e-2:
                            log(f"  WRONG {name} M={M} {c}: err {e:.2e}")
                            continue
                        swept.append((p.ours(c), c))
                    except Exception as ex:
                        log(f"  skip {name} M={M} {c}: {type(ex).__name__}: {str(ex)[:120]}")
                swept.sort(key=lambda t: t[0])
                row["sweep"] = [dict(us=t, **asdict(c)) for t, c in swept]
                if swept:
                    row["best_us"], row["best_config"] = swept[0][0], asdict(swept[0][1])
            res["rows"].append(row)
            best = (f"  best {row['best_us']:6.2f} us {tuple(row['best_config'].values())}"
                    if "best_us" in row else "")
            log(f"{name:9s} M={M:3d}: cuBLAS {t_cub:6.2f} us {row['cublas_gbs']:5.0f} GB/s | "
                f"skinny {t_def:6.2f} us {row['ours_gbs']:5.0f} GB/s "
                f"x{t_cub / t_def:.2f}{best}")
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
        del weights
        torch.cuda.empty_cache()
    log("\n| shape (N x K) | M | cuBLAS us | GB/s | skinny us | GB/s | speedup |"
        + (" best swept us |" if a.sweep else ""))
    log("|---|---|---|---|---|---|---|" + ("---|" if a.sweep else ""))
    for r in res["rows"]:
        log(f"| {r['shape']} ({r['N']} x {r['K']}) | {r['M']} | {r['cublas_us']:.2f} | "
            f"{r['cublas_gbs']:.0f} | {r['ours_us']:.2f} | {r['ours_gbs']:.0f} | "
            f"{r['cublas_us'] / r['ours_us']:.2f} |"
            + (f" {r.get('best_us', float('nan')):.2f} |" if a.sweep else ""))
    for M in ms:
        rs = [r for r in res["rows"] if r["M"] == M]
        if len(rs) == len(SHAPES):
            log(f"per layer M={M:3d}: cuBLAS {sum(r['cublas_us'] for r in rs):6.1f} us, skinny "
                f"{sum(r['ours_us'] for r in rs):6.1f} us"
                + (f", best swept {sum(r.get('best_us', math.nan) for r in rs):6.1f} us"
                   if a.sweep else ""))
    with open(path, "w") as f:
        json.dump(res, f, indent=1)
    if not res["check_ok"]:
        log("CHECK FAILED")
        sys.exit(1)


if __name__ == "__main__":
    main()
