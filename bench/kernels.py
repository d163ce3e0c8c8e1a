"""Decode kernel benchmark on the GPU (run on the device machine, PYTHONPATH=.).

    python3 bench/kernels.py --check --table [--quick]       (the table in the docs)

--check   bf16 correctness at real sizes against reference.py (relative-norm error)
--sweep   tile configs (head block, BLOCK_N, warps, stages) at 64 x 32K, both shapes, with
          registers/spills; the best is used by --splits / --table in the same run
--splits  split-K sweep for the heuristic in decode.py
--launch  batch 1 x 4K launch cost only (also part of --table)
--midbatch-sweep  batch 16/64 x 512/1K: tiles x grid splits x min_split inside CUDA graphs
          (the short contexts a serving sweep decodes at; for num_splits_for/min_split_for)
--table   batch {1,16,64,256} x context {1K,4K,32K,128K}, T6-medium (h 47, d_h 64, R 2)
          and the paper's shape (h 32, d_h 64, R 1), next to PyTorch SDPA decode for MHA
          (16 heads, d_h 64) and GQA (2 KV heads); writes kernels.json and kernels.png

Times are triton.testing.do_bench medians; do_bench zeroes a 256 MB buffer before every
timed call, so inputs smaller than L2 are not read from cache (same effect as rotating).
"Bytes" are the factor (or K/V) bytes a call must read; "% copy" divides GB/s by the
device-to-device copy bandwidth (read + write) measured at the start of the same run.
Batch-1 launch cost: `wall` is back-to-back calls timed by the host clock (launch-bound),
`graph` the same call replayed from a CUDA graph.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from tpaserve.kernels import decode as dec
from tpaserve.kernels.ops import paged_attention
from tpaserve.kernels.reference import paged_attention_ref

SHAPES = {"t6-medium": dict(h=47, d=64, rk=2, rv=2), "paper": dict(h=32, d=64, rk=1, rv=1)}
BATCHES = [1, 16, 64, 256]
CONTEXTS = [1024, 4096, 32768, 131072]
BS = 16
MEM_LIMIT = 60e9            # bytes of cache one point may allocate


def log(*a):
    print(*a, flush=True)


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), return_mode="median")
    del x, y
    return 2 * 2 * 1024**3 / (t * 1e-3) / 1e9


class Paged:
    """A bf16 factor cache for B sequences of length L with shuffled block tables."""

    def __init__(self, B, L, h, d, rk, rv, bs=BS, seed=0, ordered=False):
        g = torch.Generator(device="cuda").manual_seed(seed)
        nblk = -(-L // bs)
        nb = B * nblk
        r = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)
        self.ak, self.bk = r(nb, bs, h, rk), r(nb, bs, rk, d)
        self.av, self.bv = r(nb, bs, h, rv), r(nb, bs, rv, d)
        self.q = r(B, h, d)
        order = (torch.arange(nb, device="cuda") if ordered
                 else torch.randperm(nb, device="cuda", generator=g))
        self.tables = order.to(torch.int32).view(B, nblk)
        self.seq_lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        self.qsl = torch.arange(B + 1, dtype=torch.int32, device="cuda")
        self.B, self.L, self.h, self.d = B, L, h, d
        self.bytes = B * L * (rk + rv) * (h + d) * 2

    def caches(self):
        return self.ak, self.bk, self.av, self.bv

    def run(self, **kw):
        return dec.decode_attention(self.q, *self.caches(), self.tables, self.seq_lens, self.qsl,
                                    self.L, **kw)


def factor_bytes(B, L, s):
    return B * L * (s["rk"] + s["rv"]) * (s["h"] + s["d"]) * 2


def check():
    """bf16 at real sizes vs the fp32 reference (mixed lengths, both shapes, split on/off)."""
    lens = [1, 15, 17, 4096, 32768, 1000]
    rows = []
    for name, s in SHAPES.items():
        for splits in (None, 1):
            torch.manual_seed(1)
            B = len(lens)
            nblk = [-(-L // BS) for L in lens]
            nb = sum(nblk) + 4
            mk = lambda *sh: torch.randn(*sh, device="cuda", dtype=torch.bfloat16)
            ak, bk = mk(nb, BS, s["h"], s["rk"]), mk(nb, BS, s["rk"], s["d"])
            av, bv = mk(nb, BS, s["h"], s["rv"]), mk(nb, BS, s["rv"], s["d"])
            perm = torch.randperm(nb, device="cuda").to(torch.int32)
            tables = torch.zeros(B, max(nblk), dtype=torch.int32, device="cuda")
            at = 0
            for i, k in enumerate(nblk):
                tables[i, :k] = perm[at:at + k]
                at += k
            q = mk(B, s["h"], s["d"])
            sl = torch.tensor(lens, dtype=torch.int32, device="cuda")
            qsl = torch.arange(B + 1, dtype=torch.int32, device="cuda")
            out = torch.full_like(q, float("nan"))
            out = dec.decode_attention(q, ak, bk, av, bv, tables, sl, qsl, max(lens),
                                       num_splits=splits, out=out)
            want = paged_attention_ref(*[t.cpu() for t in (q, ak, bk, av, bv, tables, sl, qsl)])
            err = ((out.cpu().double() - want.double()).norm() / want.double().norm()).item()
            ok = not torch.isnan(out).any().item() and err < 1e-2
            rows.append((name, splits, err, ok))
            log(f"check {name:10s} splits={str(splits):4s} rel_err={err:.2e} "
                f"{'ok' if ok else 'FAIL'}")
    return all(r[3] for r in rows)


def sweep():
    """Config sweep at the points the targets name; prints the best few per point. (The
    experiment sweeps of v4-v6 (1-2 warps, targeted tiles, batch-1 latency grid, block-table
    prefetch variants, the ncu target) left this script once their results were recorded in
    docs/kernel_notes.md; git history has them.)"""
    points = [("t6-medium", 64, 32768), ("paper", 64, 32768)]
    cfgs = []
    for hb, bns in ((16, (32, 64, 128)), (32, (32, 64, 128)), (64, (32, 64))):
        for bn in bns:
            for st in ((2, 3) if hb == 64 else (2, 3, 4)):
                cfgs.append(dec.DecodeConfig(hb, bn, 4, st))
    for hb, bn in ((16, 128), (32, 64), (32, 128), (64, 64), (64, 128)):
        for st in (2, 3):
            cfgs.append(dec.DecodeConfig(hb, bn, 8, st))
    return _sweep_points(points, cfgs)


def _compiled():
    """id -> compiled decode kernel, whatever this Triton version calls its cache."""
    found = {}
    def walk(x, depth=0):
        if depth > 3:
            return
        if hasattr(x, "n_regs") and hasattr(x, "metadata"):
            found[id(x)] = x
        elif isinstance(x, dict):
            for v in x.values():
                walk(v, depth + 1)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v, depth + 1)
    walk(getattr(dec._decode_kernel, "device_caches", {}))
    walk(getattr(dec._decode_kernel, "cache", {}))
    return found


def _regs_of(before):
    new = [k for i, k in _compiled().items() if i not in before]
    return ",".join(f"{k.n_regs}r/{k.n_spills}s" for k in new) or "?"


def _sweep_points(points, cfgs, bs=BS, keep_all=False):
    best = {}
    for name, B, L in points:
        s = SHAPES[name]
        p = Paged(B, L, s["h"], s["d"], s["rk"], s["rv"], bs=bs)
        res = []
        for c in cfgs:
            if c.head_block > 32 and s["h"] <= 32:
                continue
            try:
                splits = dec.num_splits_for(B, s["h"], L, c, torch.device("cuda"))
                before = _compiled()
                p.run(config=c, num_splits=splits)
                regs = _regs_of(before)
                t = do_bench(lambda: p.run(config=c, num_splits=splits), return_mode="median")
            except Exception as e:   # a config that does not compile or fit is skipped
                log(f"  {c}: {type(e).__name__}: {str(e)[:120]}")
                continue
            res.append((t, c, splits, regs))
        res.sort(key=lambda r: r[0])
        log(f"sweep {name} B={B} L={L} block_size={bs}: {len(res)} configs")
        for t, c, sp, regs in res:
            log(f"  {t * 1e3:8.1f} us  {p.bytes / t / 1e6:7.0f} GB/s  hb={c.head_block} "
                f"bn={c.block_n} w={c.num_warps} st={c.num_stages} mr={c.maxnreg} "
                f"splits={sp} regs={regs}")
        best[(name, B, L)] = res[0][1] if res else None
        del p
        torch.cuda.empty_cache()
        if keep_all:
            return [(t, c) for t, c, _, _ in res]
    return best


def split_sweep(configs):
    pts = [("t6-medium", 1, 4096), ("t6-medium", 1, 32768), ("t6-medium", 16, 32768),
           ("t6-medium", 64, 32768), ("t6-medium", 64, 131072), ("t6-medium", 256, 4096),
           ("paper", 1, 32768), ("paper", 16, 32768), ("paper", 64, 4096)]
    out = []
    for name, B, L in pts:
        s = SHAPES[name]
        c, bs = configs.get(name) or (
            dec.decode_config(s["h"], s["d"], s["rk"], s["rv"], BS, B), BS)
        p = Paged(B, L, s["h"], s["d"], s["rk"], s["rv"], bs=bs)
        times = {}
        for S in (1, 2, 4, 8, 16, 32, 64):
            if S > 1 and L // S < 128:
                continue
            times[S] = do_bench(lambda: p.run(config=c, num_splits=S), return_mode="median")
        h = dec.num_splits_for(B, s["h"], L, c, torch.device("cuda"))
        best = min(times, key=times.get)
        log(f"splits {name:9s} B={B:3d} L={L:6d}: " + " ".join(
            f"{S}:{t * 1e3:.0f}" for S, t in times.items()) + f"  us; best {best}, heuristic {h}")
        out.append(dict(shape=name, B=B, L=L, times_us={S: t * 1e3 for S, t in times.items()},
                        best=best, heuristic=h))
        del p
        torch.cuda.empty_cache()
    return out


def sdpa_point(B, L, kv_heads, heads=16, d=64):
    q = torch.randn(B, heads, 1, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, kv_heads, L, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    gqa = kv_heads != heads
    t = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
                 return_mode="median")
    return t, 2 * B * L * kv_heads * d * 2


def launch_cost(configs):
    """Batch 1 x 4K: device time, host-clock per call (back to back), CUDA-graph replay."""
    s = SHAPES["t6-medium"]
    c, bs = configs.get("t6-medium") or (None, BS)
    p = Paged(1, 4096, s["h"], s["d"], s["rk"], s["rv"], bs=bs)
    ws = dec.make_workspace(1, s["h"], s["d"])
    if c is None:
        fn = lambda: paged_attention(p.q, *p.caches(), p.tables, p.seq_lens, p.qsl, 1, p.L,
                                     workspace=ws)
    else:
        fn = lambda: p.run(config=c, workspace=ws)
    dev_t = do_bench(fn, return_mode="median") * 1e3
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n * 1e6
    graph_t = float("nan")
    try:
        st = torch.cuda.Stream()
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            fn()
        torch.cuda.current_stream().wait_stream(st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            g.replay()
        torch.cuda.synchronize()
        graph_t = (time.perf_counter() - t0) / n * 1e6
    except Exception as e:
        log(f"graph capture failed: {type(e).__name__}: {e}")
    log(f"batch 1 x 4K t6-medium: device {dev_t:.1f} us, host-clock per call {wall:.1f} us, "
        f"graph replay {graph_t:.1f} us")
    return dict(device_us=dev_t, wall_us=wall, graph_us=graph_t)


def _graph_us(fn, calls: int, n: int = 300) -> float:
    """Device-side us per call: `calls` back-to-back calls captured in one CUDA graph (as the
    engine's decode step holds 24 layers), replayed n times, timed with CUDA events. With
    calls = 1 this is the `--launch` graph-replay number (launch gaps included)."""
    st = torch.cuda.Stream()
    st.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(st):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(st)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    for _ in range(10):
        g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / n / calls


def midbatch_sweep(copy_gbs):
    """Batch 16 / 64 at the contexts a serving sweep sees (512-1K): tiles x splits x
    min_split inside CUDA graphs (20 calls a graph, us per call), for decode_config and
    num_splits_for. Prints the best few per point."""
    s = SHAPES["t6-medium"]
    C = dec.DecodeConfig
    cfgs = {"16,16,1w,5st": C(16, 16, 1, 5), "16,16,2w,3st": C(16, 16, 2, 3),
            "16,32,2w,3st": C(16, 32, 2, 3), "16,16,2w,3st bt16 sb8": C(16, 16, 2, 3, bt_prefetch=16,
                                                                         merge_sb=8)}
    rows = []
    for B in (16, 64):
        for L in (512, 1024):
            p = Paged(B, L, s["h"], s["d"], s["rk"], s["rv"])
            ws = dec.make_workspace(B, s["h"], s["d"])
            pts = []
            for name, cfg in cfgs.items():
                for S in (1, 2, 4, 8, 16):
                    for ms in (32, 64, 128):
                        c = C(**{**cfg.__dict__, "min_split": ms})
                        try:
                            us = _graph_us(lambda: p.run(config=c, num_splits=S, workspace=ws),
                                           20, n=50)
                        except Exception as e:
                            log(f"  {name} S{S} ms{ms}: {type(e).__name__}")
                            continue
                        pts.append((us, name, S, ms))
            pts.sort()
            now = dec.decode_config(s["h"], s["d"], s["rk"], s["rv"], BS, B)
            S_now = dec.num_splits_for(B, s["h"], 33024, now, torch.device("cuda"))
            cur = _graph_us(lambda: p.run(num_splits=S_now, workspace=ws), 20, n=50)
            gbs = p.bytes / cur / 1e3
            log(f"{B:3d} x {L:5d}: shipped (S {S_now}) {cur:6.1f} us ({gbs / copy_gbs:.0%} copy); best "
                + "; ".join(f"{n} S{S} ms{ms} {us:.1f}" for us, n, S, ms in pts[:4]))
            rows.append(dict(B=B, L=L, shipped_us=cur, shipped_splits=S_now,
                             best=[dict(us=u, config=n, splits=S, min_split=m) for u, n, S, m in pts[:8]]))
            del p
            torch.cuda.empty_cache()
    return rows


def table(copy_gbs, configs, quick: bool):
    batches = [16, 64] if quick else BATCHES
    contexts = [32768, 131072] if quick else CONTEXTS
    rows = []
    for B in batches:
        for L in contexts:
            for name, s in SHAPES.items():
                nbytes = factor_bytes(B, L, s)
                if nbytes > MEM_LIMIT:
                    continue
                c, bs = configs.get(name) or (None, BS)
                p = Paged(B, L, s["h"], s["d"], s["rk"], s["rv"], bs=bs)
                t = do_bench(lambda: p.run(config=c), return_mode="median")
                splits = dec.num_splits_for(B, s["h"], L, c or dec.decode_config(
                    s["h"], s["d"], s["rk"], s["rv"], bs, B), torch.device("cuda"))
                rows.append(dict(kernel=f"tpa-{name}", B=B, L=L, ms=t, bytes=nbytes, block_size=bs,
                                 gbs=nbytes / t / 1e6, pct=nbytes / t / 1e6 / copy_gbs * 100,
                                 splits=splits))
                del p
                torch.cuda.empty_cache()
            for kvh, nm in ((16, "sdpa-mha16"), (2, "sdpa-gqa2")):
                if 2 * B * L * kvh * 64 * 2 > MEM_LIMIT:
                    continue
                t, nbytes = sdpa_point(B, L, kvh)
                rows.append(dict(kernel=nm, B=B, L=L, ms=t, bytes=nbytes, gbs=nbytes / t / 1e6,
                                 pct=nbytes / t / 1e6 / copy_gbs * 100, splits=None))
                torch.cuda.empty_cache()
            log(" | ".join(f"{r['kernel']} {r['ms'] * 1e3:.0f}us {r['pct']:.0f}%"
                           for r in rows if r["B"] == B and r["L"] == L) + f"   [B={B} L={L}]")
    return rows


def print_table(rows, copy_gbs):
    log(f"\ncopy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    log(f"{'kernel':16s} {'B':>4s} {'ctx':>7s} {'time us':>9s} {'MB read':>9s} {'GB/s':>7s} "
        f"{'% copy':>6s} {'splits':>6s}")
    for r in rows:
        log(f"{r['kernel']:16s} {r['B']:4d} {r['L']:7d} {r['ms'] * 1e3:9.1f} "
            f"{r['bytes'] / 1e6:9.1f} {r['gbs']:7.0f} {r['pct']:6.1f} {str(r['splits']):>6s}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(4 * len(BATCHES), 3.5), sharey=True)
    for ax, B in zip(axes, BATCHES):
        for k in sorted({r["kernel"] for r in rows}):
            pts = [(r["L"], r["pct"]) for r in rows if r["kernel"] == k and r["B"] == B]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=k)
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {B}")
        ax.set_xlabel("context")
        ax.axhline(80, color="grey", lw=0.5, ls="--")
    axes[0].set_ylabel("% of copy bandwidth")
    ax_leg = max(axes, key=lambda ax: len(ax.get_lines()))
    ax_leg.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--splits", action="store_true")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--launch", action="store_true", help="batch 1 x 4K launch cost only")
    ap.add_argument("--midbatch-sweep", action="store_true",
                    help="batch 16/64 x 512/1K: tiles x splits x min_split in graphs")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, command=" ".join(sys.argv))
    copy_gbs = copy_bandwidth()
    result["copy_gbs"] = copy_gbs
    log(f"copy bandwidth {copy_gbs:.0f} GB/s")
    if a.check and not check():
        log("CHECK FAILED")
        sys.exit(1)
    configs = {}
    if a.sweep:
        best = sweep()
        for (name, B, L), c in best.items():
            if c is not None and name not in configs:
                configs[name] = c if isinstance(c, tuple) else (c, BS)
        result["sweep_best"] = {n: dict(vars(c), block_size=bs) for n, (c, bs) in configs.items()}
        log(f"configs used below: {configs}")
    if a.midbatch_sweep:
        result["midbatch_sweep"] = midbatch_sweep(copy_gbs)
    if a.splits:
        result["splits"] = split_sweep(configs)
    if a.launch and not a.table:
        result["launch"] = launch_cost(configs)
    if a.table:
        result["launch"] = launch_cost(configs)
        rows = table(copy_gbs, configs, a.quick)
        result["rows"] = rows
        print_table(rows, copy_gbs)
        plot(rows, os.path.join(a.out, "kernels.png"))
    with open(os.path.join(a.out, "kernels.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    main()
