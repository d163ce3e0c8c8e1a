"""Skinny GEMM for decode: y (M, N) = x (M, K) @ W (N, K)^T with few rows M (one token per
sequence), reading W near the memory-bandwidth limit. reference: F.linear(x, W).

At decode batch sizes a layer's GEMMs are pure weight streaming (T6-medium: 25 MB of
weights per layer, ~6 us at the H200's copy rate), but cuBLAS picks kernels built for
larger M and reaches 0.4-1.5 TB/s on these shapes (gemv, split-K + a separate reduce
kernel, 256-wide tiles that leave most SMs idle). This kernel:

- tiles W by BLOCK_N rows x the whole K (or K / SPLIT_K), so even N = 1024 gives one or
  two programs per SM; every program streams its slab of W with 16-byte loads along K,
  software-pipelined num_stages deep (cp.async into shared memory for tl.dot);
- multiplies with tl.dot, M padded to BLOCK_M >= 16 (rows past M are clamped copies of
  row M - 1 whose results are never stored), or, DOT=False, a broadcast multiply + sum
  on the CUDA cores (any BLOCK_M, no shared memory);
- split-K without a second launch: each split stores an fp32 partial tile to a scratch
  buffer and bumps a per-tile counter; the program that arrives last sums the partials
  in split order (deterministic), writes y and resets the counter to 0, so the counters
  (one persistent int32 buffer per device) need no memset per call.
Accumulation is fp32; y has x's dtype. fp32 inputs use IEEE products (no TF32), like
F.linear with torch's default matmul precision.

The launcher reads tensor metadata only (no device values, no host sync) and can be
captured in a CUDA graph. The counters assume one stream at a time per device issues
split-K launches (the engine runs one stream).

When it wins: `use_skinny(M, N, K)`, from bench/gemm.py's measurements (numbers in
docs/kernel_notes.md, "Skinny GEMM").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v

MAX_TILES = 4096            # split-K counters per device (tiles of one split-K launch)


@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x_ptr, w_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, K_SPLIT,
                   stride_xm, stride_wn, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SPLIT_K: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                   EVEN_K: tl.constexpr):
    """Grid (N tiles, splits, M tiles). Program (n, s, m) computes rows m*BLOCK_M.. of y,
    columns n*BLOCK_N.., over K range [s*K_SPLIT, min((s+1)*K_SPLIT, K)); K_SPLIT is a
    multiple of BLOCK_K, so only the last tile of K can be partial (EVEN_K: none is)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Clamped rows instead of masks: loads stay unmasked along M and N (16-byte vectors,
    # pipelinable); rows past the end are recomputed copies that the store drops.
    rows_x = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_w = tl.minimum(offs_n, N - 1).to(tl.int64)
    k0 = pid_s * K_SPLIT
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + (k0 + offs_k)[None, :]    # (BM, BK)
    w_ptrs = w_ptr + rows_w[:, None] * stride_wn + (k0 + offs_k)[None, :]    # (BN, BK)
    k_len = tl.minimum(K_SPLIT, K - k0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_len, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k + offs_k) < k_len
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        if DOT:
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        else:
            prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]  # (BM, BN, BK)
            acc += tl.sum(prod, axis=2)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    y_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)
    else:
        tile = pid_m * tl.num_programs(0) + pid_n
        offs_t = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        ws_tile = ws_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(ws_tile + pid_s * (BLOCK_M * BLOCK_N) + offs_t, acc)
        tl.debug_barrier()                            # every thread's partial is written
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:                    # last one: reduce, in split order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):        # .cg: other SMs wrote these (L2)
                total += tl.load(ws_tile + s * (BLOCK_M * BLOCK_N) + offs_t,
                                 cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(cnt_ptr + tile, 0)         # ready for the next launch


@dataclass(frozen=True)
class SkinnyConfig:
    block_m: int
    block_n: int
    block_k: int            # for 2-byte dtypes; fp32 uses half (same bytes per tile)
    split_k: int = 1        # requested; the launch uses ceil(K / K_SPLIT) <= this
    num_warps: int = 4
    num_stages: int = 4
    dot: bool = True


# use_skinny: decode-sized M, weights that are not tiny (smaller GEMMs are launch-bound
# either way) and N <= MAX_N: at N = 5472 (c_fc1|c_fc2) cuBLAS already streams at ~1.9 TB/s
# and this kernel only ties it (M = 1) or loses (M >= 2). Measured on an H200, bf16, CUDA
# graphs, runs 1-2 of docs/kernel_notes.md "Skinny GEMM" (us per call, cuBLAS -> skinny):
#   N x K         M = 1         M = 16        M = 64        M = 128 (best of sweep)
#   1120 x 1024   4.52 -> 2.99  4.61 -> 3.99  4.58 -> 4.24  4.64 -> 5.94
#   1024 x 3008   7.47 -> 5.32  7.79 -> 6.05  7.93 -> 6.86  8.32 -> 9.12
#   1024 x 2736   7.38 -> 5.27  7.59 -> 5.87  7.82 -> 6.85  8.64 -> 9.22
#   5472 x 1024   5.73 -> 5.77  5.78 -> 6.19  6.16 -> 6.40  6.23 -> 8.75
# MAX_M is 16, not 64, although the table wins up to 64: inside the engine's batch-64 decode
# graph the kernel ran ~2x slower than here (profiled 10.5 us per call, 756 us per step vs
# cuBLAS's 536) and the step got slower (1.695 -> 1.834 ms); batches 1 and 16 gained
# (1.108 -> 0.983 ms, 1.514 -> 1.451 ms, A/B in one run).
MAX_M = 16
MAX_N = 4096
MIN_WEIGHT = 1 << 18
# False routes every call to cuBLAS: the A/B of `bench/engine_step.py --no-skinny-gemm`,
# which sets it in-process before any graph is captured (use_skinny reads it per call).
ENABLED = True


def use_skinny(M: int, N: int, K: int) -> bool:
    """Whether linear() beats cuBLAS for x (M, K) @ W (N, K)^T (H200 measurements, bf16,
    inside CUDA graphs; see the table above)."""
    return ENABLED and 0 < M <= MAX_M and N <= MAX_N and N * K >= MIN_WEIGHT


def skinny_config(M: int, N: int, K: int, device: torch.device) -> SkinnyConfig:
    """Tile sizes from host-side sizes only, the winners of bench/gemm.py's sweep at
    T6-medium's shapes (H200):
    - M <= 2: CUDA-core broadcast, 4 rows of W x 1024 of K per program and step (N / 4
      = 256-280 programs, ~2 per SM). tl.dot's 16-row padding lost here (qkv M = 1: 2.99
      vs 4.29 us). The sweep's bench-best (2 rows, all of K in one step: attn c_proj 4.30
      vs 5.32 us) was *slower* inside the engine's decode graph (batch-1 replay 0.983 ->
      1.190 ms), so it is not used; see docs/kernel_notes.md.
    - M > 2, short rows (K <= 1536): tl.dot, 16 rows of W per program, no split-K
      (split-K's partial store + counter + reduce costs more than it hides at K = 1024).
    - M > 2, long rows: tl.dot, 32 rows of W per program, K split into 4-8 parts of ~384
      (N = 1024: 32 tiles x 8 = 256 programs); the last split reduces in-kernel.
    """
    if M <= 2:
        return SkinnyConfig(M, 4, 1024, 1, 4, 3, False)
    bm = min(64, max(16, v.next_pow2(M)))
    if K <= 1536:
        return SkinnyConfig(bm, 16, 128, 1, 4, 6) if bm == 16 else \
            SkinnyConfig(bm, 16, 256, 1, 4, 3)
    split = min(8 if bm == 16 else 4, v.next_pow2(-(-K // 384)))
    return SkinnyConfig(bm, 32, 128, split, 4, 4)


_COUNTERS: dict[tuple[str, int | None], torch.Tensor] = {}


def _counters(device: torch.device) -> torch.Tensor:
    key = (device.type, device.index)
    c = _COUNTERS.get(key)
    if c is None:
        # zero once; every split-K launch leaves its counters at 0 again
        c = _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return c


def _bad(what: str, **tensors: torch.Tensor) -> v.KernelInputError:
    shown = ", ".join(f"{n}: {tuple(t.shape)} {t.dtype} strides {t.stride()} on {t.device}"
                      for n, t in tensors.items())
    return v.KernelInputError(f"{what}; got {shown}")


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, *,
           config: SkinnyConfig | None = None) -> torch.Tensor:
    """y = x @ weight^T (F.linear without bias), fp32 accumulation.

    x (M, K), contiguous along K (rows may be strided, e.g. a column view); weight (N, K),
    contiguous along K; same float dtype (fp16/bf16/fp32) and device -> y (M, N) in x's
    dtype, contiguous (or written into `out`, (M, N) contiguous along N). config: tile
    override (bench/gemm.py's sweep); default skinny_config(M, N, K).
    """
    if not (x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and (x.stride(1) == 1 or x.shape[1] <= 1)
            and (weight.stride(1) == 1 or weight.shape[1] <= 1)
            and x.dtype == weight.dtype and x.dtype in v.FLOAT_DTYPES
            and x.device == weight.device):
        raise _bad("linear needs x (M, K) and weight (N, K), both contiguous along K, of one "
                   "float dtype (fp16/bf16/fp32) on one device", x=x, weight=weight)
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    elif not (out.dim() == 2 and tuple(out.shape) == (M, N) and out.dtype == x.dtype
              and out.device == x.device and (out.stride(1) == 1 or N <= 1)):
        raise _bad(f"out must be ({M}, {N}) {x.dtype}, contiguous along N", out=out)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    cfg = config or skinny_config(M, N, K, x.device)
    bk = cfg.block_k if x.element_size() <= 2 else max(16, cfg.block_k // 2)
    bm = cfg.block_m
    if cfg.dot and bm < 16:
        raise v.KernelInputError(f"config {cfg}: tl.dot needs block_m >= 16")
    grid_n, grid_m = triton.cdiv(N, cfg.block_n), triton.cdiv(M, bm)
    k_split = triton.cdiv(triton.cdiv(K, max(1, cfg.split_k)), bk) * bk
    splits = triton.cdiv(K, k_split)
    if splits > 1 and grid_n * grid_m > MAX_TILES:
        k_split, splits = triton.cdiv(K, bk) * bk, 1          # too many tiles to count
    if splits > 1:
        ws = torch.empty(grid_n * grid_m * splits * bm * cfg.block_n, dtype=torch.float32,
                         device=x.device)
        cnt = _counters(x.device)
    else:
        ws = cnt = out                                        # unused
    _skinny_kernel[(grid_n, splits, grid_m)](
        x, weight, out, ws, cnt, M, N, K, k_split, x.stride(0), weight.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg.block_n, BLOCK_K=bk, SPLIT_K=splits, DOT=cfg.dot,
        IEEE=x.dtype == torch.float32, EVEN_K=K % bk == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out

