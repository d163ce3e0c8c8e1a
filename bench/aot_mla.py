"""Compile the MLA kernels (kernels/mla_decode.py, kernels/mla_store.py) for sm_90 without a
GPU and print registers / shared memory / local (spill) bytes per shape and config: what the
interpreter cannot show (compiler-only errors, spills) before a GPU session.

    PYTHONPATH=. python3 bench/aot_mla.py
"""
from __future__ import annotations

from bench.aot_const_a import compile_for_sm90, usage
from tpaserve.kernels import mla_decode, mla_store
from tpaserve.kernels._validate import next_pow2
from tpaserve.kernels.decode import DecodeConfig

SHAPES = [(23, 256, 32), (16, 512, 64), (128, 512, 64)]   # (h, kv_lora, rope)


def main() -> None:
    types = dict(q_ptr="*bf16", cache_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32",
                 qsl_ptr="*i32", out_ptr="*bf16", ws_ptr="*fp32", stride_qt="i32",
                 stride_qh="i32", stride_ot="i32", stride_oh="i32", stride_bt="i32",
                 n_seqs="i32", min_split="i32", num_splits="i32", ml_offset="i32",
                 cnt_offset="i32", qk_scale="fp32")
    for h, c, r in SHAPES:
        shipped = mla_decode.mla_config(h, c, 64)
        alt = [DecodeConfig(shipped.head_block, 64, shipped.num_warps, 3),
               DecodeConfig(shipped.head_block, shipped.block_n, 8, 2),
               DecodeConfig(16, shipped.block_n, 4, 2)]
        for cfg in (shipped, *alt):
            for rows in (False, True):
                # the launcher's rule for the rows launch (mla_decode.mla_attention)
                qb = max(1, mla_decode._ROWS_M // cfg.head_block) if rows else 1
                c_pad = next_pow2(c, 16)
                warps = (8 if rows and qb * cfg.head_block * c_pad >= 64 * 256
                         else cfg.num_warps)
                consts = dict(H=h, C=c, P=r, BS=16, HB=cfg.head_block, C_PAD=c_pad,
                              P_PAD=next_pow2(r, 16), BLOCK_N=cfg.block_n, ROWS=rows, QB=qb,
                              SPLIT=not rows, MERGE_SB=1, UPCAST=False)
                try:
                    k = compile_for_sm90(mla_decode._mla_kernel, types, consts, warps,
                                         cfg.num_stages)
                    res = usage(k)
                except Exception as e:             # e.g. shared memory past the limit
                    res = f"failed: {str(e).splitlines()[0][:120]}"
                mode = "rows  " if rows else "decode"
                tag = "shipped" if cfg is shipped else "alt"
                print(f"{mode} h {h:3} kv_lora {c} rope {r} {tag} HB {cfg.head_block} "
                      f"rows {qb} N {cfg.block_n} w {warps} st {cfg.num_stages}: {res}",
                      flush=True)
    st = dict(c_ptr="*bf16", kpe_ptr="*bf16", slot_ptr="*i64", cache_ptr="*bf16",
              stride_c="i32", stride_k="i32")
    for _, c, r in SHAPES[:2]:
        k = compile_for_sm90(mla_store._store_latent_kernel, st,
                             dict(C=c, P=r, C_PAD=next_pow2(c), P_PAD=next_pow2(r)), 4, 1)
        print(f"store  kv_lora {c} rope {r}: {usage(k)}", flush=True)


if __name__ == "__main__":
    main()
