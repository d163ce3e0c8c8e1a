"""kernels/fused.py against reference.py: query formation (TPA and KVonly), silu(a) * b,
residual add + RMSNorm. Inputs are column views of a wider "fused GEMM output" (token
stride larger than the row), outputs are poisoned with NaN first so every element must be
written. Sizes are awkward on purpose (h = 47, R_Q = 6, d_h = 48 whose half is not a
power of two, n = 2730).

Tolerances: fp32 1e-5 (only summation order and fused multiply-adds differ); fp16 2e-3:
a fused multiply-add in RoPE may round the rotated B_Q one ulp differently before the
fp32 product. The CPU runs use the Triton interpreter in fp32/fp16; the gpu-marked tests
run bf16 at T6-medium sizes.
"""
import pytest
import torch
import torch.nn.functional as F

import tpaserve.kernels.reference as ref
from tpaserve.kernels import _validate
from tpaserve.kernels.fused import add_rms_norm_, form_queries, rope_queries, silu_mul

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _views(T, widths, dtype, seed, device=DEV, scale=1.0):
    """Column views of one (T, sum(widths) + 3) tensor, like FusedLinear's outputs."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(T, sum(widths) + 3, generator=g) * scale).to(dtype).to(device)
    out, off = [], 1
    for w in widths:
        out.append(y[:, off:off + w])
        off += w
    return out


def _angles(T, half, seed, device=DEV):
    theta = torch.rand(T, half, generator=torch.Generator().manual_seed(seed)) * 100
    return theta.cos().to(device), theta.sin().to(device)


def _poison(shape, dtype, device=DEV):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _check_queries(T, h, r, d_h, dtype, seed=0):
    a, b = _views(T, [h * r, r * d_h], dtype, seed)
    aq, bq = a.view(T, h, r), b.view(T, r, d_h)
    cos, sin = _angles(T, d_h // 2, seed)
    got = form_queries(aq, bq, cos, sin, out=_poison((T, h, d_h), dtype))
    torch.testing.assert_close(got, ref.query_ref(aq, bq, cos, sin), **TOL[dtype])


def _check_rope(T, h, d_h, dtype, seed=0):
    (x,) = _views(T, [h * d_h], dtype, seed)
    xq = x.view(T, h, d_h)
    cos, sin = _angles(T, d_h // 2, seed)
    got = rope_queries(xq, cos, sin, out=_poison((T, h, d_h), dtype))
    torch.testing.assert_close(got, ref.rope_ref(xq, cos, sin), **TOL[dtype])


def _check_silu(T, n, dtype, seed=0):
    a, b = _views(T, [n, n], dtype, seed, scale=3.0)
    got = silu_mul(a, b, out=_poison((T, n), dtype))
    torch.testing.assert_close(got, ref.silu_mul_ref(a, b), **TOL[dtype])


def _check_add_norm(T, d, dtype, seed=0, scale=0.02):
    x0, y = _views(T, [d, d], dtype, seed, scale=scale)
    x = x0.clone()                          # the residual stream is a whole tensor
    x_ref = x.clone()
    want = ref.add_rms_norm_ref(x_ref, y)
    got = add_rms_norm_(x, y, out=_poison((T, d), dtype))
    torch.testing.assert_close(x, x_ref, atol=0, rtol=0)  # one rounding of x + y either way
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,h,r,d_h", [(5, 47, 6, 64), (3, 5, 1, 16), (4, 3, 3, 48)])
def test_form_queries_matches_reference(T, h, r, d_h, dtype):
    _check_queries(T, h, r, d_h, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,h,d_h", [(5, 29, 64), (2, 3, 48)])
def test_rope_queries_matches_reference(T, h, d_h, dtype):
    _check_rope(T, h, d_h, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,n", [(3, 2730), (1, 7)])
def test_silu_mul_matches_reference(T, n, dtype):
    _check_silu(T, n, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,d", [(4, 1024), (3, 24), (2, 1600)])
def test_add_rms_norm_matches_reference(T, d, dtype):
    _check_add_norm(T, d, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_add_rms_norm_reference_is_the_models_norm(dtype):
    """The reference's eps is F.rms_norm's default, which is fp32's machine eps for half
    inputs (bf16's own eps, 7.8e-3, would rescale small activations visibly)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 40, generator=g) * 1e-3).to(dtype)
    y = (torch.randn(6, 40, generator=g) * 1e-3).to(dtype)
    want = F.rms_norm(x + y, (40,))
    got = ref.add_rms_norm_ref(x, y)
    tol = dict(atol=0, rtol=0) if dtype == torch.float64 else TOL[dtype]
    torch.testing.assert_close(got, want, **tol)


def test_empty_batch_launches_nothing():
    cos, sin = _angles(0, 8, 0)
    q = form_queries(torch.empty(0, 3, 2, device=DEV), torch.empty(0, 2, 16, device=DEV),
                     cos, sin)
    assert q.shape == (0, 3, 16)
    assert silu_mul(torch.empty(0, 5, device=DEV), torch.empty(0, 5, device=DEV)).shape == (0, 5)


def test_launchers_reject_bad_inputs():
    T, h, r, d_h = 2, 3, 2, 8
    cos, sin = _angles(T, d_h // 2, 0)
    aq, bq = torch.zeros(T, h, r), torch.zeros(T, r, d_h)
    with pytest.raises(_validate.KernelInputError, match="form_queries"):
        form_queries(aq, torch.zeros(T, r + 1, d_h), cos, sin)          # rank mismatch
    with pytest.raises(_validate.KernelInputError, match="strides"):
        form_queries(aq, torch.zeros(T, d_h, r).transpose(1, 2), cos, sin)
    with pytest.raises(_validate.KernelInputError, match="cos"):
        form_queries(aq, bq, cos.double(), sin)
    with pytest.raises(_validate.KernelInputError, match="rope_queries"):
        rope_queries(torch.zeros(T, h, 7), cos, sin)                     # odd d_h
    with pytest.raises(_validate.KernelInputError, match="silu_mul"):
        silu_mul(torch.zeros(T, 4), torch.zeros(T, 4).half())
    with pytest.raises(_validate.KernelInputError, match="add_rms_norm_"):
        add_rms_norm_(torch.zeros(T, 4), torch.zeros(T, 5))
    with pytest.raises(_validate.KernelInputError, match="add_rms_norm_"):
        add_rms_norm_(torch.zeros(4, T).t(), torch.zeros(T, 4))          # strided along d
    with pytest.raises(_validate.KernelInputError, match="out must"):
        add_rms_norm_(torch.zeros(T, 4), torch.zeros(T, 4), out=torch.zeros(T, 5))


# ------------------------------------------------------------------ GPU, bf16, real sizes

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_rank", [6, None])
def test_gpu_queries_t6_medium(T, dtype, q_rank):
    if q_rank is None:
        _check_rope(T, 29, 64, dtype, seed=T)
    else:
        _check_queries(T, 47, q_rank, 64, dtype, seed=T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [1, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_silu_and_add_norm_t6_medium(T, dtype):
    _check_silu(T, 2730, dtype, seed=T)
    _check_add_norm(T, 1024, dtype, seed=T)
    _check_add_norm(T, 1024, dtype, seed=T + 1, scale=1e-3)   # eps matters at this scale
