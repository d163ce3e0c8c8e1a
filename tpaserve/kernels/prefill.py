"""Paged FlashTPA extend/prefill: each sequence's chunk of n query rows, at positions
L-n .. L-1, against its cached prefix plus causally within the chunk. Everything is read
from the factor cache after the step's store, so K/V are never rebuilt for the context.

For one head h, a tile of BLOCK_M queries and BLOCK_N cache positions: the tile's keys and
values of head h are formed in registers from the factors (R FMAs per element, CUDA cores),
then one tensor-core product each, as in FlashAttention:
    K_h (N, d) = sum_s A_K[:, h, s][:, None] * B_K[:, s]      V_h likewise from A_V, B_V
    logit (M, N) = scale / R_K * q_h (M, d) @ K_h^T           acc (M, d) += p (M, N) @ V_h
then out = acc / l / R_V. (The decode kernel instead multiplies per rank, because its M is
the heads; here M is the queries of one head, and forming K_h halves the tensor-core work:
2048 queries x 32K context, one layer: 12.8 -> 5.9 ms at the same tiles, 4.4 with the
tuned ones; docs/kernel_notes.md "Prefill".)
K_h and V_h are rounded to the cache dtype for the products, as a materialised cache would
be. Constant A (MHA / GQA / MQA, CONST_A): K_h, V_h are B_K[:, h // GROUP], B_V[:, h //
GROUP] as cached, no A and no 1/R. Grid (query block, head, sequence); programs past a
sequence's chunk exit at once.
Position tiles past the block's last query are never visited.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v
from tpaserve.kernels.decode import LOG2E


# stride_bt (the block-table width) changes from step to step: not specialised on, so a new
# width never costs a compile (~1 s under Triton 3.6) in the middle of serving
@triton.jit(do_not_specialize=["stride_bt"])
def _prefill_kernel(
    q_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, work_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    qk_scale, out_scale,
    H: tl.constexpr, D: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
    BS: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SKIP_SINGLE: tl.constexpr,    # sequences with one query row are left to the decode kernel
    WORK_LIST: tl.constexpr,      # grid (work items, heads): item g = (sequence, query block)
    CONST_A: tl.constexpr,        # MHA / GQA / MQA: head h reads kv head h // GROUP of B_K,
    GROUP: tl.constexpr,          # B_V as its K_h, V_h (no A caches: ak/av pointers unused)
):
    h = tl.program_id(1)
    if WORK_LIST:
        b = tl.load(work_ptr + 2 * tl.program_id(0))
        if b < 0:                                    # padding item
            return
        mb = tl.load(work_ptr + 2 * tl.program_id(0) + 1)
    else:
        mb = tl.program_id(0)
        b = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    n = tl.load(qsl_ptr + b + 1) - q_start
    if mb * BLOCK_M >= n:
        return
    if SKIP_SINGLE and n == 1:
        return
    L = tl.load(seq_lens_ptr + b)
    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)      # (M,) row within the chunk
    row_ok = rows < n
    qpos = L - n + rows                              # (M,) position of each query
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)             # (M, D_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    hi = tl.minimum(L, L - n + (mb + 1) * BLOCK_M)   # one past the block's last query
    bt_row = bt_ptr + b * stride_bt
    b_mask_d = d_ok[None, :]
    for start in range(0, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        tok_ok = pos < hi
        blk = tl.load(bt_row + pos // BS, mask=tok_ok, other=0)
        slot = blk.to(tl.int64) * BS + pos % BS
        b_mask = tok_ok[:, None] & b_mask_d
        if CONST_A:
            k = tl.load(bk_ptr + slot[:, None] * (R_K * D) + (h // GROUP) * D
                        + offs_d[None, :], mask=b_mask, other=0.0)     # (N, D_PAD)
        else:
            k = tl.zeros([BLOCK_N, D_PAD], tl.float32)
            for s in tl.static_range(R_K):
                bk = tl.load(bk_ptr + slot[:, None] * (R_K * D) + s * D + offs_d[None, :],
                             mask=b_mask, other=0.0)                    # (N, D_PAD)
                ak_s = tl.load(ak_ptr + slot * (H * R_K) + h * R_K + s, mask=tok_ok,
                               other=0.0).to(tl.float32)                # (N,)
                k += bk.to(tl.float32) * ak_s[:, None]
        s_mn = tl.dot(q, tl.trans(k.to(q.dtype)))                       # (M, N)
        causal = (pos[None, :] <= qpos[:, None]) & tok_ok[None, :]
        logits = tl.where(causal, s_mn * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        # rows whose first tiles are all masked keep m = -inf: avoid (-inf) - (-inf)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(logits - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        m_i = m_new
        if CONST_A:
            vt = tl.load(bv_ptr + slot[:, None] * (R_V * D) + (h // GROUP) * D
                         + offs_d[None, :], mask=b_mask, other=0.0)    # (N, D_PAD)
        else:
            vt = tl.zeros([BLOCK_N, D_PAD], tl.float32)
            for u in tl.static_range(R_V):
                bv = tl.load(bv_ptr + slot[:, None] * (R_V * D) + u * D + offs_d[None, :],
                             mask=b_mask, other=0.0)                    # (N, D_PAD)
                av_u = tl.load(av_ptr + slot * (H * R_V) + h * R_V + u, mask=tok_ok,
                               other=0.0).to(tl.float32)                # (N,)
                vt += bv.to(tl.float32) * av_u[:, None]
        acc = tl.dot(p.to(q.dtype), vt.to(q.dtype), acc)                # (M, D_PAD)
    inv_l = out_scale / tl.where(l_i > 0, l_i, 1.0)    # l = 0: no context, acc = 0
    o = acc * inv_l[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=q_mask)


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


_INTERPRET_CONFIG = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


def prefill_config(max_query_len: int) -> PrefillConfig:
    """Measured on the H200 (T6-medium, bf16, bench/prefill.py; ms per layer call):
        2048 x 32K: (128, 64, 8 warps, 3 st) 4.36; (128, 64, 4, 3) 5.09; (64, 64, 4, 3) 5.93;
                    (128, 128, 8, 3) 6.10; (64, 32, 4, 3) 6.81
        512 x 4K:   (64, 64, 4, 3) 0.19; (128, 64, 8, 3) 0.20; (64, 32, 4, 3) 0.29
    Short chunks keep 64-row blocks (a 128-row block of 20 queries is mostly padding)."""
    if v.INTERPRET:
        return _INTERPRET_CONFIG
    if max_query_len > 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    return PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)


def work_list(query_lens: list[int], block_m: int, size: int | None = None,
              skip_single_rows: bool = True) -> list[int]:
    """The (sequence, query block) items of a step, flattened [b0, mb0, b1, mb1, ...], padded
    with (-1, -1) to `size` items: the grid of a launch whose shape must not depend on the
    step (a CUDA graph). block_m must be the launch's config.block_m."""
    items = [x for b, n in enumerate(query_lens) if n > (1 if skip_single_rows else 0)
             for mb in range(-(-n // block_m)) for x in (b, mb)]
    if size is not None:
        if len(items) > 2 * size:
            raise v.KernelInputError(f"{len(items) // 2} prefill work items exceed the {size} "
                                     f"the launch was sized for")
        items += [-1, -1] * (size - len(items) // 2)
    return items


def work_list_size(max_tokens: int, max_seqs: int, block_m: int) -> int:
    """Items a work list can need: each sequence's chunk adds at most one partial block."""
    return -(-max_tokens // block_m) + max_seqs


def prefill_attention(q: torch.Tensor, ak_cache: torch.Tensor, bk_cache: torch.Tensor,
                      av_cache: torch.Tensor, bv_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor,
                      query_start_loc: torch.Tensor, max_query_len: int,
                      scale: float | None = None, out: torch.Tensor | None = None,
                      config: PrefillConfig | None = None,
                      skip_single_rows: bool = False,
                      work: torch.Tensor | None = None) -> torch.Tensor:
    """Causal paged attention for chunks of queries (any n per sequence, decode rows too).

    q (T, h, d_h); sequence i owns rows query_start_loc[i]:query_start_loc[i+1], at
    positions seq_lens[i]-n_i .. seq_lens[i]-1. max_query_len: host bound on every n_i
    (rows past it are not computed). Returns (T, h, d_h) in q's dtype.
    skip_single_rows: leave the rows of one-query sequences in `out` as they are (a mixed
    step computes those with the decode kernel first, see ops.paged_attention).
    work: int32 (items * 2,) from `work_list` with this launch's block_m (config or
    prefill_config(max_query_len)): the grid is one program per item and head instead of
    (query blocks of max_query_len) x heads x sequences, so a launch sized for the largest
    step (a CUDA graph) does not pay for idle programs.
    """
    _, bs, h, d_h, r_k, r_v = v.caches(q, ak_cache, bk_cache, av_cache, bv_cache)
    const_a = ak_cache is None
    batch = v.step_metadata(q, block_tables, seq_lens, query_start_loc, h, d_h,
                            bk_cache.dtype, bk_cache.device)
    out = v.output(out, q)
    if batch == 0 or max_query_len <= 0:
        return out
    cfg = config or prefill_config(max_query_len)
    scale = 1.0 / math.sqrt(d_h) if scale is None else float(scale)
    if work is not None:
        if work.dtype != torch.int32 or work.dim() != 1 or work.numel() % 2 or \
                work.device != q.device or not work.is_contiguous():
            raise v.KernelInputError(f"work must be a contiguous int32 (items * 2,) tensor on "
                                     f"{q.device}, got {tuple(work.shape)} {work.dtype}")
        grid = (work.numel() // 2, h, 1)
    else:
        grid = (triton.cdiv(max_query_len, cfg.block_m), h, batch)
    if const_a:            # one-hot A of weight 1: no 1/R in the logits or the output
        ak_cache = av_cache = bk_cache                  # stand-ins, never read
        qk_scale, out_scale = scale * LOG2E, 1.0
    else:
        qk_scale, out_scale = scale / r_k * LOG2E, 1.0 / r_v
    _prefill_kernel[grid](
        q, ak_cache, bk_cache, av_cache, bv_cache, block_tables, seq_lens, query_start_loc, out,
        work if work is not None else seq_lens,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        qk_scale, out_scale,
        H=h, D=d_h, R_K=r_k, R_V=r_v, BS=bs, D_PAD=v.next_pow2(d_h, 16),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SKIP_SINGLE=skip_single_rows,
        WORK_LIST=work is not None, CONST_A=const_a, GROUP=h // r_k if const_a else 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
