"""Compile the CONST_A kernels for sm_90 without a GPU (ptxas ships with Triton) and print
registers / shared memory / local (spill) bytes per shape: catches what the interpreter
cannot (compiler-only errors, spills) before a GPU session.

    PYTHONPATH=. python3 bench/aot_const_a.py
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tpaserve.kernels import decode, prefill, store

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
P2 = triton.next_power_of_2


def compile_for_sm90(jit_fn, types: dict, consts: dict, num_warps: int, num_stages: int):
    names = list(inspect.signature(jit_fn.fn).parameters)
    sig = {n: "constexpr" if n in consts else types[n] for n in names}
    src = ASTSource(fn=jit_fn, signature=sig,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def usage(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out)
    return (f"regs {m.group(1)}, static smem {m.group(2)}, local {m.group(3)}, dynamic smem "
            f"{kernel.metadata.shared}")


def main() -> None:
    common = dict(q_ptr="*bf16", ak_ptr="*bf16", bk_ptr="*bf16", av_ptr="*bf16",
                  bv_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
                  out_ptr="*bf16", stride_qt="i32", stride_qh="i32", stride_ot="i32",
                  stride_oh="i32", stride_bt="i32", qk_scale="fp32", out_scale="fp32")
    dec = common | dict(ws_ptr="*fp32", min_split="i32", num_splits="i32", ml_offset="i32",
                        cnt_offset="i32")
    for h, n_kv in ((16, 16), (32, 8), (30, 2), (31, 1), (47, 47)):
        g = h // n_kv
        cfg = decode.decode_config(h, 64, n_kv, n_kv, 16, 64, const_a=True)
        consts = dict(H=h, D=64, R_K=n_kv, R_V=n_kv, BS=16, HB=cfg.head_block, D_PAD=64,
                      RK_PAD=P2(n_kv), RV_PAD=P2(n_kv), BLOCK_N=cfg.block_n, SPLIT=True,
                      MERGE_SB=4, BT_PF=cfg.bt_prefetch, CONST_A=True, GROUP=g,
                      KV_PB=decode.kv_heads_per_block(h, g, cfg.head_block))
        k = compile_for_sm90(decode._decode_kernel, dec, consts, cfg.num_warps, cfg.num_stages)
        print(f"decode  h {h:2} n_kv {n_kv:2} {cfg}: {usage(k)}", flush=True)
    pre = common | dict(work_ptr="*i32")
    for h, n_kv in ((16, 16), (30, 2), (31, 1)):
        for cfg in (prefill.PrefillConfig(64, 64, 4, 3), prefill.PrefillConfig(128, 64, 8, 3)):
            consts = dict(H=h, D=64, R_K=n_kv, R_V=n_kv, BS=16, D_PAD=64, BLOCK_M=cfg.block_m,
                          BLOCK_N=cfg.block_n, SKIP_SINGLE=True, WORK_LIST=True, CONST_A=True,
                          GROUP=h // n_kv)
            k = compile_for_sm90(prefill._prefill_kernel, pre, consts, cfg.num_warps,
                                 cfg.num_stages)
            print(f"prefill h {h:2} n_kv {n_kv:2} {cfg}: {usage(k)}", flush=True)
    st = dict(ak_ptr="*bf16", bk_ptr="*bf16", av_ptr="*bf16", bv_ptr="*bf16", cos_ptr="*fp32",
              sin_ptr="*fp32", slot_ptr="*i64", akc_ptr="*bf16", bkc_ptr="*bf16",
              avc_ptr="*bf16", bvc_ptr="*bf16", stride_ak="i32", stride_bk="i32",
              stride_av="i32", stride_bv="i32", stride_cos="i32", stride_sin="i32")
    for n_kv in (16, 2, 1):
        consts = dict(H=n_kv, D=64, R_K=n_kv, R_V=n_kv, AK_PAD=P2(n_kv * n_kv),
                      AV_PAD=P2(n_kv * n_kv), BV_PAD=P2(n_kv * 64), RK_PAD=P2(n_kv),
                      HALF_PAD=32, CONST_A=True)
        k = compile_for_sm90(store._store_kernel, st, consts, 4, 1)
        print(f"store   n_kv {n_kv:2}: {usage(k)}", flush=True)


if __name__ == "__main__":
    main()
