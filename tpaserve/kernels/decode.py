"""Paged FlashTPA decode: one query per sequence against its block-paged factor cache.

For query q[b] (h, d_h) and cached positions m of sequence b (reference.paged_attention_ref):
    logit[h, m] = scale / R_K * sum_s A_K[m, h, s] * (q[h] . B_K[m, s])
    out[h, :]   = 1 / R_V * sum_{m, u} softmax_m(logit)[h, m] * A_V[m, h, u] * B_V[m, u, :]
K and V are never formed (fp8 caches: the factors as stored, their scale folded in by
the store, see store.py; the products then run in fp16). Per tile of BLOCK_N tokens and block of HB heads, each rank is
one tensor-core product of FlashAttention's shapes:
    S_s (HB, N)  = q (HB, d) @ B_K[:, s]^T (d, N)        then  logit += A_K[:, :, s]^T * S_s
    acc (HB, d) += (p * A_V[:, :, u]^T) (HB, N) @ B_V[:, u] (N, d)
so the arithmetic is R_K + R_V small matmuls per tile, and ranks are never a dot dimension
(R = 1, 2, 6 all work; tl.dot wants every dim >= 16, which HB, BLOCK_N and d padded give).

Grid (head block, split, sequence): head blocks of one (sequence, split) are adjacent
program ids, so the B factors they share can hit L2 on the second and third read (they
drift apart over long splits: ncu saw 1.5x the counted DRAM bytes with 3 splits of 11K
positions). Each split covers split_len positions; with more than one split the programs
write unnormalised partials (acc, running max m, running sum l) to a workspace, and the
last program to finish for a (sequence, head block) merges them (`_merge_splits`): one
launch either way; the merging program resets its counter, so no memset runs before a
launch (`_Counters`). Split lengths are per sequence, read on the device: sequence b of
length L uses ceil(L / split_len) of the grid's splits, split_len = ceil(L / num_splits)
rounded up to BLOCK_N and to at least `min_split` tokens. So one CUDA graph, captured
with num_splits for max_model_len, gives a 512-token sequence a few short splits instead
of one 512-token split (that one ran its tiles one after another: 15-60 us a layer).

Constant A (MHA / GQA / MQA, ak_cache = av_cache = None; CONST_A): the ranks are the kv
heads and query head j reads kv head j // GROUP, so a head block does one product per kv
head it reads (KV_PB of them), each query row keeping its own kv head's logits:
    S (HB, N) = sum_g [kvh == g] q @ B_K[:, g]^T        acc += ([kvh == g] p) @ B_V[:, g]
with no A loads and no 1/R scaling (docs/kernel_notes.md, "The family in the factor cache").
With DecodeConfig.kv_grid the grid's first axis is (kv head, block of its group's query
heads) instead: a program's rows are query heads of one kv head (padded to HB, the padding
masked like heads past h), so KV_PB = 1 and there is no selection (FlashDecoding's GQA
packing; unmeasured until a device run, so not the default yet).

Launchers never read device values: sizes come from the caller as Python ints, and the
split-K scratch can be passed in preallocated, so a decode step can be captured in a
CUDA graph.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v

LOG2E = 1.4426950408889634


@triton.jit
def _load_a(a_ptr, slot, offs_h, tok_ok, h_ok, H: tl.constexpr, R: tl.constexpr,
            R_PAD: tl.constexpr, H_EVEN: tl.constexpr):
    """A factor of N positions and HB heads: (N, HB) when R == 1, else (N, HB, R_PAD) with
    the rank fastest. Each (position, head) holds R contiguous numbers, so the loads are
    vectors (>= 4 bytes for R >= 2, which cp.async needs to pipeline them) along heads.
    The head mask is left out when HB divides H: a mask that may vary along the vector
    makes the compiler split it into 2-byte loads it cannot pipeline."""
    if R == 1:
        mask = tok_ok[:, None]
        if not H_EVEN:
            mask = mask & h_ok[None, :]
        a = tl.load(a_ptr + slot[:, None] * H + offs_h[None, :], mask=mask, other=0.0)
    else:
        offs_r = tl.arange(0, R_PAD)
        mask = tok_ok[:, None, None]
        if not H_EVEN:
            mask = mask & h_ok[None, :, None]
        if R_PAD != R:
            mask = mask & (offs_r < R)[None, None, :]
        a = tl.load(a_ptr + slot[:, None, None] * (H * R) + offs_h[None, :, None] * R
                    + offs_r[None, None, :], mask=mask, other=0.0)
    return a


@triton.jit
def _rank(a, s: tl.constexpr, R: tl.constexpr, R_PAD: tl.constexpr):
    """Rank s of an A tile from _load_a, as (N, HB). The rank dim lives in one thread (it
    was loaded as a vector), so this is register selection, no data exchange."""
    if R == 1:
        out = a
    elif R == 2:
        a0, a1 = tl.split(a)                  # stays in the cache dtype: half the bytes of
        if s == 0:                            # fp32 if it is re-laid out for the dot
            out = a0
        else:
            out = a1
    else:
        offs_r = tl.arange(0, R_PAD)
        out = tl.sum(tl.where(offs_r[None, None, :] == s, a, 0.0), axis=2)
    return out


@triton.jit
def _tile(q, m_i, l_i, acc, start, hi, blk, ak_ptr, bk_ptr, av_ptr, bv_ptr, bt_row, offs_h,
          offs_d, qk_scale, kv0, H: tl.constexpr, D: tl.constexpr, R_K: tl.constexpr,
          R_V: tl.constexpr, BS: tl.constexpr, HB: tl.constexpr, D_PAD: tl.constexpr,
          RK_PAD: tl.constexpr, RV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
          H_EVEN: tl.constexpr, CONST_A: tl.constexpr, GROUP: tl.constexpr,
          KV_PB: tl.constexpr, FP8: tl.constexpr):
    """One tile of BLOCK_N positions from `start`: online-softmax update of (m, l, acc).
    blk: the tile's cache block when it lies inside one block (BS % BLOCK_N == 0).
    CONST_A: no A factors; query head j reads kv head j // GROUP, and the head block's
    query heads read the KV_PB kv heads kv0, kv0 + 1, ... (see _decode_kernel).
    FP8: e4m3 caches; B tiles are converted to q's dtype (fp16, exact) for the products,
    A tiles to fp32 (the rank selection and the mixing are fp32 anyway)."""
    pos = start + tl.arange(0, BLOCK_N)           # (N,) positions of this tile
    tok_ok = pos < hi
    h_ok = offs_h < H
    if BS % BLOCK_N == 0:
        # The tile lies inside one cache block (tiles start at multiples of BLOCK_N): one
        # block-table entry, consecutive slots, so the pointers are a scalar tile base plus
        # loop-invariant int32 offsets (fewer registers and integer ops).
        first = blk.to(tl.int64) * BS + start % BS
        slot = tl.arange(0, BLOCK_N)              # (N,) slot - first
        akp = ak_ptr + first * (H * R_K)
        bkp = bk_ptr + first * (R_K * D)
        avp = av_ptr + first * (H * R_V)
        bvp = bv_ptr + first * (R_V * D)
    else:
        blks = tl.load(bt_row + pos // BS, mask=tok_ok, other=0)
        slot = blks.to(tl.int64) * BS + pos % BS  # (N,) cache slot of each position
        akp = ak_ptr
        bkp = bk_ptr
        avp = av_ptr
        bvp = bv_ptr

    b_mask = tok_ok[:, None]
    if D_PAD != D:
        b_mask = b_mask & (offs_d < D)[None, :]
    s_hn = tl.zeros([HB, BLOCK_N], tl.float32)
    if CONST_A:
        # GQA over the ranks: one product per kv head the block reads, each row keeping
        # the logits of its own kv head (a block inside one group: no selection at all)
        # the load of a kv head past the last one (the last block) is clamped to it; the
        # selection compares with the unclamped index, so only padded head rows (never
        # written) can take it
        kvh = offs_h // GROUP                                         # (HB,)
        for i in tl.static_range(KV_PB):
            g = tl.minimum(kv0 + i, R_K - 1)
            bk = tl.load(bkp + slot[:, None] * (R_K * D) + g * D + offs_d[None, :],
                         mask=b_mask, other=0.0)                      # (N, D_PAD)
            qb = tl.dot(q, tl.trans(bk))                              # (HB, N)
            if KV_PB == 1:
                s_hn = qb
            else:
                s_hn += tl.where((kvh == kv0 + i)[:, None], qb, 0.0)
    else:
        ak = _load_a(akp, slot, offs_h, tok_ok, h_ok, H, R_K, RK_PAD, H_EVEN)  # (N, HB[, R])
        if FP8:
            ak = ak.to(tl.float32)
        for s in tl.static_range(R_K):
            bk = tl.load(bkp + slot[:, None] * (R_K * D) + s * D + offs_d[None, :],
                         mask=b_mask, other=0.0)                      # (N, D_PAD)
            if FP8:
                bk = bk.to(q.dtype)
            qb = tl.dot(q, tl.trans(bk))                              # (HB, N)
            ak_s = _rank(ak, s, R_K, RK_PAD)                          # (N, HB)
            s_hn += qb * tl.trans(ak_s).to(tl.float32)

    # online softmax in base 2 (qk_scale carries log2 e)
    logits = tl.where(tok_ok[None, :], s_hn * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])                              # (HB, N)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]

    if CONST_A:
        for i in tl.static_range(KV_PB):
            g = tl.minimum(kv0 + i, R_V - 1)
            bv = tl.load(bvp + slot[:, None] * (R_V * D) + g * D + offs_d[None, :],
                         mask=b_mask, other=0.0)                      # (N, D_PAD)
            if KV_PB == 1:
                w = p.to(bv.dtype)
            else:
                w = tl.where((kvh == kv0 + i)[:, None], p, 0.0).to(bv.dtype)  # (HB, N)
            acc = tl.dot(w, bv, acc)                                  # (HB, D_PAD)
    else:
        av = _load_a(avp, slot, offs_h, tok_ok, h_ok, H, R_V, RV_PAD, H_EVEN)  # (N, HB[, R])
        if FP8:
            av = av.to(tl.float32)
        for u in tl.static_range(R_V):
            bv = tl.load(bvp + slot[:, None] * (R_V * D) + u * D + offs_d[None, :],
                         mask=b_mask, other=0.0)                      # (N, D_PAD)
            if FP8:
                bv = bv.to(q.dtype)
            av_u = _rank(av, u, R_V, RV_PAD)                          # (N, HB)
            w = (p * tl.trans(av_u).to(tl.float32)).to(bv.dtype)      # (HB, N)
            acc = tl.dot(w, bv, acc)                                  # (HB, D_PAD)
    return m_new, l_i, acc


@triton.jit
def _write_out(out_ptr, row, stride_ot, stride_oh, offs_h, offs_d, h_ok, acc, l_i, out_scale,
               D: tl.constexpr):
    mask = h_ok[:, None] & (offs_d < D)[None, :]
    inv_l = out_scale / tl.where(l_i > 0, l_i, 1.0)        # l = 0: no context, acc = 0
    tl.store(out_ptr + row * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_kernel(
    q_ptr, ak_ptr, bk_ptr, av_ptr, bv_ptr,        # q (T, H, D); caches contiguous
    bt_ptr, seq_lens_ptr, qsl_ptr,                # block_tables (B, max_blocks); (B,); (B+1,)
    out_ptr, ws_ptr,                              # out (T, H, D); fp32 split-K workspace
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    min_split, num_splits, ml_offset, cnt_offset,  # where (m, l) and the counters start in ws
    qk_scale, out_scale,                          # scale / R_K * log2(e); 1 / R_V
    H: tl.constexpr, D: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
    BS: tl.constexpr, HB: tl.constexpr, D_PAD: tl.constexpr, RK_PAD: tl.constexpr,
    RV_PAD: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    MERGE_SB: tl.constexpr,       # splits merged per step (sized to ~32 fp32 values a thread)
    BT_PF: tl.constexpr,          # > 0: block-table entries of BT_PF tiles read as one vector
    CONST_A: tl.constexpr,        # MHA / GQA / MQA: no A caches (ak/av pointers unused)
    GROUP: tl.constexpr,          # CONST_A: query heads per kv head (R_K = R_V = kv heads)
    KV_PB: tl.constexpr,          # CONST_A: kv heads one head block reads at most
    KV_GRID: tl.constexpr,        # CONST_A: program = (kv head, block of its group's heads)
    FP8: tl.constexpr,            # e4m3 caches: products in fp16 (e4m3 -> fp16 is exact)
):
    hb = tl.program_id(0)
    sp = tl.program_id(1)
    b = tl.program_id(2)
    # the three metadata loads issue together (no branch between them)
    row = tl.load(qsl_ptr + b)
    row_end = tl.load(qsl_ptr + b + 1)
    L = tl.load(seq_lens_ptr + b)
    if row_end == row:                            # sequence has no query this step
        return
    lo, hi, n_used = _split_range(L, sp, num_splits, min_split, BLOCK_N)
    if (lo >= L) & (sp > 0):                      # empty split: the merge never reads it
        return

    H_EVEN: tl.constexpr = H % HB == 0
    if KV_GRID:
        # rows: query heads sub * HB ... of kv head kvh's group; past the group: masked
        SUB: tl.constexpr = (GROUP + HB - 1) // HB
        in_group = (hb % SUB) * HB + tl.arange(0, HB)                  # (HB,)
        offs_h = (hb // SUB) * GROUP + in_group
        h_ok = in_group < GROUP
        kv0 = hb // SUB
    else:
        offs_h = hb * HB + tl.arange(0, HB)       # (HB,)
        h_ok = offs_h < H
        kv0 = (hb * HB) // GROUP                  # CONST_A: the block's first kv head
    offs_d = tl.arange(0, D_PAD)                  # (D_PAD,)
    d_ok = offs_d < D
    q_mask = h_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + row * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)          # (HB, D_PAD)
    if FP8:
        # fp16, not bf16: sm_89+ converts e4m3 pairs to fp16 pairs in one instruction, and
        # a bf16 q is exact in fp16 within [6e-5, 65504] (clamped: no inf from outliers)
        q = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)

    m_i = tl.full([HB], float("-inf"), tl.float32)
    l_i = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, D_PAD], tl.float32)
    bt_row = bt_ptr + b * stride_bt
    if (BS % BLOCK_N == 0) and (BT_PF > 0):
        # Block ids of BT_PF tiles in one vector load, then picked per tile from registers:
        # the tile addresses no longer wait on a scalar block-table load every iteration.
        offs_t = tl.arange(0, BT_PF)
        for c0 in range(lo, hi, BT_PF * BLOCK_N):
            t_pos = c0 + offs_t * BLOCK_N
            ids = tl.load(bt_row + t_pos // BS, mask=t_pos < hi, other=0)      # (BT_PF,)
            for start in range(c0, tl.minimum(c0 + BT_PF * BLOCK_N, hi), BLOCK_N):
                blk = tl.sum(tl.where(offs_t == (start - c0) // BLOCK_N, ids, 0))
                m_i, l_i, acc = _tile(q, m_i, l_i, acc, start, hi, blk, ak_ptr, bk_ptr,
                                      av_ptr, bv_ptr, bt_row, offs_h, offs_d, qk_scale, kv0,
                                      H, D, R_K, R_V, BS, HB, D_PAD, RK_PAD, RV_PAD, BLOCK_N,
                                      H_EVEN, CONST_A, GROUP, KV_PB, FP8)
    else:
        for start in range(lo, hi, BLOCK_N):
            if BS % BLOCK_N == 0:
                blk = tl.load(bt_row + start // BS)
            else:
                blk = 0                               # per-position loads inside _tile
            m_i, l_i, acc = _tile(q, m_i, l_i, acc, start, hi, blk, ak_ptr, bk_ptr, av_ptr,
                                  bv_ptr, bt_row, offs_h, offs_d, qk_scale, kv0, H, D, R_K,
                                  R_V, BS, HB, D_PAD, RK_PAD, RV_PAD, BLOCK_N, H_EVEN,
                                  CONST_A, GROUP, KV_PB, FP8)

    _finish(ws_ptr, out_ptr, acc, m_i, l_i, row, b, hb, sp, stride_ot, stride_oh, n_used,
            num_splits, ml_offset, cnt_offset, out_scale, offs_h, offs_d, h_ok, q_mask,
            H, D, HB, SPLIT, MERGE_SB)


@triton.jit
def _split_range(L, sp, num_splits, min_split, BLOCK_N: tl.constexpr):
    """Split sp of a sequence of L cached positions: [lo, hi) and how many splits it uses.
    Split lengths are per sequence, a multiple of BLOCK_N (tiles stay block-aligned) and
    at least min_split; num_splits * split_len >= L. lo >= L: an empty split."""
    per = tl.maximum((L + num_splits - 1) // num_splits, min_split)
    split_len = (per + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = sp * split_len
    hi = tl.minimum(lo + split_len, L)
    n_used = tl.minimum(num_splits, tl.maximum((L + split_len - 1) // split_len, 1))
    return lo, hi, n_used


@triton.jit
def _finish(ws_ptr, out_ptr, acc, m_i, l_i, row, b, hb, sp, stride_ot, stride_oh, n_used,
            num_splits, ml_offset, cnt_offset, out_scale, offs_h, offs_d, h_ok, q_mask,
            H: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, SPLIT: tl.constexpr,
            MERGE_SB: tl.constexpr):
    """A program's end, shared by every split-K decode kernel (here and mla_decode.py):
    with one split used, the normalised rows straight to out; otherwise the partials
    (acc (HB, D), m, l) to the workspace and, in the program that finishes last for this
    (sequence, head block), the merge. Its counter (in the workspace's tail; zero before the
    launch, see _Counters) counts the splits done; the merging program sets it back to zero,
    so the next launch finds it zeroed without a memset, and split-K stays one launch."""
    if SPLIT:
        direct = n_used == 1      # a sequence short enough for one split: no partials
    else:
        direct: tl.constexpr = True
    if direct:
        _write_out(out_ptr, row, stride_ot, stride_oh, offs_h, offs_d, h_ok, acc, l_i,
                   out_scale, D)
    else:
        ws_row = (b * num_splits + sp) * H + offs_h                   # (HB,)
        tl.store(ws_ptr + ws_row[:, None] * D + offs_d[None, :], acc, mask=q_mask)
        tl.store(ws_ptr + ml_offset + ws_row * 2, m_i, mask=h_ok)
        tl.store(ws_ptr + ml_offset + ws_row * 2 + 1, l_i, mask=h_ok)
        cnt_ptr = (ws_ptr + cnt_offset).to(tl.pointer_type(tl.int32), bitcast=True) \
            + b * tl.num_programs(0) + hb
        tl.debug_barrier()                    # every thread's partial is written
        done = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if done == n_used - 1:
            tl.store(cnt_ptr, 0)
            _merge_splits(ws_ptr, out_ptr, row, b, stride_ot, stride_oh, n_used,
                          num_splits, ml_offset, out_scale, offs_h, offs_d, h_ok, q_mask,
                          H, D, HB, MERGE_SB)


@triton.jit
def _merge_splits(ws_ptr, out_ptr, row, b, stride_ot, stride_oh, n_used, num_splits,
                  ml_offset, out_scale, offs_h, offs_d, h_ok, q_mask,
                  H: tl.constexpr, D: tl.constexpr, HB: tl.constexpr, SB: tl.constexpr):
    """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s / R_V over the used splits,
    SB splits at a time. Partials are read with .cg (L2): other SMs wrote them. SB is kept
    small: registers are allocated for the whole kernel, and a wide merge tile would cost
    the main loop its occupancy (measured: 246 registers/thread with SB = 8, HB 16, 4 warps).
    At batch 1 this costs ~0.5 us a step; pipelining the loop (tl.range num_stages 3-4) was
    slower, and wider steps help only up to SB 8 (docs/kernel_notes.md, v6)."""
    offs_s = tl.arange(0, SB)
    m_run = tl.full([HB], float("-inf"), tl.float32)
    l_run = tl.zeros([HB], tl.float32)
    acc = tl.zeros([HB, offs_d.shape[0]], tl.float32)
    for s0 in range(0, n_used, SB):
        s_ok = (s0 + offs_s) < n_used                                 # (SB,)
        rows = (b * num_splits + s0 + offs_s)[:, None] * H + offs_h[None, :]   # (SB, HB)
        sh_ok = s_ok[:, None] & h_ok[None, :]
        m_s = tl.load(ws_ptr + ml_offset + rows * 2, mask=sh_ok, other=float("-inf"),
                      cache_modifier=".cg")
        l_s = tl.load(ws_ptr + ml_offset + rows * 2 + 1, mask=sh_ok, other=0.0,
                      cache_modifier=".cg")
        a_s = tl.load(ws_ptr + rows[:, :, None] * D + offs_d[None, None, :],
                      mask=s_ok[:, None, None] & q_mask[None, :, :], other=0.0,
                      cache_modifier=".cg")                            # (SB, HB, D_PAD)
        m_new = tl.maximum(m_run, tl.max(m_s, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)         # no (-inf) - (-inf)
        c_run = tl.exp2(m_run - m_ref)
        c_s = tl.exp2(m_s - m_ref[None, :])                           # (SB, HB)
        acc = acc * c_run[:, None] + tl.sum(a_s * c_s[:, :, None], axis=0)
        l_run = l_run * c_run + tl.sum(l_s * c_s, axis=0)
        m_run = m_new
    _write_out(out_ptr, row, stride_ot, stride_oh, offs_h, offs_d, h_ok, acc, l_run, out_scale,
               D)


@dataclass(frozen=True)
class DecodeConfig:
    head_block: int      # heads per program (>= 16: a tl.dot dim)
    block_n: int         # cache positions per loop iteration (>= 16)
    num_warps: int
    num_stages: int
    maxnreg: int | None = None     # register cap per thread (more programs per SM)
    min_split: int = 64  # positions a split covers at least (below: its fixed cost dominates)
    merge_sb: int = 0     # splits per merge step; 0: ~32 fp32 values a thread
    bt_prefetch: int = 0  # > 0: block ids of this many tiles per vector load (aligned tiles)
    kv_grid: bool = False  # constant A: one program per (kv head, head block of its group)
    programs_per_sm: int = 0  # split-K target; 0: _TARGET_PROGRAMS_PER_SM (1-2 warp tiles)
    resident_per_sm: int = 0  # > 0: programs an SM holds at once (shared memory bound):
    # splits are then chosen by whole waves (wave_splits)


# Interpreter (CPU tests): smallest legal tiles and splits, so short sequences still span
# several tiles and several splits.
_INTERPRET_CONFIG = DecodeConfig(head_block=16, block_n=16, num_warps=4, num_stages=1,
                                 min_split=16, bt_prefetch=4)


@functools.lru_cache(maxsize=None)
def kv_heads_per_block(h: int, group: int, head_block: int) -> int:
    """Constant A: the most kv heads one block of head_block query heads reads (query head
    j reads kv head j // group). 1 when the block lies inside one group."""
    return max(min(h - 1, hb + head_block - 1) // group - hb // group + 1
               for hb in range(0, h, head_block))


def decode_config(h: int, d_h: int, r_k: int, r_v: int, block_size: int,
                  batch: int, const_a: bool = False) -> DecodeConfig:
    """Tile config per model shape, cache block size and batch (GPU). Measured on the H200
    with Triton 3.6 (docs/kernel_notes.md): small programs win, because Triton 3.6 gives
    these tiles 130-255 registers a thread and occupancy, not tile efficiency, bounds the
    kernel. A BLOCK_N that divides block_size keeps a tile inside one cache block (one
    block-table read, cheap pointers); deeper pipelines (5 stages) keep more loads in flight.
        T6-medium 64 x 32K: (16, 16, 1 warp, 5 st) 806 us; (16, 16, 2, 5) 900; (16, 16, 2, 3)
        944; (64, 16, 4, 2) 1183; (16, 32, 4, 2) 1406 (the first version)
        batch 1 x 4K graph replay: (16, 16, 2, 3) 22.7 us; (16, 16, 1, 5) 32.2 us
        paper 64 x 32K: (32, 32, 1, 5) 279 us; (32, 16, 1, 5) 280; (32, 32, 1, 3) 299
    Batch < 16 (v6, CUDA graph, us a call at 1 x 512 / 1 x 4K, 32 splits): (16, 16, 2, 3)
    with v5's merge + memset 10.5 / 21.7; + bt_prefetch 16 + merge_sb 8 (this) 9.6 / 18.8;
    merge_sb 2 / 4 / 16: 9.5 / 10.8 / 13.2 and 19.5 / 23.6 / 21.5; 4 warps merge_sb 16
    11.1 / 17.9; 1 warp 13.1 / 29.9. bt_prefetch at batch >= 16 costs 7-15% (more smem).
    """
    if v.INTERPRET:
        return _INTERPRET_CONFIG
    if const_a:
        # MHA / GQA / MQA (r_k = kv heads). Measured on the H200 (bench/const_a.py --quick,
        # docs/kernel_notes.md "Constant A", ms at 64 x 128K; SDPA in brackets):
        #   MHA-16:   16-head blocks 4 warps 2 st 7.50 [7.40]; kv grid 1 warp 5 st 8.68
        #   GQA 32/8: blocks 1w5st 3.81 [3.70]; kv grid 1w5st 3.92; blocks 4w2st 4.92
        #   GQA 30/2: kv grid 1w5st 1.14 [1.06]; blocks 1w5st 1.21; blocks 4w2st 4.78
        #   MQA 31/1: the paper shape's all-heads program 0.58 [0.93]; kv grid 0.67
        # and at batch 1 x 4K the 1-warp kv grid wins every shape (0.021-0.024 ms against
        # 0.028-0.041 for the rest), so: batch < 16 kv grid; MHA 4-warp blocks; groups of
        # <= 8 heads (whole groups in a 16-head block) 1-warp blocks; larger groups, which
        # 16-head blocks straddle, the kv grid.
        group = h // r_k
        if batch < 16:
            return DecodeConfig(head_block=16, block_n=16, num_warps=1, num_stages=5,
                                kv_grid=True)
        if group == 1:
            return DecodeConfig(head_block=16, block_n=16, num_warps=4, num_stages=2)
        if r_k > 1 or h > 32:
            return DecodeConfig(head_block=16, block_n=16, num_warps=1, num_stages=5,
                                kv_grid=group > 8)
    if r_k == 1 and r_v == 1 and h <= 32:
        # paper shape (h 32, R 1): all heads in one 1-warp program
        bn = 32 if block_size % 32 == 0 else 16
        return DecodeConfig(head_block=v.next_pow2(h, 16), block_n=bn, num_warps=1,
                            num_stages=5)
    # T6 ranks (h 47, R 2): 16-head blocks, 16-position tiles
    if batch < 16:       # few, short programs: latency of each matters more than occupancy
        return DecodeConfig(head_block=16, block_n=16, num_warps=2, num_stages=3,
                            bt_prefetch=16, merge_sb=8)
    return DecodeConfig(head_block=16, block_n=16, num_warps=1, num_stages=5)


# Split-K heuristic (the grid): splits = ceil(16 * SMs / (batch * head blocks)), at most
# max_seq_len / 128 and 64; each sequence then uses as many of them as its own length
# fills (DecodeConfig.min_split positions at least). Measured before per-sequence split
# lengths (every sequence's splits were max_seq_len / splits long): Measured on the H200 (us, do_bench; T6-medium with
# (16, 16, 2 warps, 3 stages), paper with (32, 32, 1, 3)), splits: time:
#   T6 1 x 4K     1:338 2:170 4:94 8:53 16:35 32:29          -> rule 32
#   T6 1 x 32K    1:2696 4:687 16:181 32:104 64:73           -> rule 64
#   T6 16 x 32K   1:2573 4:682 8:385 16:270 32:309 64:276    -> rule 44
#   T6 64 x 32K   1:2646 2:1466 4:1018 8:1134 16:966 64:1010 -> rule 11
#   T6 64 x 128K  1:10527 4:4046 8:4117 16:3774 64:3771      -> rule 11
#   T6 256 x 4K   1:499 2:576 4:494 8:509 16:538             -> rule 3
#   paper 1 x 32K 1:2239 8:276 16:151 32:91 64:71            -> rule 64
#   paper 16 x 32K 1:2269 16:164 32:114 64:107               -> rule 64
#   paper 64 x 4K 1:292 4:91 8:63 16:56 32:73                -> rule 32 (30% off best)
# Past ~2 programs per SM the curve is flat within run-to-run noise (~10%), except short
# contexts of the 1-program-per-sequence paper shape; one split per sequence is 2-3x
# slower wherever batch * head blocks < 2 * SMs.
MAX_SPLITS = 64
_TARGET_PROGRAMS_PER_SM = 16     # programs are 1-2 warps: this many keep loads in flight
_MIN_SPLIT_TOKENS = 128          # below this a split's fixed cost outweighs its parallelism
# Positions a split covers at least, per sequence in the batch (with DecodeConfig.min_split
# as the floor): a big batch fills the GPU without splitting short contexts, and each split
# costs a partial write and a merge share. Measured (H200, T6-medium, CUDA graphs, us per
# call; bench/kernels.py --midbatch-sweep), grid splits as shipped for max_model_len 33K:
#   64 x 512:  8 splits used of 11 (64 positions each) 35.3; 2 splits 20.8
#   64 x 1K:   11 used 50.1; 4 splits 34.4          16 x 512: 8 splits 11.7 (best)
_MIN_SPLIT_PER_SEQ = 4


def min_split_for(batch: int, config: DecodeConfig) -> int:
    return max(config.min_split, _MIN_SPLIT_PER_SEQ * batch)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_per_sequence(h: int, group: int, config: DecodeConfig) -> int:
    """Programs of one (sequence, split): blocks of head_block heads, or with kv_grid (a
    constant-A cache, group = h / n_kv) one per kv head and head_block-sized part of its
    group (<= h, so the workspace's B * h counters always suffice)."""
    if config.kv_grid:
        return (h // group) * -(-group // config.head_block)
    return -(-h // config.head_block)


def num_splits_for(batch: int, h: int, max_seq_len: int, config: DecodeConfig,
                   device: torch.device, group: int = 1) -> int:
    """Splits per sequence (the grid) from host-side sizes only (no device reads). Never
    more than a max_seq_len sequence can use (min_split_for): a program with nothing to do
    still takes a slot (64 x 512: 11 grid splits with 2 used 36.5 us, 2 grid splits 20.8)."""
    if device.type != "cuda":
        return 1
    n_hb = programs_per_sequence(h, group, config)
    sms = _sm_count(device.index or 0)
    target = (config.programs_per_sm or _TARGET_PROGRAMS_PER_SM) * sms
    s = -(-target // (batch * n_hb))
    s = min(s, MAX_SPLITS, max(1, max_seq_len // _MIN_SPLIT_TOKENS),
            -(-max_seq_len // min_split_for(batch, config)))
    s = max(1, s)
    if config.resident_per_sm:
        s = wave_splits(batch * n_hb, s, config.resident_per_sm * sms)
    return s


def wave_splits(programs: int, max_splits: int, slots: int) -> int:
    """The split count in [1, max_splits] whose grid wastes the least of its last wave, for
    programs that fill `slots` (SMs x programs resident per SM) a wave: a grid of
    programs * s takes ceil(programs * s / slots) waves of 1/s of the work each. Ties go to
    more splits. MLA at 64 x 32K on the H200 (one 4-warp program per SM, 132 SMs), ms by
    splits: 4 0.449, 5 0.653, 8 0.478, 16 0.513, 33 0.561 (docs/kernel_notes.md "MLA")."""
    best, best_cost = 1, 1.0
    for s in range(1, max_splits + 1):
        cost = -(-programs * s // slots) / s
        if cost <= best_cost:
            best, best_cost = s, cost
    return best


def workspace_numel(batch: int, h: int, d_h: int, num_splits: int) -> int:
    """fp32 elements of split-K scratch: partial acc (B, S, h, d_h), then (m, l) (B, S, h, 2),
    and at the workspace's end one int32 counter per (sequence, program) (at most B * h)."""
    return batch * num_splits * h * (d_h + 2) + batch * h


def make_workspace(batch: int, h: int, d_h: int, num_splits: int = MAX_SPLITS,
                   device: torch.device | str = "cuda") -> torch.Tensor:
    """Split-K scratch for up to `batch` sequences and `num_splits` splits; allocate once
    and pass the same tensor to every decode call (any contents: the launcher zeroes the
    counters when it cannot know they are zero)."""
    return torch.empty(workspace_numel(batch, h, d_h, num_splits), dtype=torch.float32,
                       device=device)


class _Counters:
    """Which part of a workspace's tail is known to hold zero counters, per workspace tensor.

    The merge counters of a launch sit at the end of the workspace: [numel - n, numel), n =
    batch * programs per sequence; partials fill it from the front: [0, P). The program that
    merges resets its counter, so a launch that completes leaves its counters zero and no
    memset is needed before the next (the memset was a graph node per layer: ~1 us).
    Tracked per tensor object: `zero_from` (every int32 at or after it is zero once the
    stream gets here) and `written_to` (the furthest partial end of any launch issued or
    captured on it: a captured graph may replay later, so that region can be dirty again).
    The memset runs when a launch's counters reach below zero_from, for a workspace never
    seen, or one modified by torch since (its version counter moved)."""
    _state: dict[int, list] = {}    # id(ws) -> [weakref, version, zero_from, written_to]

    @classmethod
    def prepare(cls, ws: torch.Tensor, cnt_from: int, partial_end: int) -> None:
        numel = ws.numel()
        version = -2 if ws.is_inference() else ws._version   # inference tensors: identity only
        st = cls._state.get(id(ws))
        if st is None or st[0]() is not ws or st[1] != version:
            if len(cls._state) > 64:
                cls._state = {k: x for k, x in cls._state.items() if x[0]() is not None}
            st = [weakref.ref(ws), -1, numel, 0]
            cls._state[id(ws)] = st
        if cnt_from < st[2]:
            ws[cnt_from:st[2]].zero_()      # async, graph-capturable
            st[2] = cnt_from
        st[3] = max(st[3], partial_end)
        st[2] = max(st[2], st[3])           # state once this launch has run
        st[1] = -2 if ws.is_inference() else ws._version


def decode_attention(q: torch.Tensor, ak_cache: torch.Tensor, bk_cache: torch.Tensor,
                     av_cache: torch.Tensor, bv_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                     query_start_loc: torch.Tensor, max_seq_len: int,
                     scale: float | None = None, workspace: torch.Tensor | None = None,
                     num_splits: int | None = None, out: torch.Tensor | None = None,
                     config: DecodeConfig | None = None) -> torch.Tensor:
    """Decode attention: each sequence has at most one query row (query_start_loc).

    q (T, h, d_h) with RoPE and 1/R_Q applied; caches as in reference.py; returns (T, h, d_h)
    in q's dtype (rows of sequences without a query are left untouched). max_seq_len is the
    host-side bound on seq_lens used to size the splits. workspace: fp32, contiguous,
    >= workspace_numel(B, h, d_h, num_splits) elements (make_workspace), reused across calls
    and CUDA-graph replays; allocated here when None.
    num_splits / config override the heuristic and the tuned tiles (tests, benchmarks).
    """
    _, bs, h, d_h, r_k, r_v = v.caches(q, ak_cache, bk_cache, av_cache, bv_cache)
    const_a = ak_cache is None
    batch = v.step_metadata(q, block_tables, seq_lens, query_start_loc, h, d_h,
                            bk_cache.dtype, bk_cache.device)
    out = v.output(out, q)
    cfg = config or decode_config(h, d_h, r_k, r_v, bs, batch, const_a)
    group = h // r_k if const_a else 1
    if cfg.kv_grid and not const_a:
        cfg = dataclasses.replace(cfg, kv_grid=False)     # T6: A varies per token and head
    if num_splits is None:
        num_splits = num_splits_for(batch, h, max_seq_len, cfg, q.device, group)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise v.KernelInputError(f"num_splits must be a positive int, got {num_splits!r}")
    need = workspace_numel(batch, h, d_h, num_splits)
    if num_splits == 1:
        ws = out                                   # unused: the kernel writes out directly
    elif workspace is None:
        ws = torch.empty(need, dtype=torch.float32, device=q.device)
    else:
        if (workspace.dtype != torch.float32 or not workspace.is_contiguous()
                or workspace.device != q.device or workspace.numel() < need):
            raise v.KernelInputError(
                f"workspace must be contiguous fp32 on {q.device} with >= {need} elements "
                f"(B={batch}, h={h}, d_h={d_h}, splits={num_splits}); got "
                f"{workspace.numel()} {workspace.dtype} on {workspace.device}")
        ws = workspace
    if batch == 0:
        return out
    scale = 1.0 / math.sqrt(d_h) if scale is None else float(scale)
    hb = cfg.head_block
    n_prog = programs_per_sequence(h, group, cfg)
    d_pad = v.next_pow2(d_h, 16)
    ml_offset = batch * num_splits * h * d_h
    cnt_offset = ws.numel() - batch * n_prog
    if num_splits > 1:
        _Counters.prepare(ws, cnt_offset, ml_offset + batch * num_splits * h * 2)
    grid = (n_prog, num_splits, batch)
    merge_sb = cfg.merge_sb or max(1, 32 * 32 * cfg.num_warps // (hb * d_pad))
    if const_a:            # one-hot A of weight 1: no 1/R in the logits or the output
        ak_cache = av_cache = bk_cache                  # stand-ins, never read
        qk_scale, out_scale = scale * LOG2E, 1.0
    else:
        qk_scale, out_scale = scale / r_k * LOG2E, 1.0 / r_v
    _decode_kernel[grid](
        q, ak_cache, bk_cache, av_cache, bv_cache, block_tables, seq_lens, query_start_loc,
        out, ws, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), min_split_for(batch, cfg), num_splits, ml_offset, cnt_offset,
        qk_scale, out_scale,
        H=h, D=d_h, R_K=r_k, R_V=r_v, BS=bs, HB=hb, D_PAD=d_pad,
        RK_PAD=v.next_pow2(r_k), RV_PAD=v.next_pow2(r_v), BLOCK_N=cfg.block_n,
        SPLIT=num_splits > 1, MERGE_SB=merge_sb,
        BT_PF=cfg.bt_prefetch, CONST_A=const_a, GROUP=group,
        KV_PB=kv_heads_per_block(h, group, hb) if const_a and not cfg.kv_grid else 1,
        KV_GRID=cfg.kv_grid,
        FP8=bk_cache.dtype == v.FP8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}))
    return out
