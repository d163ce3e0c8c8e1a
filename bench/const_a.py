"""MHA / GQA / MQA decode from the constant-A factor cache (kernels/decode.py, CONST_A)
against the plain GQA baselines, on the GPU (PYTHONPATH=. python3 bench/const_a.py [--quick]
[--out const_a.json]): the data for docs/kernel_notes.md's "which path" question.

Per shape (bf16, d_h 64, cache blocks of 16) and batch x context, do_bench medians of:
  const_a   paged_attention over the constant-A cache (one decode launch, split-K)
  sdpa      F.scaled_dot_product_attention(enable_gqa) over a contiguous (B, n_kv, L, d) K/V:
            no paging at all, the bar a plain GQA kernel would have to beat
  sdpa_paged  the same after gathering each sequence's blocks (what a torch "plain paged
            GQA path" costs: gather + SDPA; left out above 8 GB of K/V)
  variants  the same decode under other DecodeConfigs (VARIANTS: the kv-head grid, T6's
            small-program tiles), checked against const_a's output, for picking the default
"% copy" = bytes the call must read (2 B n_kv L d_h * 2) / time / device copy bandwidth.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from tests.kernels.paged_case import make_case, rel_err
from tpaserve.kernels.decode import DecodeConfig, decode_attention, make_workspace
from tpaserve.kernels.ops import paged_attention

SHAPES = {"mha16x64": (16, 16), "gqa4 (32/8)": (32, 8), "gqa15 (30/2)": (30, 2),
          "mqa (31/1)": (31, 1)}
D, BS = 64, 16
# name -> DecodeConfig: candidates for decode_config's constant-A choice (kv_grid: one
# program per kv head and 16-head part of its group; "1w5st": T6-medium's batch >= 16 tiles)
VARIANTS = {
    "kvgrid 4w2st": DecodeConfig(16, 16, 4, 2, kv_grid=True),
    "kvgrid 1w5st": DecodeConfig(16, 16, 1, 5, kv_grid=True),
    "kvgrid 2w3st": DecodeConfig(16, 16, 2, 3, kv_grid=True),
    "blocks 1w5st": DecodeConfig(16, 16, 1, 5),
}


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / (t * 1e-3) / 1e9


def gpu_case(h: int, n_kv: int, batch: int, ctx: int):
    """make_case's layout (shuffled block tables, constant A), drawn on the GPU."""
    if batch * ctx <= 16 * 4096:                          # small: make_case itself
        return make_case([ctx] * batch, [1] * batch, h, D, n_kv, n_kv, BS, torch.bfloat16,
                         "cuda", seed=batch, spare_blocks=0, const_a=True)
    nblk = ctx // BS
    nb = batch * nblk
    c = make_case([BS], [1], h, D, n_kv, n_kv, BS, torch.bfloat16, "cuda", const_a=True)
    c.q = torch.randn(batch, h, D, device="cuda", dtype=torch.bfloat16)
    c.bk = torch.randn(nb, BS, n_kv, D, device="cuda", dtype=torch.bfloat16)
    c.bv = torch.randn_like(c.bk)
    c.block_tables = torch.randperm(nb, device="cuda").view(batch, nblk).to(torch.int32)
    c.seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    c.query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    c.max_seq_len = ctx
    return c


def sdpa_ms(q4: torch.Tensor, n_kv: int, ctx: int, gqa: bool) -> float:
    k = torch.randn(q4.shape[0], n_kv, ctx, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    return do_bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=gqa),
                    return_mode="median")


def point(h: int, n_kv: int, batch: int, ctx: int, copy_gbs: float) -> dict:
    c = gpu_case(h, n_kv, batch, ctx)
    ws = make_workspace(batch, h, D, device="cuda")
    run = lambda: paged_attention(c.q, *c.caches(), *c.metadata(), 1, ctx,  # noqa: E731
                                  workspace=ws)
    if batch * ctx <= 16 * 4096:
        err = rel_err(run(), c.reference())
        assert err < 1e-2, f"{h}/{n_kv} {batch}x{ctx}: relative error {err:.2e}"
    nbytes = 2 * batch * n_kv * ctx * D * 2
    out = {"h": h, "n_kv": n_kv, "batch": batch, "ctx": ctx, "bytes": nbytes}
    out["const_a_ms"] = do_bench(run, return_mode="median")
    base = run()
    out["variants"] = {}
    for name, cfg in VARIANTS.items():
        fn = lambda: decode_attention(c.q, *c.caches(), *c.metadata(), ctx,  # noqa: E731
                                      workspace=ws, config=cfg)
        err = rel_err(fn(), base)
        assert err < 1e-2, f"{name} {h}/{n_kv} {batch}x{ctx}: relative error {err:.2e} vs const_a"
        ms = do_bench(fn, return_mode="median")
        out["variants"][name] = {"ms": ms, "copy_pct": 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs}
    q4 = c.q.view(batch, h, 1, D)
    gqa = n_kv != h
    out["sdpa_ms"] = sdpa_ms(q4, n_kv, ctx, gqa)
    nblk = ctx // BS
    tables = c.block_tables[:, :nblk].long()

    if nbytes > 8e9:
        out["sdpa_paged_ms"] = float("nan")
        return _pcts(out, nbytes, copy_gbs)

    def gathered():
        kk = c.bk[tables].view(batch, ctx, n_kv, D).transpose(1, 2)
        vv = c.bv[tables].view(batch, ctx, n_kv, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q4, kk, vv, enable_gqa=gqa)
    out["sdpa_paged_ms"] = do_bench(gathered, return_mode="median")
    return _pcts(out, nbytes, copy_gbs)


def _pcts(out: dict, nbytes: int, copy_gbs: float) -> dict:
    for k_ in ("const_a", "sdpa", "sdpa_paged"):
        out[k_ + "_copy_pct"] = 100 * nbytes / (out[k_ + "_ms"] * 1e-3) / 1e9 / copy_gbs
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="const_a.json")
    a = ap.parse_args()
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    grid = [(1, 4096), (16, 4096), (64, 4096), (16, 32768), (64, 32768)]
    if a.quick:
        grid = [(1, 4096), (64, 32768), (64, 131072)]
    rows = []
    print(f"{'shape':>14} {'batch x ctx':>12} | {'const_a':>16} | {'sdpa':>16} | "
          f"{'sdpa_paged':>16}   (ms, % copy)")
    for name, (h, n_kv) in SHAPES.items():
        for batch, ctx in grid:
            r = point(h, n_kv, batch, ctx, copy_gbs) | {"shape": name}
            rows.append(r)
            cells = " | ".join(f"{r[k + '_ms']:7.3f} {r[k + '_copy_pct']:5.1f}%"
                               for k in ("const_a", "sdpa", "sdpa_paged"))
            best = min(r["variants"].items(), key=lambda kv: kv[1]["ms"])
            print(f"{name:>14} {batch:>5} x {ctx:<6} | {cells} | best variant {best[0]} "
                  f"{best[1]['ms']:.3f} ({best[1]['copy_pct']:.0f}%)", flush=True)
    with open(a.out, "w") as f:
        json.dump({"copy_gbs": copy_gbs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
