"""Input checks shared by the kernel launchers: typed errors whose messages show the values.

Launchers sit on the decode hot path (batch 1 must stay ~20 us per call), so every check
here reads tensor metadata only (never a value on the device, never a host sync), and the
hot checks build their error message only once a check has failed.
"""
from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# e4m3 factor caches (reference.quantize_factors_fp8); their queries may be any FLOAT_DTYPES
FP8 = torch.float8_e4m3fn
CACHE_DTYPES = FLOAT_DTYPES + (FP8,)

# Triton on CPU (tests): sizes of config choices and the split heuristic follow this flag.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class KernelInputError(ValueError):
    """A kernel launcher was given tensors that do not match its contract."""


def require(cond: bool, msg: str) -> None:
    """For cold paths only: the message is built before the call, so hot checks spell out
    `if not cond: raise KernelInputError(...)` instead."""
    if not cond:
        raise KernelInputError(msg)


def next_pow2(n: int, at_least: int = 1) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def factor_caches(ak_cache: torch.Tensor, bk_cache: torch.Tensor, av_cache: torch.Tensor,
                  bv_cache: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Check the four per-layer caches against reference.py's layout.

    Returns (num_blocks, block_size, h, d_h, R_K, R_V). The kernels index slots as
    slot * elems_per_token, so every cache must be contiguous.
    """
    caches = (ak_cache, bk_cache, av_cache, bv_cache)
    for t in caches:
        if t.dim() != 4 or not t.is_contiguous() or t.dtype not in CACHE_DTYPES:
            _bad_caches(caches)
    nb, bs, h, r_k = ak_cache.shape
    r_v = av_cache.shape[3]
    d_h = bk_cache.shape[3]
    dt, dev = ak_cache.dtype, ak_cache.device
    if (bk_cache.shape != (nb, bs, r_k, d_h) or av_cache.shape != (nb, bs, h, r_v)
            or bv_cache.shape != (nb, bs, r_v, d_h) or bk_cache.dtype != dt
            or av_cache.dtype != dt or bv_cache.dtype != dt or bk_cache.device != dev
            or av_cache.device != dev or bv_cache.device != dev):
        _bad_caches(caches)
    return nb, bs, h, d_h, r_k, r_v


def const_a_caches(bk_cache: torch.Tensor, bv_cache: torch.Tensor,
                   q: torch.Tensor | None = None) -> tuple[int, int, int, int, int, int]:
    """The two caches of a constant-A layer (reference.py: ak_cache = av_cache = None;
    B_K and B_V hold the n_kv kv heads). Returns (num_blocks, block_size, h, d_h, n_kv,
    n_kv) like factor_caches, with h = q's query heads (a multiple of n_kv; n_kv without q)."""
    if bk_cache.dtype == FP8:
        raise KernelInputError("constant-A caches (MHA / GQA / MQA) cannot be fp8: the fp8 "
                               "cache keeps its scales in the A factors, which they lack")
    for name, t in (("bk_cache", bk_cache), ("bv_cache", bv_cache)):
        if t.dim() != 4 or not t.is_contiguous() or t.dtype not in FLOAT_DTYPES:
            require(t.dim() == 4, f"{name} must be 4-D (num_blocks, block_size, n_kv, d_h), "
                                  f"got shape {tuple(t.shape)}")
            require(t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()}")
            require(False, f"{name} dtype must be fp16/bf16/fp32, got {t.dtype}")
    if (bv_cache.shape != bk_cache.shape or bv_cache.dtype != bk_cache.dtype
            or bv_cache.device != bk_cache.device):
        raise KernelInputError(
            f"bv_cache {tuple(bv_cache.shape)} {bv_cache.dtype} on {bv_cache.device} must "
            f"match bk_cache {tuple(bk_cache.shape)} {bk_cache.dtype} on {bk_cache.device} "
            f"(constant A: both hold the kv heads)")
    nb, bs, n_kv, d_h = bk_cache.shape
    h = n_kv
    if q is not None:
        h = q.shape[1] if q.dim() == 3 else -1
        if h < 1 or h % n_kv:
            raise KernelInputError(f"constant A: q must be (T, h, d_h) with h a multiple of "
                                   f"the {n_kv} kv heads, got shape {tuple(q.shape)}")
    return nb, bs, h, d_h, n_kv, n_kv


def caches(q: torch.Tensor, ak_cache: torch.Tensor | None, bk_cache: torch.Tensor,
           av_cache: torch.Tensor | None,
           bv_cache: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """factor_caches, or const_a_caches when ak_cache is None (then av_cache must be too)."""
    if ak_cache is None or av_cache is None:
        if ak_cache is not None or av_cache is not None:
            raise KernelInputError("ak_cache and av_cache must both be None (constant A) or "
                                   "both be tensors")
        return const_a_caches(bk_cache, bv_cache, q)
    return factor_caches(ak_cache, bk_cache, av_cache, bv_cache)


def _bad_caches(caches) -> None:
    names = ("ak_cache", "bk_cache", "av_cache", "bv_cache")
    for name, t in zip(names, caches):
        require(t.dim() == 4, f"{name} must be 4-D (num_blocks, block_size, ., .), "
                              f"got shape {tuple(t.shape)}")
        require(t.is_contiguous(), f"{name} must be contiguous, got strides {t.stride()}")
        require(t.dtype in CACHE_DTYPES, f"{name} dtype must be fp16/bf16/fp32/fp8 e4m3, "
                                         f"got {t.dtype}")
    ak, bk, av, bv = caches
    nb, bs, h, r_k = ak.shape
    r_v, d_h = av.shape[3], bk.shape[3]
    require(tuple(bk.shape) == (nb, bs, r_k, d_h),
            f"bk_cache shape {tuple(bk.shape)} does not match ak_cache {tuple(ak.shape)}: "
            f"expected (num_blocks, block_size, R_K, d_h) = ({nb}, {bs}, {r_k}, d_h)")
    require(tuple(av.shape[:3]) == (nb, bs, h),
            f"av_cache shape {tuple(av.shape)} does not match ak_cache {tuple(ak.shape)} "
            f"in (num_blocks, block_size, h)")
    require(tuple(bv.shape) == (nb, bs, r_v, d_h),
            f"bv_cache shape {tuple(bv.shape)}: expected (num_blocks, block_size, R_V, d_h) "
            f"= ({nb}, {bs}, {r_v}, {d_h})")
    for name, t in zip(names[1:], caches[1:]):
        require(t.dtype == ak.dtype, f"{name} dtype {t.dtype} differs from ak_cache dtype "
                                     f"{ak.dtype}")
        require(t.device == ak.device, f"{name} is on {t.device}, ak_cache on {ak.device}")
    raise AssertionError("unreachable: caches were rejected without a reason")


def _int_tensor(name: str, t: torch.Tensor, dims: int, dtype: torch.dtype,
                device: torch.device) -> None:
    require(t.dim() == dims, f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    require(t.dtype == dtype, f"{name} dtype must be {dtype}, got {t.dtype}")
    require(t.device == device, f"{name} is on {t.device}, the caches on {device}")
    require(t.stride(-1) == 1, f"{name} must be contiguous in its last dim, "
                               f"got strides {t.stride()}")


def step_metadata(q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  query_start_loc: torch.Tensor, h: int, d_h: int, dtype: torch.dtype,
                  device: torch.device) -> int:
    """Check q and the step metadata against the caches (dtype: the caches'; q must have
    it, or any of FLOAT_DTYPES over fp8 caches); returns the batch size B."""
    i32 = torch.int32
    if dtype == FP8 and q.dtype in FLOAT_DTYPES:
        dtype = q.dtype
    b = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    if (q.dim() != 3 or q.shape[1] != h or q.shape[2] != d_h or q.dtype != dtype
            or q.stride(2) != 1 or q.device != device
            or block_tables.dim() != 2 or block_tables.dtype != i32
            or block_tables.stride(1) != 1 or block_tables.device != device
            or seq_lens.dtype != i32 or seq_lens.stride(0) != 1 or seq_lens.device != device
            or query_start_loc.dim() != 1 or query_start_loc.dtype != i32
            or query_start_loc.stride(0) != 1 or query_start_loc.device != device
            or block_tables.shape[0] != b or query_start_loc.shape[0] != b + 1):
        require(q.dim() == 3 and q.shape[1] == h and q.shape[2] == d_h,
                f"q must be (T, h={h}, d_h={d_h}), got shape {tuple(q.shape)}")
        require(q.dtype == dtype, f"q dtype {q.dtype} differs from the caches' {dtype}")
        require(q.device == device, f"q is on {q.device}, the caches on {device}")
        require(q.stride(2) == 1, f"q must be contiguous in d_h, got strides {q.stride()}")
        _int_tensor("block_tables", block_tables, 2, i32, device)
        _int_tensor("seq_lens", seq_lens, 1, i32, device)
        _int_tensor("query_start_loc", query_start_loc, 1, i32, device)
        raise KernelInputError(
            f"batch sizes disagree: seq_lens has {b}, block_tables {block_tables.shape[0]} "
            f"rows, query_start_loc {query_start_loc.shape[0]} entries (expected B+1)")
    return b


def output(out: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    if (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
            or out.stride(2) != 1):
        raise KernelInputError(
            f"out must match q and be contiguous in d_h: got {tuple(out.shape)} {out.dtype} "
            f"strides {out.stride()} on {out.device}, q is {tuple(q.shape)} {q.dtype} on "
            f"{q.device}")
    return out


def latent_cache(cache: torch.Tensor, kv_lora: int) -> tuple[int, int, int]:
    """MLA's per-layer cache (num_blocks, block_size, kv_lora + rope), contiguous (the
    kernels index a row as slot * (kv_lora + rope)). Returns (num_blocks, block_size, row)."""
    if cache.dim() != 3 or not cache.is_contiguous() or cache.dtype not in FLOAT_DTYPES:
        raise KernelInputError(
            f"latent_cache must be contiguous fp16/bf16/fp32 (num_blocks, block_size, "
            f"kv_lora + rope), got shape {tuple(cache.shape)} strides {cache.stride()} "
            f"{cache.dtype}")
    nb, bs, row = cache.shape
    if not isinstance(kv_lora, int) or not 0 < kv_lora < row:
        raise KernelInputError(f"kv_lora must be an int in 1..{row - 1} (the cache row holds "
                               f"kv_lora + rope = {row} numbers), got {kv_lora!r}")
    return nb, bs, row
