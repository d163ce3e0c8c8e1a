"""Fused factor store: one launch writes a step's A_K, B_K, A_V, B_V into their cache slots
and rotates B_K on the way (T6 RoPE, half-split, rotation by -theta):
    B_K[slot] = (x1 cos + x2 sin, -x1 sin + x2 cos)  with x1, x2 the two halves of bk[t]
Reference: reference.store_factors_ref. One program per token; slot -1 (padding) is skipped.
Constant A (MHA / GQA / MQA: ak_cache = av_cache = None): CONST_A writes B_K and B_V only.

fp8 caches (FP8): per token and rank s the pair (A_K[:, s], RoPE'd B_K[s]) is balanced by
a power of two, A' = A 2^e_s, B' = B 2^-e_s (e_s from the two maxima's binary exponents,
reference.fp8_rank_exponents), and both rounded to e4m3; A_V, B_V likewise. The scale thus
lives in the factors and nothing else is stored (docs/kernel_notes.md, "fp8 factor cache").
The kernel rounds to e4m3 itself (_round_e4m3) so that the cast is exact: Triton's own
conversion rounds ties differently under the interpreter and wraps there past 448.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v


@triton.jit
def _round_e4m3(x):
    """fp32 -> the nearest e4m3 value (ties to even), saturated at +-448, still fp32: the
    cast to fp8 is then exact on every backend. Normal range: add the round-to-even bias
    to the bits and clear the 20 mantissa bits e4m3 lacks; below 2^-6 (subnormals, spacing
    2^-9): fp32 addition of 2^14 rounds to even at exactly that spacing."""
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    rn = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000).to(tl.float32, bitcast=True)
    sub = (ax + 16384.0) - 16384.0
    r = tl.minimum(tl.where(ax < 0.015625, sub, rn), 448.0)
    return tl.where(x < 0, -r, r)


@triton.jit
def _rank_exponent(ma, mb):
    """(R,) maxima of |A_s| and |B_s| -> (R,) int32 e_s = floor((x(mb) - x(ma)) / 2), x()
    the binary exponent; 0 where either is 0 (reference.fp8_rank_exponents)."""
    ea = (ma.to(tl.int32, bitcast=True) >> 23) & 0xFF
    eb = (mb.to(tl.int32, bitcast=True) >> 23) & 0xFF
    e = tl.where((ma == 0) | (mb == 0), 0, (eb - ea) >> 1)
    return tl.minimum(tl.maximum(e, -126), 126)


@triton.jit
def _pow2(e):
    """int32 e in [-126, 127] -> 2^e, exactly."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _store_a_fp8(a_ptr, ac_ptr, t, stride, slot, e, H: tl.constexpr, R: tl.constexpr,
                 H_PAD: tl.constexpr, R_PAD: tl.constexpr):
    """A (H, R) of token t, times 2^e per rank, rounded to e4m3, into its slot."""
    hh = tl.arange(0, H_PAD)[:, None]
    rr = tl.arange(0, R_PAD)[None, :]
    m = (hh < H) & (rr < R)
    a = tl.load(a_ptr + t * stride + hh * R + rr, mask=m, other=0.0).to(tl.float32)
    a8 = _round_e4m3(a * _pow2(e)[None, :])
    tl.store(ac_ptr + slot * (H * R) + hh * R + rr, a8.to(ac_ptr.dtype.element_ty), mask=m)


@triton.jit
def _max_abs_a(a_ptr, t, stride, H: tl.constexpr, R: tl.constexpr, H_PAD: tl.constexpr,
               R_PAD: tl.constexpr):
    """(R_PAD,) max over heads of |A[:, s]| for token t (0 for padded ranks)."""
    hh = tl.arange(0, H_PAD)[:, None]
    rr = tl.arange(0, R_PAD)[None, :]
    a = tl.load(a_ptr + t * stride + hh * R + rr, mask=(hh < H) & (rr < R), other=0.0)
    return tl.max(tl.abs(a.to(tl.float32)), axis=0)


@triton.jit
def _store_fp8(ak_ptr, bk_ptr, av_ptr, bv_ptr, akc_ptr, bkc_ptr, avc_ptr, bvc_ptr, t, slot,
               y1, y2, stride_ak, stride_av, stride_bv,
               H: tl.constexpr, D: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
               H_PAD: tl.constexpr, RK_PAD: tl.constexpr, RV_PAD: tl.constexpr,
               HALF_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """fp8 store of one token: y1, y2 (RK_PAD, HALF_PAD) fp32 are the two halves of the
    rotated B_K (rounded to the input dtype, 0 where padded)."""
    HALF: tl.constexpr = D // 2
    # K pair: A_K and the rotated B_K
    mb = tl.maximum(tl.max(tl.abs(y1), axis=1), tl.max(tl.abs(y2), axis=1))   # (RK_PAD,)
    e = _rank_exponent(_max_abs_a(ak_ptr, t, stride_ak, H, R_K, H_PAD, RK_PAD), mb)
    _store_a_fp8(ak_ptr, akc_ptr, t, stride_ak, slot, e, H, R_K, H_PAD, RK_PAD)
    inv = _pow2(-e)[:, None]
    r = tl.arange(0, RK_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    m = (r < R_K) & (j < HALF)
    dst = bkc_ptr + slot * (R_K * D) + r * D + j
    tl.store(dst, _round_e4m3(y1 * inv).to(bkc_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF, _round_e4m3(y2 * inv).to(bkc_ptr.dtype.element_ty), mask=m)
    # V pair: A_V and B_V (R_V, D)
    u = tl.arange(0, RV_PAD)[:, None]
    d = tl.arange(0, D_PAD)[None, :]
    m = (u < R_V) & (d < D)
    bv = tl.load(bv_ptr + t * stride_bv + u * D + d, mask=m, other=0.0).to(tl.float32)
    e = _rank_exponent(_max_abs_a(av_ptr, t, stride_av, H, R_V, H_PAD, RV_PAD),
                       tl.max(tl.abs(bv), axis=1))
    _store_a_fp8(av_ptr, avc_ptr, t, stride_av, slot, e, H, R_V, H_PAD, RV_PAD)
    tl.store(bvc_ptr + slot * (R_V * D) + u * D + d,
             _round_e4m3(bv * _pow2(-e)[:, None]).to(bvc_ptr.dtype.element_ty), mask=m)


@triton.jit
def _store_kernel(
    ak_ptr, bk_ptr, av_ptr, bv_ptr, cos_ptr, sin_ptr, slot_ptr,
    akc_ptr, bkc_ptr, avc_ptr, bvc_ptr,
    stride_ak, stride_bk, stride_av, stride_bv, stride_cos, stride_sin,   # token strides
    H: tl.constexpr, D: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
    AK_PAD: tl.constexpr, AV_PAD: tl.constexpr, BV_PAD: tl.constexpr,
    RK_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    CONST_A: tl.constexpr,        # no A caches (ak*/av* pointers are unused stand-ins)
    FP8: tl.constexpr,            # e4m3 caches, scales folded into the factors (_store_fp8)
    H_PAD: tl.constexpr, RV_PAD: tl.constexpr, D_PAD: tl.constexpr,   # FP8's 2-D tiles
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    # B_K (R_K, D): rotate the halves (R_K, D/2) in fp32, round like the reference
    # (to bk's dtype, then the cache's).
    HALF: tl.constexpr = D // 2
    r = tl.arange(0, RK_PAD)[:, None]
    j = tl.arange(0, HALF_PAD)[None, :]
    m = (r < R_K) & (j < HALF)
    src = bk_ptr + t * stride_bk + r * D + j
    x1 = tl.load(src, mask=m, other=0.0)
    x2 = tl.load(src + HALF, mask=m, other=0.0)
    c = tl.load(cos_ptr + t * stride_cos + j, mask=j < HALF, other=0.0)
    s = tl.load(sin_ptr + t * stride_sin + j, mask=j < HALF, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    y1 = (x1f * c + x2f * s).to(x1.dtype)
    y2 = (x2f * c - x1f * s).to(x1.dtype)
    if FP8:
        _store_fp8(ak_ptr, bk_ptr, av_ptr, bv_ptr, akc_ptr, bkc_ptr, avc_ptr, bvc_ptr, t,
                   slot, y1.to(tl.float32), y2.to(tl.float32), stride_ak, stride_av,
                   stride_bv, H, D, R_K, R_V, H_PAD, RK_PAD, RV_PAD, HALF_PAD, D_PAD)
        return
    dst = bkc_ptr + slot * (R_K * D) + r * D + j
    tl.store(dst, y1.to(bkc_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF, y2.to(bkc_ptr.dtype.element_ty), mask=m)
    # A_K, A_V, B_V: each token's factor is one contiguous run of numbers in input and cache.
    if not CONST_A:
        i = tl.arange(0, AK_PAD)
        x = tl.load(ak_ptr + t * stride_ak + i, mask=i < H * R_K)
        tl.store(akc_ptr + slot * (H * R_K) + i, x.to(akc_ptr.dtype.element_ty),
                 mask=i < H * R_K)
        i = tl.arange(0, AV_PAD)
        x = tl.load(av_ptr + t * stride_av + i, mask=i < H * R_V)
        tl.store(avc_ptr + slot * (H * R_V) + i, x.to(avc_ptr.dtype.element_ty),
                 mask=i < H * R_V)
    i = tl.arange(0, BV_PAD)
    x = tl.load(bv_ptr + t * stride_bv + i, mask=i < R_V * D)
    tl.store(bvc_ptr + slot * (R_V * D) + i, x.to(bvc_ptr.dtype.element_ty), mask=i < R_V * D)


def _token_major(name: str, x: torch.Tensor, shape: tuple[int, int, int],
                 device: torch.device) -> None:
    v.require(x.dim() == 3 and tuple(x.shape) == shape,
              f"{name} must have shape {shape}, got {tuple(x.shape)}")
    v.require(x.stride(2) == 1 and x.stride(1) == shape[2],
              f"{name} must be contiguous within a token (strides (*, {shape[2]}, 1)), "
              f"got strides {x.stride()}")
    v.require(x.dtype in v.FLOAT_DTYPES, f"{name} dtype must be fp16/bf16/fp32, got {x.dtype}")
    v.require(x.device == device, f"{name} is on {x.device}, the caches on {device}")


def store_factors(ak: torch.Tensor, bk: torch.Tensor, av: torch.Tensor, bv: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                  ak_cache: torch.Tensor, bk_cache: torch.Tensor, av_cache: torch.Tensor,
                  bv_cache: torch.Tensor) -> None:
    """Write the step's factors into their slots; B_K is rotated on the way.

    ak (T, h, R_K), bk (T, R_K, d_h) unrotated, av (T, h, R_V), bv (T, R_V, d_h);
    cos, sin (T, d_h/2) fp32; slot_mapping (T,) int64, -1 = padding (skipped).
    ak_cache = av_cache = None: constant A, only B_K and B_V are stored (ak, av unread).
    """
    const_a = ak_cache is None
    _, _, h, d_h, r_k, r_v = v.caches(None, ak_cache, bk_cache, av_cache, bv_cache)
    fp8 = bk_cache.dtype == v.FP8
    dev = bk_cache.device
    v.require(d_h % 2 == 0, f"d_h must be even for RoPE, got {d_h}")
    v.require(slot_mapping.dim() == 1 and slot_mapping.dtype == torch.int64
              and slot_mapping.device == dev,
              f"slot_mapping must be 1-D int64 on {dev}, got {tuple(slot_mapping.shape)} "
              f"{slot_mapping.dtype} on {slot_mapping.device}")
    t = slot_mapping.shape[0]
    if not const_a:
        _token_major("ak", ak, (t, h, r_k), dev)
        _token_major("av", av, (t, h, r_v), dev)
    _token_major("bk", bk, (t, r_k, d_h), dev)
    _token_major("bv", bv, (t, r_v, d_h), dev)
    for name, x in (("cos", cos), ("sin", sin)):
        v.require(tuple(x.shape) == (t, d_h // 2) and x.dtype == torch.float32
                  and x.stride(1) == 1 and x.device == dev,
                  f"{name} must be ({t}, {d_h // 2}) fp32 contiguous in its last dim on {dev}, "
                  f"got {tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device}")
    if t == 0:
        return
    if const_a:                     # stand-ins for the A arguments the kernel never reads
        ak = av = bk
        ak_cache = av_cache = bk_cache
    _store_kernel[(t,)](
        ak, bk, av, bv, cos, sin, slot_mapping, ak_cache, bk_cache, av_cache, bv_cache,
        ak.stride(0), bk.stride(0), av.stride(0), bv.stride(0), cos.stride(0), sin.stride(0),
        H=h, D=d_h, R_K=r_k, R_V=r_v, AK_PAD=v.next_pow2(h * r_k), AV_PAD=v.next_pow2(h * r_v),
        BV_PAD=v.next_pow2(r_v * d_h), RK_PAD=v.next_pow2(r_k),
        HALF_PAD=v.next_pow2(d_h // 2), CONST_A=const_a, FP8=fp8, H_PAD=v.next_pow2(h),
        RV_PAD=v.next_pow2(r_v), D_PAD=v.next_pow2(d_h), num_warps=1 if v.INTERPRET else 4)
