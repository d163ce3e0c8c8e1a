"""Fused elementwise tails of a T6 layer, so a decode step launches ~10 kernels per layer:

    form_queries(aq, bq, cos, sin)  q = A_Q @ RoPE(B_Q) / R_Q     reference.query_ref
    rope_queries(xq, cos, sin)      q = RoPE(xq)  (T6-KVonly)     reference.rope_ref
    silu_mul(a, b)                  silu(a) * b                   reference.silu_mul_ref
    add_rms_norm_(x, y)             x += y; return rms_norm(x)    reference.add_rms_norm_ref

RoPE is T6's: half-split pairs (i, i + d_h/2), y1 = x1 cos + x2 sin, y2 = x2 cos - x1 sin.
All arithmetic is fp32; inputs and outputs are fp16/bf16/fp32. Inputs may be column views
of a fused GEMM output: only the innermost dims must be contiguous, the token stride is
free. One program per token (per token and column block for silu_mul), so the launch
count does not depend on T; every launcher reads tensor metadata only (no host sync) and
so can be captured in a CUDA graph.

Config: no autotuning (these are a few microseconds each, launch-bound); block sizes are
fixed below, smaller under TRITON_INTERPRET so CPU tests cover several column blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v
from tpaserve.kernels.reference import rms_norm_eps

# silu_mul columns per program: 2730-wide MLP rows (T6-medium) -> 3 programs per token.
SILU_BLOCK = 256 if v.INTERPRET else 1024
NUM_WARPS = 4


@triton.jit
def _query_kernel(a_ptr, b_ptr, cos_ptr, sin_ptr, q_ptr,
                  stride_a, stride_b, stride_cos, stride_sin, stride_q,     # token strides
                  H: tl.constexpr, D: tl.constexpr, R: tl.constexpr,
                  ROTATE_ONLY: tl.constexpr, H_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """ROTATE_ONLY: q[t] = RoPE(b[t]) with b (h, D). Else q[t] = a[t] @ RoPE(b[t]) / R with
    a (h, R), b (R, D); rotated B is rounded to b's dtype first, as rope_ref does."""
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = D // 2
    offs_h = tl.arange(0, H_PAD)
    offs_j = tl.arange(0, HALF_PAD)
    h_ok = offs_h < H
    j_ok = offs_j < HALF
    c = tl.load(cos_ptr + t * stride_cos + offs_j, mask=j_ok, other=0.0)[None, :]
    s = tl.load(sin_ptr + t * stride_sin + offs_j, mask=j_ok, other=0.0)[None, :]
    hj_ok = h_ok[:, None] & j_ok[None, :]
    b_row = b_ptr + t * stride_b
    if ROTATE_ONLY:
        src = b_row + offs_h[:, None] * D + offs_j[None, :]                    # (H_PAD, HALF)
        x1 = tl.load(src, mask=hj_ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=hj_ok, other=0.0).to(tl.float32)
        y1 = x1 * c + x2 * s
        y2 = x2 * c - x1 * s
    else:
        a_row = a_ptr + t * stride_a
        y1 = tl.zeros((H_PAD, HALF_PAD), dtype=tl.float32)
        y2 = tl.zeros((H_PAD, HALF_PAD), dtype=tl.float32)
        for r in tl.static_range(R):            # R_Q is small (6): unrolled rank-1 updates
            a = tl.load(a_row + offs_h * R + r, mask=h_ok, other=0.0).to(tl.float32)
            b1 = tl.load(b_row + r * D + offs_j, mask=j_ok, other=0.0)[None, :]
            b2 = tl.load(b_row + r * D + HALF + offs_j, mask=j_ok, other=0.0)[None, :]
            b1f = b1.to(tl.float32)
            b2f = b2.to(tl.float32)
            rb1 = (b1f * c + b2f * s).to(b1.dtype).to(tl.float32)             # (1, HALF)
            rb2 = (b2f * c - b1f * s).to(b1.dtype).to(tl.float32)
            y1 += a[:, None] * rb1
            y2 += a[:, None] * rb2
        y1 = y1 / R
        y2 = y2 / R
    dst = q_ptr + t * stride_q + offs_h[:, None] * D + offs_j[None, :]
    tl.store(dst, y1.to(q_ptr.dtype.element_ty), mask=hj_ok)
    tl.store(dst + HALF, y2.to(q_ptr.dtype.element_ty), mask=hj_ok)


@triton.jit
def _silu_mul_kernel(a_ptr, b_ptr, out_ptr, stride_a, stride_b, stride_out, N,
                     BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    a = tl.load(a_ptr + t * stride_a + i, mask=m, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + t * stride_b + i, mask=m, other=0.0).to(tl.float32)
    y = a * tl.sigmoid(a) * b
    tl.store(out_ptr + t * stride_out + i, y.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add_rms_norm_kernel(x_ptr, y_ptr, out_ptr, stride_x, stride_y, stride_out, N, eps,
                         BLOCK: tl.constexpr):
    """One row per program: x += y (rounded to x's dtype, written back), out = norm(x)."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK)
    m = i < N
    x = tl.load(x_ptr + t * stride_x + i, mask=m, other=0.0)
    y = tl.load(y_ptr + t * stride_y + i, mask=m, other=0.0)
    s = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
    tl.store(x_ptr + t * stride_x + i, s, mask=m)
    sf = s.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(sf * sf, axis=0) / N + eps)
    tl.store(out_ptr + t * stride_out + i, (sf * inv).to(out_ptr.dtype.element_ty), mask=m)


# ------------------------------------------------------------------------------ launchers

def _bad(what: str, **tensors: torch.Tensor) -> v.KernelInputError:
    shown = ", ".join(f"{n}: {tuple(x.shape)} {x.dtype} strides {x.stride()} on {x.device}"
                      for n, x in tensors.items())
    return v.KernelInputError(f"{what}; got {shown}")


def _angles_ok(cos: torch.Tensor, sin: torch.Tensor, t: int, half: int,
               device: torch.device) -> bool:
    return all(x.dim() == 2 and x.shape[0] == t and x.shape[1] == half
               and x.dtype == torch.float32 and x.stride(1) == 1 and x.device == device
               for x in (cos, sin))


def form_queries(aq: torch.Tensor, bq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """q = A_Q @ RoPE(B_Q) / R_Q (reference.query_ref).

    aq (T, h, R_Q), bq (T, R_Q, d_h) unrotated, each contiguous within a token (any token
    stride, e.g. views of one projection output), same dtype; cos, sin (T, d_h/2) fp32
    -> q (T, h, d_h) contiguous, aq's dtype.
    """
    if not (aq.dim() == 3 and bq.dim() == 3 and aq.shape[0] == bq.shape[0]
            and aq.shape[2] == bq.shape[1] and bq.shape[2] % 2 == 0
            and aq.stride(2) == 1 and aq.stride(1) == aq.shape[2]
            and bq.stride(2) == 1 and bq.stride(1) == bq.shape[2]
            and aq.dtype == bq.dtype and aq.dtype in v.FLOAT_DTYPES and aq.device == bq.device
            and _angles_ok(cos, sin, aq.shape[0], bq.shape[2] // 2, aq.device)):
        raise _bad("form_queries needs aq (T, h, R), bq (T, R, d_h even), each contiguous "
                   "within a token, one float dtype, and fp32 cos/sin (T, d_h/2)",
                   aq=aq, bq=bq, cos=cos, sin=sin)
    T, h, r = aq.shape
    d_h = bq.shape[2]
    q = _query_out(out, (T, h, d_h), aq)
    if T:
        _query_kernel[(T,)](aq, bq, cos, sin, q, aq.stride(0), bq.stride(0), cos.stride(0),
                            sin.stride(0), q.stride(0), H=h, D=d_h, R=r, ROTATE_ONLY=False,
                            H_PAD=v.next_pow2(h), HALF_PAD=v.next_pow2(d_h // 2),
                            num_warps=NUM_WARPS)
    return q


def rope_queries(xq: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """T6-KVonly queries: q = RoPE(xq) (reference.rope_ref). xq (T, h, d_h) contiguous within
    a token; cos, sin (T, d_h/2) fp32 -> q (T, h, d_h) contiguous, xq's dtype."""
    if not (xq.dim() == 3 and xq.shape[2] % 2 == 0 and xq.stride(2) == 1
            and xq.stride(1) == xq.shape[2] and xq.dtype in v.FLOAT_DTYPES
            and _angles_ok(cos, sin, xq.shape[0], xq.shape[2] // 2, xq.device)):
        raise _bad("rope_queries needs xq (T, h, d_h even) contiguous within a token and "
                   "fp32 cos/sin (T, d_h/2)", xq=xq, cos=cos, sin=sin)
    T, h, d_h = xq.shape
    q = _query_out(out, (T, h, d_h), xq)
    if T:
        _query_kernel[(T,)](xq, xq, cos, sin, q, xq.stride(0), xq.stride(0), cos.stride(0),
                            sin.stride(0), q.stride(0), H=h, D=d_h, R=1, ROTATE_ONLY=True,
                            H_PAD=v.next_pow2(h), HALF_PAD=v.next_pow2(d_h // 2),
                            num_warps=NUM_WARPS)
    return q


def _query_out(out: torch.Tensor | None, shape: tuple[int, int, int],
               like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if not (tuple(out.shape) == shape and out.dtype == like.dtype and out.device == like.device
            and out.stride(2) == 1 and out.stride(1) == shape[2]):
        raise _bad(f"out must be {shape} {like.dtype}, contiguous within a token", out=out)
    return out


def _rows(x: torch.Tensor) -> bool:
    """2-D, contiguous along the last dim (rows may be strided), a float dtype."""
    return x.dim() == 2 and x.stride(1) == 1 and x.dtype in v.FLOAT_DTYPES


def silu_mul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(a) * b (reference.silu_mul_ref). a, b (T, n), same dtype and device, contiguous
    along n (e.g. the two halves of one c_fc1|c_fc2 GEMM output) -> (T, n) contiguous."""
    if not (_rows(a) and _rows(b) and a.shape == b.shape and a.dtype == b.dtype
            and a.device == b.device):
        raise _bad("silu_mul needs a, b (T, n) of one float dtype, contiguous along n",
                   a=a, b=b)
    T, n = a.shape
    if out is None:
        out = torch.empty((T, n), dtype=a.dtype, device=a.device)
    elif not (_rows(out) and out.shape == a.shape and out.dtype == a.dtype
              and out.device == a.device):
        raise _bad("out must match a", out=out, a=a)
    if T and n:
        _silu_mul_kernel[(T, triton.cdiv(n, SILU_BLOCK))](
            a, b, out, a.stride(0), b.stride(0), out.stride(0), n, BLOCK=SILU_BLOCK,
            num_warps=NUM_WARPS)
    return out


def add_rms_norm_(x: torch.Tensor, y: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x += y in place, then return rms_norm(x) over the last dim in one pass
    (reference.add_rms_norm_ref): x * rsqrt(mean(x^2) + eps), eps = F.rms_norm's default
    for x's dtype (reference.rms_norm_eps). x, y (T, d), same dtype and device, contiguous
    along d -> (T, d) contiguous."""
    if not (_rows(x) and _rows(y) and x.shape == y.shape and x.dtype == y.dtype
            and x.device == y.device):
        raise _bad("add_rms_norm_ needs x, y (T, d) of one float dtype, contiguous along d",
                   x=x, y=y)
    T, d = x.shape
    if out is None:
        out = torch.empty((T, d), dtype=x.dtype, device=x.device)
    elif not (_rows(out) and out.shape == x.shape and out.dtype == x.dtype
              and out.device == x.device):
        raise _bad("out must match x", out=out, x=x)
    if T and d:
        block = v.next_pow2(d)
        _add_rms_norm_kernel[(T,)](x, y, out, x.stride(0), y.stride(0), out.stride(0), d,
                                   rms_norm_eps(x.dtype), BLOCK=block,
                                   num_warps=NUM_WARPS if block <= 2048 else 8)
    return out
