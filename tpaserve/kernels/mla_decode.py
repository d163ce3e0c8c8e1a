"""Paged MLA attention over the latent cache with the up-projections absorbed (DeepSeek-V2's
decode form): one Triton kernel, two launch modes.

For a query row q = [q_lat, q_pe] (h, kv_lora + rope) of sequence b and its cached rows
[c_m, k_pe_m] (reference.mla_attention_ref; the model absorbs W_uk into q_lat and applies
W_uv to the output):
    logit[h, m] = scale * (q_lat[h] . c_m + q_pe[h] . k_pe_m)
    o_lat[h]    = sum_m softmax_m(logit)[h, m] c_m                        (h, kv_lora)
Every head reads the same row per position (MQA with one kv head), so a program takes a
block of HB heads as the M dimension of tl.dot (padded to >= 16) and per tile of BLOCK_N
positions does three products:
    S (HB, N)    = q_lat (HB, C) @ c^T (C, N) + q_pe (HB, P) @ k_pe^T (P, N)
    acc (HB, C) += p (HB, N) @ c (N, C)
C = kv_lora padded to a power of two, P = rope padded to >= 16 (tl.dot's minimum): the two
parts of a row are two masked loads of one contiguous row (cache layout in reference.py).

Launch modes (the grid's third axis):
  decode  (head block, split, sequence) for sequences with exactly one query row (others
          return at once). Split-K over the context as kernels/decode.py does it, with its
          helpers: partials to a workspace (decode.workspace_numel with d_h = kv_lora), the
          last program of a (sequence, head block) merges them (decode._finish) and
          resets its counter (decode._Counters), so split-K stays one launch.
  rows    (head block, -, block of QB query rows) for sequences with several rows (prompt
          chunks, prefix hits): the QB rows x HB heads are the M dim (64 on CUDA, wgmma's
          minimum), each row causal over positions 0..its own, no split (the T / QB
          programs are the parallelism). A block may span sequences (found by binary
          search in query_start_loc): one pass per sequence segment, rows outside it
          masked. Each program reads its rows' whole context (O(T L / QB) latent reads)
          and does the absorbed arithmetic: a prefill kernel in the absorbed form, not the
          materialised FlashAttention prefill a long prompt wants (docs/kernel_notes.md,
          "MLA").
mla_attention runs the decode launch, then the rows launch when max_query_len > 1. Sizes
come from the caller as Python ints (no device reads), so steps capture in CUDA graphs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v
from tpaserve.kernels.decode import (
    LOG2E,
    DecodeConfig,
    _Counters,
    _finish,
    _split_range,
    min_split_for,
    num_splits_for,
    workspace_numel,
)


@triton.jit
def _attend(q_c, q_p, last, lo, hi, bt_row, cache_ptr, offs_c, offs_p, c_ok, p_ok, qk_scale,
            M: tl.constexpr, C: tl.constexpr, P: tl.constexpr, BS: tl.constexpr,
            C_PAD: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
            UPCAST: tl.constexpr):
    """Online softmax of M query rows (q_c (M, C_PAD), q_p (M, P_PAD)) over positions
    lo..hi-1 of one sequence (its block-table row bt_row); with CAUSAL, row m sees positions
    <= last[m] only (last (M,) int, every row's >= lo). Returns (m, l, acc (M, C_PAD)),
    base-2 logits (qk_scale carries log2 e), acc unnormalised."""
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, C_PAD], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)                               # (N,)
        tok_ok = pos < hi
        blk = tl.load(bt_row + pos // BS, mask=tok_ok, other=0)
        rows = cache_ptr + (blk.to(tl.int64) * BS + pos % BS)[:, None] * (C + P)
        c = tl.load(rows + offs_c[None, :], mask=tok_ok[:, None] & c_ok[None, :],
                    other=0.0)                                            # (N, C_PAD)
        kp = tl.load(rows + C + offs_p[None, :], mask=tok_ok[:, None] & p_ok[None, :],
                     other=0.0)                                           # (N, P_PAD)
        if UPCAST:
            c = c.to(tl.float32)
            kp = kp.to(tl.float32)
        s = tl.dot(q_c, tl.trans(c)) + tl.dot(q_p, tl.trans(kp))          # (M, N)
        if CAUSAL:
            ok = tok_ok[None, :] & (pos[None, :] <= last[:, None])
        else:
            ok = tok_ok[None, :]
        s = tl.where(ok, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])                                   # (M, N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(c.dtype), c, acc * alpha[:, None])              # (M, C_PAD)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _seq_of(qsl_ptr, t, n_seqs):
    """The sequence that owns query row t: the last b with qsl[b] <= t (binary search)."""
    lo = t * 0
    hi = lo + n_seqs - 1              # tensors, even if n_seqs is specialised to a constant
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go = tl.load(qsl_ptr + mid) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def _mla_kernel(
    q_ptr, cache_ptr,                             # q (T, H, C + P); cache (slots, C + P)
    bt_ptr, seq_lens_ptr, qsl_ptr,                # (B, max_blocks); (B,); (B+1,)
    out_ptr, ws_ptr,                              # out (T, H, C); fp32 split-K workspace
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    n_seqs, min_split, num_splits, ml_offset, cnt_offset, qk_scale,   # scale * log2(e)
    H: tl.constexpr, C: tl.constexpr, P: tl.constexpr, BS: tl.constexpr,
    HB: tl.constexpr, C_PAD: tl.constexpr, P_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,           # rows launch (see the module docstring), else decode
    QB: tl.constexpr,             # rows launch: query rows a program takes (M = QB * HB)
    SPLIT: tl.constexpr, MERGE_SB: tl.constexpr,
    UPCAST: tl.constexpr,         # interpreter: fp32 after loads (its bf16 math is wrong)
):
    hb = tl.program_id(0)
    sp = tl.program_id(1)
    offs_c = tl.arange(0, C_PAD)
    offs_p = tl.arange(0, P_PAD)
    c_ok = offs_c < C
    p_ok = offs_p < P
    if ROWS:
        # rows t0 .. t0+QB-1 (x the head block) as the M dim: m -> (row t0 + m // HB,
        # head hb * HB + m % HB). They may span sequences: one pass per sequence segment.
        t0 = tl.program_id(2) * QB
        n_tok = tl.load(qsl_ptr + n_seqs)          # rows past it: graph-bucket padding
        offs_m = tl.arange(0, QB * HB)
        t = t0 + offs_m // HB                                             # (M,)
        head = hb * HB + offs_m % HB                                      # (M,)
        m_ok = (head < H) & (t < n_tok)
        q_row = q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh
        q_c = tl.load(q_row + offs_c[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        q_p = tl.load(q_row + C + offs_p[None, :], mask=m_ok[:, None] & p_ok[None, :],
                      other=0.0)
        if UPCAST:
            q_c = q_c.to(tl.float32)
            q_p = q_p.to(tl.float32)
        seg = t0
        seg_stop = tl.minimum(t0 + QB, n_tok)
        while seg < seg_stop:
            b = _seq_of(qsl_ptr, seg, n_seqs)
            s_end = tl.load(qsl_ptr + b + 1)
            seg_end = tl.minimum(s_end, seg_stop)
            if s_end - tl.load(qsl_ptr + b) > 1:   # one-row sequences: the decode launch
                L = tl.load(seq_lens_ptr + b)
                in_seg = (t >= seg) & (t < seg_end)
                hi = L - (s_end - seg_end)            # the segment's last position + 1
                last = tl.where(in_seg, L - (s_end - t), hi - 1)   # causal, (M,)
                m_i, l_i, acc = _attend(q_c, q_p, last, 0, hi, bt_ptr + b * stride_bt,
                                        cache_ptr, offs_c, offs_p, c_ok, p_ok, qk_scale,
                                        QB * HB, C, P, BS, C_PAD, BLOCK_N, True, UPCAST)
                inv_l = 1.0 / tl.where(l_i > 0, l_i, 1.0)
                tl.store(out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh
                         + offs_c[None, :], (acc * inv_l[:, None]).to(out_ptr.dtype.element_ty),
                         mask=(in_seg & m_ok)[:, None] & c_ok[None, :])
            seg = seg_end
    else:
        b = tl.program_id(2)
        row = tl.load(qsl_ptr + b)
        row_end = tl.load(qsl_ptr + b + 1)
        L = tl.load(seq_lens_ptr + b)
        if row_end - row != 1:                    # no query, or a chunk (rows launch)
            return
        lo_pos, hi_pos, n_used = _split_range(L, sp, num_splits, min_split, BLOCK_N)
        if (lo_pos >= L) & (sp > 0):              # empty split: the merge never reads it
            return

        offs_h = hb * HB + tl.arange(0, HB)                               # (HB,)
        h_ok = offs_h < H
        q_row = q_ptr + row * stride_qt + offs_h[:, None] * stride_qh
        q_c = tl.load(q_row + offs_c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
        q_p = tl.load(q_row + C + offs_p[None, :], mask=h_ok[:, None] & p_ok[None, :],
                      other=0.0)
        if UPCAST:
            q_c = q_c.to(tl.float32)
            q_p = q_p.to(tl.float32)
        m_i, l_i, acc = _attend(q_c, q_p, hi_pos, lo_pos, hi_pos, bt_ptr + b * stride_bt,
                                cache_ptr, offs_c, offs_p, c_ok, p_ok, qk_scale, HB, C, P, BS,
                                C_PAD, BLOCK_N, False, UPCAST)
        q_mask = h_ok[:, None] & c_ok[None, :]
        _finish(ws_ptr, out_ptr, acc, m_i, l_i, row, b, hb, sp, stride_ot, stride_oh, n_used,
                num_splits, ml_offset, cnt_offset, 1.0, offs_h, offs_c, h_ok, q_mask,
                H, C, HB, SPLIT, MERGE_SB)


# Interpreter (CPU tests): smallest legal tiles and splits, so short sequences still span
# several tiles and several splits.
_INTERPRET_CONFIG = DecodeConfig(head_block=16, block_n=16, num_warps=4, num_stages=1,
                                 min_split=16)


# Rows launch: query rows x head block per program, as tl.dot's M dim (64 on CUDA: Hopper's
# wgmma wants M >= 64; the 32 of the interpreter makes 2-row programs straddle sequences in
# the tests). Every row of a program shares each latent tile it reads.
_ROWS_M = 32 if v.INTERPRET else 64
# and at most 32 positions a tile: (64, 32) scores; the decode launch's 128-position tiles
# need 368 KB of shared memory here (the H200 has 227 KB).
_ROWS_BLOCK_N = 32


def mla_config(h: int, kv_lora: int, batch: int) -> DecodeConfig:
    """Tiles per shape: all heads of a sequence in one program up to 32 (they share every
    row read: 23 heads -> one program of 32 rows), blocks of 32 above. Measured on the H200
    (bench/mla.py --sweep, decode at 64 x 32K, 33 splits, ms, % of copy; kernel_notes "MLA"):
        (23, 256+32): (32, 128, 4 warps, 2 st) 0.561 51%; (32, 64, 4, 3) 0.589; (32, 64, 4, 2)
        0.612; (32, 32, 2, 3) 0.633; (32, 32, 4, 2) 0.731 (the first guess); (64, 32, 4, 2)
        0.756; (32, 32, 8, 2) 0.905; (32, 16, 4, 3) 1.125
        (16, 512+64): (16, 32, 4, 2) 0.789 72%; (16, 32, 4, 3) 0.796; (16, 64, 4, 2) 0.935;
        (16, 16, 4, 3) 1.194; (16, 16, 8, 2) 1.711 (the first guess); 64-row blocks 1.9-3.0
    These programs hold most of an SM (shared memory / registers), so the split count goes
    by whole waves (decode.wave_splits): with these tiles 4 splits 0.449 ms 63% / 0.722 78%,
    5 splits 0.653 / 1.100, 8 0.478 / 0.737, 16 0.513 / 0.770."""
    if v.INTERPRET:
        return _INTERPRET_CONFIG
    hb = 16 if h <= 16 else 32
    c_pad = v.next_pow2(kv_lora, 16)
    if c_pad <= 256:
        return DecodeConfig(head_block=hb, block_n=128, num_warps=4, num_stages=2,
                            programs_per_sm=2, resident_per_sm=1)
    return DecodeConfig(head_block=hb, block_n=32, num_warps=4, num_stages=2,
                        programs_per_sm=2, resident_per_sm=1)


def mla_attention(q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                  max_seq_len: int, kv_lora: int, scale: float,
                  workspace: torch.Tensor | None = None, num_splits: int | None = None,
                  out: torch.Tensor | None = None,
                  config: DecodeConfig | None = None) -> torch.Tensor:
    """q (T, h, kv_lora + rope) = [q_lat, q_pe] in the cache's dtype -> o_lat (T, h, kv_lora).

    latent_cache (num_blocks, block_size, kv_lora + rope), metadata as reference.py;
    max_query_len / max_seq_len: host-side bounds (the launch never reads the device).
    scale: the model's (MLA: 1 / sqrt(qk_nope + qk_rope), not derivable from q's width).
    workspace: fp32, >= decode.workspace_numel(B, h, kv_lora, num_splits) elements
    (decode.make_workspace), reused across calls and graph replays; allocated when None.
    num_splits / config override the heuristic and the tiles (tests, benchmarks)."""
    _, bs, width = v.latent_cache(latent_cache, kv_lora)
    h = q.shape[1] if q.dim() == 3 else -1
    batch = v.step_metadata(q, block_tables, seq_lens, query_start_loc, h, width,
                            latent_cache.dtype, latent_cache.device)
    T = q.shape[0]
    if out is None:
        out = q.new_empty(T, h, kv_lora)
    elif (out.shape != (T, h, kv_lora) or out.dtype != q.dtype or out.device != q.device
            or out.stride(2) != 1):
        raise v.KernelInputError(
            f"out must be ({T}, {h}, {kv_lora}) {q.dtype} on {q.device}, contiguous in its "
            f"last dim; got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    cfg = config or mla_config(h, kv_lora, batch)
    if num_splits is None:
        num_splits = num_splits_for(batch, h, max_seq_len, cfg, q.device)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise v.KernelInputError(f"num_splits must be a positive int, got {num_splits!r}")
    need = workspace_numel(batch, h, kv_lora, num_splits)
    if num_splits == 1:
        ws = out                                   # unused: the kernel writes out directly
    elif workspace is None:
        ws = torch.empty(need, dtype=torch.float32, device=q.device)
    elif (workspace.dtype != torch.float32 or not workspace.is_contiguous()
            or workspace.device != q.device or workspace.numel() < need):
        raise v.KernelInputError(
            f"workspace must be contiguous fp32 on {q.device} with >= {need} elements "
            f"(B={batch}, h={h}, kv_lora={kv_lora}, splits={num_splits}); got "
            f"{workspace.numel()} {workspace.dtype} on {workspace.device}")
    else:
        ws = workspace
    if batch == 0 or T == 0:
        return out
    hb = cfg.head_block
    n_hb = triton.cdiv(h, hb)
    c_pad = v.next_pow2(kv_lora, 16)
    ml_offset = batch * num_splits * h * kv_lora
    cnt_offset = ws.numel() - batch * n_hb
    if num_splits > 1:
        _Counters.prepare(ws, cnt_offset, ml_offset + batch * num_splits * h * 2)
    common = dict(H=h, C=kv_lora, P=width - kv_lora, BS=bs, HB=hb, C_PAD=c_pad,
                  P_PAD=v.next_pow2(width - kv_lora, 16), UPCAST=v.INTERPRET,
                  num_stages=cfg.num_stages)
    args = (q, latent_cache, block_tables, seq_lens, query_start_loc, out, ws, q.stride(0),
            q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), batch)
    qk_scale = float(scale) * LOG2E
    merge_sb = cfg.merge_sb or max(1, 32 * 32 * cfg.num_warps // (hb * c_pad))
    _mla_kernel[(n_hb, num_splits, batch)](
        *args, min_split_for(batch, cfg), num_splits, ml_offset, cnt_offset, qk_scale,
        ROWS=False, QB=1, SPLIT=num_splits > 1, MERGE_SB=merge_sb, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, **common)
    if max_query_len > 1:
        qb = max(1, _ROWS_M // hb)
        # the rows launch's acc is (qb * hb, C_PAD) fp32: 8 warps from 64 x 256 up
        warps = 8 if qb * hb * c_pad >= 64 * 256 else cfg.num_warps
        _mla_kernel[(n_hb, 1, triton.cdiv(T, qb))](
            *args, 1, 1, 0, 0, qk_scale, ROWS=True, QB=qb, SPLIT=False, MERGE_SB=1,
            BLOCK_N=min(cfg.block_n, _ROWS_BLOCK_N), num_warps=warps, **common)
    return out
