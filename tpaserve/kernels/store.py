"""Fused factor store: one launch writes a step's A_K, B_K, A_V, B_V into their cache slots
and rotates B_K on the way (T6 RoPE, half-split, rotation by -theta):
    B_K[slot] = (x1 cos + x2 sin, -x1 sin + x2 cos)  with x1, x2 the two halves of bk[t]
Reference: reference.store_factors_ref. One program per token; slot -1 (padding) is skipped.
Constant A (MHA / GQA / MQA: ak_cache = av_cache = None): CONST_A writes B_K and B_V only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v


@triton.jit
def _store_kernel(
    ak_ptr, bk_ptr, av_ptr, bv_ptr, cos_ptr, sin_ptr, slot_ptr,
    akc_ptr, bkc_ptr, avc_ptr, bvc_ptr,
    stride_ak, stride_bk, stride_av, stride_bv, stride_cos, stride_sin,   # token strides
    H: tl.constexpr, D: tl.constexpr, R_K: tl.constexpr, R_V: tl.constexpr,
    AK_PAD: tl.constexpr, AV_PAD: tl.constexpr, BV_PAD: tl.constexpr,
    RK_PAD: tl.constexpr, HALF_PAD: tl.constexpr,
    CONST_A: tl.constexpr,        # no A caches (ak*/av* pointers are unused stand-ins)
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
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
    y1 = (x1f * c + x2f * s).to(x1.dtype).to(bkc_ptr.dtype.element_ty)
    y2 = (x2f * c - x1f * s).to(x1.dtype).to(bkc_ptr.dtype.element_ty)
    dst = bkc_ptr + slot * (R_K * D) + r * D + j
    tl.store(dst, y1, mask=m)
    tl.store(dst + HALF, y2, mask=m)


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
        HALF_PAD=v.next_pow2(d_h // 2), CONST_A=const_a, num_warps=1 if v.INTERPRET else 4)
