"""Fused store kernel vs reference.store_factors_ref: all four factors land in their slots,
B_K rotated, padding slots (-1) skipped, every other slot untouched."""
import pytest
import torch

import tpaserve.kernels.reference as ref
from tpaserve.kernels import _validate
from tpaserve.kernels.store import store_factors

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _run(T, h, d_h, r_k, r_v, bs, num_blocks, dtype, pad_every=3, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)

    def rnd(*s, dt=dtype):
        return torch.randn(*s, generator=g).to(dt).to(device)

    slots = torch.randperm(num_blocks * bs, generator=g)[:T]
    slots[::pad_every] = -1
    slots = slots.to(device)
    ak, bk, av, bv = rnd(T, h, r_k), rnd(T, r_k, d_h), rnd(T, h, r_v), rnd(T, r_v, d_h)
    theta = torch.rand(T, d_h // 2, generator=g) * 100
    cos, sin = theta.cos().to(device), theta.sin().to(device)
    caches = [rnd(num_blocks, bs, h, r_k), rnd(num_blocks, bs, r_k, d_h),
              rnd(num_blocks, bs, h, r_v), rnd(num_blocks, bs, r_v, d_h)]
    want = [c.clone() for c in caches]
    ref.store_factors_ref(ak, bk, av, bv, cos, sin, slots, *want)
    store_factors(ak, bk, av, bv, cos, sin, slots, *caches)
    return caches, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,h,d_h,r_k,r_v,bs", [
    (9, 47, 64, 2, 2, 16),
    (7, 5, 16, 6, 1, 1),
    (5, 47, 48, 1, 6, 8),
])
def test_store_matches_reference(T, h, d_h, r_k, r_v, bs, dtype):
    caches, want = _run(T, h, d_h, r_k, r_v, bs, num_blocks=-(-T // bs) + 2, dtype=dtype)
    for name, got, exp in zip(("ak", "bk", "av", "bv"), caches, want):
        # B_K goes through fp32 RoPE; a fused multiply-add may round one ulp differently
        tol = dict(atol=2e-3, rtol=2e-3) if name == "bk" else dict(atol=0, rtol=0)
        torch.testing.assert_close(got, exp, **tol, msg=f"{name} cache differs")


def test_store_rejects_bad_inputs():
    h, d_h, r = 5, 16, 2
    caches = [torch.zeros(2, 4, h, r), torch.zeros(2, 4, r, d_h), torch.zeros(2, 4, h, r),
              torch.zeros(2, 4, r, d_h)]
    T = 3
    args = [torch.zeros(T, h, r), torch.zeros(T, r, d_h), torch.zeros(T, h, r),
            torch.zeros(T, r, d_h), torch.zeros(T, d_h // 2), torch.zeros(T, d_h // 2)]
    with pytest.raises(_validate.KernelInputError, match="slot_mapping"):
        store_factors(*args, torch.zeros(T, dtype=torch.int32), *caches)
    bad = list(args)
    bad[1] = torch.zeros(T, d_h, r).transpose(1, 2)       # non-contiguous within a token
    with pytest.raises(_validate.KernelInputError, match="bk must be contiguous"):
        store_factors(*bad, torch.zeros(T, dtype=torch.int64), *caches)
    with pytest.raises(_validate.KernelInputError, match="bk_cache shape"):
        store_factors(*args, torch.zeros(T, dtype=torch.int64), caches[0],
                      torch.zeros(2, 5, r, d_h), *caches[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_store_real_size_bf16():
    caches, want = _run(4096, 47, 64, 2, 2, 16, num_blocks=300, dtype=torch.bfloat16,
                        pad_every=17)
    for name, got, exp in zip(("ak", "bk", "av", "bv"), caches, want):
        tol = dict(atol=1e-2, rtol=1e-2) if name == "bk" else dict(atol=0, rtol=0)
        torch.testing.assert_close(got, exp, **tol, msg=f"{name} cache differs")
