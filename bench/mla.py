"""MLA's absorbed kernel over the paged latent cache (kernels/mla_decode.py) on the GPU:
the data that docs/kernel_notes.md's "MLA" prediction is checked against.

    PYTHONPATH=. python3 bench/mla.py [--quick] [--sweep] [--out mla.json]

Per shape (bf16, cache blocks of 16) and batch x context, do_bench medians of:
  mla        mla_attention decode launch (split-K heuristic, a preallocated workspace)
  sdpa_twin  F.scaled_dot_product_attention over the same model's MHA twin, contiguous
             (B, h, L, nope + rope) keys and (B, h, L, v) values: what serving MLA as
             plain MHA would read (12.8x the latent's bytes at the medium sizes)
"% copy" = bytes the call must read / time / device copy bandwidth (latent: B L (kv_lora +
rope) 2; twin: B L h (nope + rope + v) 2). Then the rows launch (prefill) of one 2048-token
prompt, ms per layer. --sweep: instead, the decode launch at 64 x 32K per tile config
(head block, BLOCK_N, warps, stages) and per split count, against mla_config's choice.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from bench.const_a import copy_bandwidth
from tests.kernels.latent_case import make_latent_case, reference
from tests.kernels.paged_case import rel_err
from tpaserve.kernels.decode import DecodeConfig, make_workspace, num_splits_for
from tpaserve.kernels.mla_decode import mla_attention, mla_config

SHAPES = {  # name: (h, kv_lora, rope, nope, v)
    "mla-medium (23, 256+32)": (23, 256, 32, 64, 64),
    "deepseek-lite (16, 512+64)": (16, 512, 64, 128, 128),
}
BS = 16


def latent_case(h, kv_lora, rope, batch, ctx):
    """make_latent_case's layout, drawn on the GPU (shuffled blocks, one query a sequence)."""
    if batch * ctx <= 16 * 4096:
        return make_latent_case([ctx] * batch, [1] * batch, h, kv_lora, rope, BS,
                                torch.bfloat16, seed=batch, device="cuda")
    nb = batch * ctx // BS
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(q=torch.randn(batch, h, kv_lora + rope, **bf),
                cache=torch.randn(nb, BS, kv_lora + rope, **bf),
                block_tables=torch.randperm(nb, device="cuda").view(batch, -1).to(torch.int32),
                seq_lens=torch.full((batch,), ctx, dtype=torch.int32, device="cuda"),
                query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
                max_query_len=1, max_seq_len=ctx, kv_lora=kv_lora,
                scale=1 / math.sqrt(kv_lora / 2 + rope))


def call(c, ws=None, config=None, num_splits=None):
    return mla_attention(c["q"], c["cache"], c["block_tables"], c["seq_lens"],
                         c["query_start_loc"], c["max_query_len"], c["max_seq_len"],
                         c["kv_lora"], c["scale"], workspace=ws, config=config,
                         num_splits=num_splits)


# (head_block, block_n, warps, stages) per shape for --sweep: the shipped tiles and their
# nearest rivals. The wider first sweeps (64-row blocks, 8 warps, 16-position tiles: all
# slower) are recorded in docs/kernel_notes.md "MLA, measured".
SWEEP = {
    "mla-medium (23, 256+32)": [(32, 128, 4, 2), (32, 64, 4, 3), (32, 64, 4, 2)],
    "deepseek-lite (16, 512+64)": [(16, 32, 4, 2), (16, 32, 4, 3)],
}


def sweep(copy_gbs, batch=64, ctx=32768):
    """Decode launch per tile config (default splits) and per split count (default tiles)."""
    rows = []
    for name, shape in SHAPES.items():
        h, kv_lora, rope, _, _ = shape
        c = latent_case(h, kv_lora, rope, batch, ctx)
        ws = make_workspace(batch, h, kv_lora, device="cuda")
        nbytes = batch * ctx * (kv_lora + rope) * 2
        want = call(c, ws).float()
        trials = [(f"hb{t[0]} n{t[1]} {t[2]}w{t[3]}st", DecodeConfig(*t), None)
                  for t in SWEEP[name]]
        trials += [(f"default tiles, {s} splits", None, s) for s in (4, 8, 16, 33)]
        for label, cfg, splits in trials:
            try:
                got = call(c, ws, cfg, splits).float()
                err = ((got - want).norm() / want.norm()).item()
                ms = do_bench(lambda: call(c, ws, cfg, splits), return_mode="median")
            except Exception as e:  # noqa: BLE001 (a config the compiler refuses: say so)
                print(f"{name:>26} {label:<24} failed: {str(e)[:120]}", flush=True)
                continue
            used = splits or num_splits_for(batch, h, ctx, cfg or mla_config(h, kv_lora, batch),
                                            torch.device("cuda"))
            pct = 100 * nbytes / (ms * 1e-3) / 1e9 / copy_gbs
            rows.append({"shape": name, "variant": label, "ms": ms, "copy_pct": pct,
                         "splits": used, "rel_err_vs_default": err})
            print(f"{name:>26} {label:<24} {ms:7.3f} ms {pct:5.1f}%  splits {used:>2}  "
                  f"err {err:.1e}", flush=True)
    return rows


def point(shape, batch, ctx, copy_gbs):
    h, kv_lora, rope, nope, v = shape
    c = latent_case(h, kv_lora, rope, batch, ctx)
    ws = make_workspace(batch, h, kv_lora, device="cuda")
    if batch * ctx <= 16 * 4096:
        err = rel_err(call(c, ws), reference(c))
        assert err < 1e-2, f"{shape} {batch}x{ctx}: relative error {err:.2e}"
    out = {"h": h, "kv_lora": kv_lora, "rope": rope, "batch": batch, "ctx": ctx}
    out["mla_ms"] = do_bench(lambda: call(c, ws), return_mode="median")
    out["mla_bytes"] = batch * ctx * (kv_lora + rope) * 2
    bf = dict(device="cuda", dtype=torch.bfloat16)
    if batch * ctx * h * (nope + rope + v) * 2 < 40 * 2**30:
        q = torch.randn(batch, h, 1, nope + rope, **bf)
        k = torch.randn(batch, h, ctx, nope + rope, **bf)
        vv = torch.randn(batch, h, ctx, v, **bf)
        out["sdpa_twin_ms"] = do_bench(lambda: F.scaled_dot_product_attention(q, k, vv),
                                       return_mode="median")
        out["sdpa_twin_bytes"] = batch * ctx * h * (nope + rope + v) * 2
        del q, k, vv
    for k_ in ("mla", "sdpa_twin"):
        if k_ + "_ms" in out:
            out[k_ + "_copy_pct"] = (100 * out[k_ + "_bytes"] / (out[k_ + "_ms"] * 1e-3) / 1e9
                                     / copy_gbs)
    return out


def prefill_ms(shape, n=2048):
    h, kv_lora, rope, _, _ = shape
    c = make_latent_case([n], [n], h, kv_lora, rope, BS, torch.bfloat16, device="cuda")
    return do_bench(lambda: call(c), return_mode="median")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out", default="mla.json")
    a = ap.parse_args()
    copy_gbs = copy_bandwidth()
    print(f"copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    if a.sweep:
        with open(a.out, "w") as f:
            json.dump({"copy_gbs": copy_gbs, "sweep": sweep(copy_gbs)}, f, indent=1)
        return
    grid = [(1, 4096), (16, 4096), (64, 4096), (16, 32768), (64, 32768), (64, 131072)]
    if a.quick:
        grid = [(1, 4096), (64, 4096), (64, 32768)]
    rows = []
    for name, shape in SHAPES.items():
        for batch, ctx in grid:
            r = point(shape, batch, ctx, copy_gbs) | {"shape": name}
            rows.append(r)
            twin = (f"{r['sdpa_twin_ms']:8.3f} ms {r['sdpa_twin_copy_pct']:5.1f}%"
                    if "sdpa_twin_ms" in r else "skipped (memory)")
            print(f"{name:>26} {batch:>3} x {ctx:<6} | mla {r['mla_ms']:8.3f} ms "
                  f"{r['mla_copy_pct']:5.1f}% | sdpa twin {twin}", flush=True)
        p = prefill_ms(shape)
        rows.append({"shape": name, "prefill_2048_ms": p})
        print(f"{name:>26} prefill (rows launch) 2048 tokens: {p:.3f} ms a layer", flush=True)
    with open(a.out, "w") as f:
        json.dump({"copy_gbs": copy_gbs, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
