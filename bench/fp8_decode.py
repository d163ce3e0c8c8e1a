"""Decode with the fp8 factor cache against the bfloat16 one, T6-medium shape (GPU).

    PYTHONPATH=. python3 bench/fp8_decode.py --out $OUT [--quick]

Per (batch, context): the bf16 cache of bench/kernels.Paged (shuffled block tables), then
the same factors through reference.quantize_factors_fp8 (what the store writes); both
decoded with decode_attention's shipped configs (do_bench medians, L2 flushed). "GB/s" is
the cache bytes a call must read (888 B a position bf16, 444 B fp8) / time; "% copy" divides
by the device-to-device copy rate measured first. Then a tile sweep for fp8 at 64 x 128K
(fp8 reads half the bytes per tile, so its best tiles may differ), and the fp8 output's
error against the fp32 reference on one short batch.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from triton.testing import do_bench

from bench.kernels import Paged, copy_bandwidth
from tpaserve.kernels import reference as ref
from tpaserve.kernels.decode import DecodeConfig

H, D, R = 47, 64, 2
POINTS = [(64, 131072), (64, 32768), (16, 32768), (1, 4096)]
SWEEP = [DecodeConfig(16, 16, 1, 5), DecodeConfig(16, 16, 2, 3), DecodeConfig(16, 16, 2, 5),
         DecodeConfig(16, 32, 2, 3), DecodeConfig(16, 32, 4, 3), DecodeConfig(32, 16, 2, 4),
         DecodeConfig(32, 32, 4, 3), DecodeConfig(64, 16, 4, 2)]


def to_fp8(p: Paged, chunk: int = 4096) -> None:
    """Quantise p's caches in place of the bf16 tensors (block chunks: bounded scratch)."""
    for a_name, b_name in (("ak", "bk"), ("av", "bv")):
        a, b = getattr(p, a_name), getattr(p, b_name)
        a8 = torch.empty(a.shape, dtype=ref.FP8, device=a.device)
        b8 = torch.empty(b.shape, dtype=ref.FP8, device=b.device)
        for i in range(0, a.shape[0], chunk):
            qa, qb = ref.quantize_factors_fp8(a[i:i + chunk].flatten(0, 1),
                                              b[i:i + chunk].flatten(0, 1))
            a8[i:i + chunk] = qa.view(a8[i:i + chunk].shape)
            b8[i:i + chunk] = qb.view(b8[i:i + chunk].shape)
        setattr(p, a_name, a8)
        setattr(p, b_name, b8)
        del a, b
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="no tile sweep")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    a = ap.parse_args()
    copy = copy_bandwidth()
    print(f"copy {copy:.0f} GB/s")
    rows = []
    for B, L in POINTS:
        p = Paged(B, L, H, D, R, R)
        t16 = do_bench(lambda: p.run(), return_mode="median")
        to_fp8(p)
        t8 = do_bench(lambda: p.run(), return_mode="median")
        row = dict(batch=B, context=L, bf16_ms=t16, fp8_ms=t8,
                   bf16_gbs=p.bytes / t16 / 1e6, fp8_gbs=p.bytes / 2 / t8 / 1e6)
        if (B, L) == (64, 131072) and not a.quick:
            sweep = {}
            for c in SWEEP:
                try:
                    sweep[str(c)] = do_bench(lambda: p.run(config=c), return_mode="median")
                except Exception as exc:          # a config that does not compile: noted
                    sweep[str(c)] = repr(exc)[:120]
                print(f"  fp8 64 x 128K {c}: {sweep[str(c)]}")
            row["fp8_sweep_ms"] = sweep
        rows.append(row)
        print(f"{B:>3} x {L:<7} bf16 {t16 * 1e3:8.1f} us ({row['bf16_gbs'] / copy:5.1%} copy)  "
              f"fp8 {t8 * 1e3:8.1f} us ({row['fp8_gbs'] / copy:5.1%} copy)  "
              f"speed-up {t16 / t8:.2f}x", flush=True)
        del p
        torch.cuda.empty_cache()
    # the fp8 kernel against the fp32 reference on the same quantised caches
    p = Paged(4, 3000, H, D, R, R)
    to_fp8(p)
    out = p.run()
    want = ref.paged_attention_ref(*[t.cpu() for t in (p.q, *p.caches(), p.tables,
                                                         p.seq_lens, p.qsl)])
    err = ((out.cpu().double() - want.double()).norm() / want.double().norm()).item()
    print(f"fp8 decode vs reference (4 x 3000): relative error {err:.2e}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, "fp8_decode.json").write_text(json.dumps(dict(copy_gbs=copy, rows=rows,
                                                              rel_err=err), indent=1))


if __name__ == "__main__":
    main()
