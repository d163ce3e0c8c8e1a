"""fp8 (e4m3) factor caches: the store's quantisation (a per-(token, rank) power of two
folded into A and B, then e4m3 rounding) against reference.quantize_factors_fp8, and decode
/ prefill reading fp8 caches against reference.paged_attention_ref on the same caches.

The store is compared bit for bit where the interpreter computes like the GPU (fp32 and
fp16 inputs); with bf16 inputs the interpreter rounds fp32 -> bf16 differently from torch
(the RoPE'd B_K is rounded to the input dtype first), so there one e4m3 step is allowed on
a few elements and the GPU test checks bf16 exactly. Prefill under the interpreter runs
fp32 / fp16 queries only (its bf16 products are wrong there; test_prefill.py does the same).
"""
import pytest
import torch
import triton
import triton.language as tl

import tpaserve.kernels.reference as ref
from tests.kernels.paged_case import TOL, make_case, rel_err
from tpaserve.kernels import _validate
from tpaserve.kernels.decode import decode_attention
from tpaserve.kernels.ops import paged_attention
from tpaserve.kernels.prefill import prefill_attention
from tpaserve.kernels.store import _round_e4m3, store_factors

DEV = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, _round_e4m3(tl.load(x_ptr + i)).to(y_ptr.dtype.element_ty))


def test_round_e4m3_matches_torch_on_ties_subnormals_and_saturation():
    grid = ref.quantize_fp8(torch.linspace(-448, 448, 2001)).float().unique()   # e4m3 values
    every = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    every = every[every.isfinite()]
    mids = (every.sort().values[1:] + every.sort().values[:-1]) / 2              # exact ties
    x = torch.cat([every, mids, mids * (1 + 2**-20), mids * (1 - 2**-20), grid,
                   torch.tensor([460., 464., 470., 1e4, -1e9, 2**-10, 3 * 2**-11, 1e-30, 0.])])
    n = triton.next_power_of_2(x.numel())
    x = torch.cat([x, torch.zeros(n - x.numel())]).to(DEV)
    y = torch.empty(n, dtype=FP8, device=DEV)
    _round_kernel[(1,)](x, y, N=n)
    torch.testing.assert_close(y.float(), ref.quantize_fp8(x).float(), atol=0, rtol=0)


def test_rank_exponents_balance_the_pair_and_keep_the_product():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 47, 2, generator=g) * torch.logspace(-3, 3, 64)[:, None, None]
    b = torch.randn(64, 2, 64, generator=g) * torch.logspace(2, -2, 64)[:, None, None]
    a[3, :, 1] = 0                                   # a zero rank: exponent 0, no NaN
    a8, b8 = ref.quantize_factors_fp8(a, b)
    ma, mb = a8.float().abs().amax(1), b8.float().abs().amax(2)         # (T, R)
    ratio = (ma / mb)[ma > 0]
    assert ((ratio >= 0.25) & (ratio <= 4)).all()
    k, k8 = torch.einsum("thr,trd->thd", a, b), torch.einsum("thr,trd->thd", a8.float(), b8.float())
    err = ((k8 - k).norm(dim=(1, 2)) / k.norm(dim=(1, 2)))               # per token
    assert err.max() < 0.06, err.max()               # e4m3: <= 2^-4 per element, two factors


def _store_case(T, h, d_h, r_k, r_v, bs, num_blocks, dtype, seed=0, scale_a=1.0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=g).to(dtype).to(DEV)

    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[::3] = -1
    ak, bk, av, bv = rnd(T, h, r_k), rnd(T, r_k, d_h), rnd(T, h, r_v), rnd(T, r_v, d_h)
    ak = ak * scale_a
    ak[0, :, 0] = 0                                   # a zero rank
    bv[-1] = bv[-1] * 1e-3                            # a tiny token
    theta = torch.rand(T, d_h // 2, generator=g) * 100
    cos, sin = theta.cos().to(DEV), theta.sin().to(DEV)
    caches = [ref.quantize_fp8(torch.randn(num_blocks, bs, *s, generator=g)).to(DEV)
              for s in ((h, r_k), (r_k, d_h), (h, r_v), (r_v, d_h))]
    want = [c.clone() for c in caches]
    ref.store_factors_ref(ak, bk, av, bv, cos, sin, slots.to(DEV), *want)
    store_factors(ak, bk, av, bv, cos, sin, slots.to(DEV), *caches)
    return caches, want


def _assert_fp8_equal(caches, want, dtype):
    for name, got, exp in zip(("ak", "bk", "av", "bv"), caches, want):
        got, exp = got.float(), exp.float()
        if dtype == torch.bfloat16 and name == "bk" and not torch.cuda.is_available():
            step = exp.abs().clamp_min(2**-6) * 2**-3           # one e4m3 step
            bad = (got - exp).abs() > step
            assert not bad.any() and (got != exp).float().mean() < 0.02, name
        else:
            torch.testing.assert_close(got, exp, atol=0, rtol=0, msg=f"{name} cache differs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,h,d_h,r_k,r_v,bs", [
    (9, 47, 64, 2, 2, 16),
    (7, 5, 16, 6, 1, 1),
    (5, 47, 80, 1, 6, 8),
])
def test_store_fp8_matches_reference(T, h, d_h, r_k, r_v, bs, dtype):
    caches, want = _store_case(T, h, d_h, r_k, r_v, bs, -(-T // bs) + 2, dtype)
    _assert_fp8_equal(caches, want, dtype)


@pytest.mark.parametrize("scale_a", [1e-4, 1e4])
def test_store_fp8_extreme_factor_magnitudes(scale_a):
    # A 1e4x larger / smaller than B: the per-rank power of two moves the scale across
    caches, want = _store_case(6, 47, 64, 2, 2, 16, 3, torch.float32, seed=1, scale_a=scale_a)
    _assert_fp8_equal(caches, want, torch.float32)
    assert all(c.float().isfinite().all() for c in caches)


def fp8_case(c, q_dtype):
    """A make_case (fp32) with its caches quantised as the store would and q in q_dtype."""
    def pair(a, b):
        a8, b8 = ref.quantize_factors_fp8(a.flatten(0, 1).cpu(), b.flatten(0, 1).cpu())
        return a8.view(a.shape).to(a.device), b8.view(b.shape).to(b.device)
    c.ak, c.bk = pair(c.ak, c.bk)
    c.av, c.bv = pair(c.av, c.bv)
    c.q = c.q.to(q_dtype)
    return c


DECODE = [  # (lens, h, d_h, R_K, R_V, block_size)
    ([1, 15, 16, 17, 50], 47, 64, 2, 2, 16),
    ([1, 7, 8, 9, 33], 5, 16, 1, 6, 8),
    ([3, 20], 47, 80, 6, 1, 1),
    ([16, 31], 47, 80, 2, 2, 16),
]


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("lens,h,d_h,r_k,r_v,bs", DECODE)
def test_decode_fp8_matches_reference(lens, h, d_h, r_k, r_v, bs, splits, q_dtype):
    c = fp8_case(make_case(lens, [1] * len(lens), h, d_h, r_k, r_v, bs, torch.float32, DEV,
                           seed=len(lens) + h), q_dtype)
    out = torch.full_like(c.q, float("nan"))
    out = decode_attention(c.q, *c.caches(), *c.metadata(), c.max_seq_len, num_splits=splits,
                           out=out)
    # the kernel's products are fp16 (q rounded to fp16, p * A_V too): fp16's tolerance
    err = rel_err(out, c.reference())
    assert err < max(TOL[q_dtype], TOL[torch.float16]), f"relative error {err:.2e}"


PREFILL = [  # (lens, n_queries, h, d_h, R_K, R_V, block_size)
    ([5, 40, 17], [5, 20, 1], 5, 16, 1, 6, 8),
    ([33, 18], [33, 2], 47, 64, 2, 2, 16),
    ([21], [21], 6, 80, 2, 2, 1),
]


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lens,nq,h,d_h,r_k,r_v,bs", PREFILL)
def test_prefill_and_mixed_fp8_match_reference(lens, nq, h, d_h, r_k, r_v, bs, q_dtype):
    c = fp8_case(make_case(lens, nq, h, d_h, r_k, r_v, bs, torch.float32, DEV,
                           seed=sum(lens)), q_dtype)
    want = c.reference()
    out = prefill_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len)
    assert rel_err(out, want) < TOL[q_dtype]
    # a mixed step: decode rows through the decode kernel, chunks through prefill
    out = paged_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len, c.max_seq_len)
    assert rel_err(out, want) < max(TOL[q_dtype], TOL[torch.float16])


def test_constant_a_refuses_fp8():
    c = make_case([9], [1], 4, 16, 2, 2, 8, torch.float32, DEV, const_a=True)
    bk, bv = c.bk.to(FP8), c.bv.to(FP8)
    with pytest.raises(_validate.KernelInputError, match="constant-A caches"):
        decode_attention(c.q, None, bk, None, bv, *c.metadata(), c.max_seq_len)
    with pytest.raises(ValueError, match="constant A"):
        z = torch.zeros(1, 2, 16)
        ref.store_factors_ref(None, z, None, z, torch.ones(1, 8), torch.zeros(1, 8),
                              torch.zeros(1, dtype=torch.int64), None, bk.cpu(), None, bv.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_fp8_real_size_bf16_bit_exact():
    caches, want = _store_case(4096, 47, 64, 2, 2, 16, 300, torch.bfloat16)
    _assert_fp8_equal(caches, want, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lens", [[4096] * 8, [1, 300, 5000, 33000]])
def test_decode_fp8_real_size(lens):
    c = fp8_case(make_case(lens, [1] * len(lens), 47, 64, 2, 2, 16, torch.float32, "cuda",
                           seed=7), torch.bfloat16)
    err = rel_err(decode_attention(c.q, *c.caches(), *c.metadata(), c.max_seq_len),
                  c.reference())
    assert err < TOL[torch.bfloat16], f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefill_fp8_real_size():
    c = fp8_case(make_case([2048 + 700, 512], [2048, 512], 47, 64, 2, 2, 16, torch.float32,
                           "cuda", seed=8), torch.bfloat16)
    out = paged_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len, c.max_seq_len)
    assert rel_err(out, c.reference()) < TOL[torch.bfloat16]
