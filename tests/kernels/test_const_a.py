"""Constant-A kernels (MHA / GQA / MQA as non-contextual TPA: no A caches, R_K = R_V = the
kv heads, query head j reads kv head j // group) against the torch reference, on awkward
shapes: n_head 6, 20, 47, 48 (not powers of two), groups 1, 3, 4 and n_head, a head block
straddling two groups, lengths around and not multiples of the block size, block sizes 1/8/16,
mixed lengths in one batch, split-K on and off. The reference's constant-A path is itself
checked against the general FlashTPA reference given the one-hot A explicitly."""
import pytest
import torch

import tpaserve.kernels.reference as ref
from tests.kernels.paged_case import TOL, make_case, rel_err
from tpaserve.kernels import _validate
from tpaserve.kernels.decode import (
    DecodeConfig,
    decode_attention,
    kv_heads_per_block,
    programs_per_sequence,
)
from tpaserve.kernels.ops import paged_attention
from tpaserve.kernels.prefill import prefill_attention
from tpaserve.kernels.store import store_factors

DEV = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [  # (h, n_kv, d_h): group = h / n_kv
    (6, 6, 16),         # MHA, group 1
    (6, 2, 16),         # GQA, group 3
    (6, 1, 32),         # MQA, group h
    (20, 5, 16),        # group 4: a 16-head block reads 4 kv heads
    (48, 16, 16),       # group 3, 16 kv heads: blocks straddle groups (16 = 5 x 3 + 1)
    (47, 1, 48),        # MQA, h 47 (three head blocks, the last masked), d_h 48
]


def one_hot_a(case):
    """The general reference's A caches equal to constant A: A[j, g(j)] = R (it divides
    by R), in every slot."""
    nb, bs, r, _ = case.bk.shape
    h = case.q.shape[1]
    a = torch.zeros(h, r)
    a[torch.arange(h), ref.kv_head_of(h, r)] = r
    full = a.expand(nb, bs, h, r).contiguous()
    return full, full.clone()


@pytest.mark.parametrize("h,n_kv,d_h", SHAPES)
def test_reference_constant_a_equals_one_hot_flash_tpa(h, n_kv, d_h):
    c = make_case([1, 9, 30], [1, 4, 30], h, d_h, n_kv, n_kv, 8, seed=h + n_kv, const_a=True)
    ak, av = one_hot_a(c)
    want = ref.paged_attention_ref(c.q, ak, c.bk, av, c.bv, *c.metadata())
    assert rel_err(c.reference(), want) < 1e-5


def test_kv_heads_per_block():
    assert [kv_heads_per_block(h, h // n, 16) for h, n, _ in SHAPES] == [6, 2, 1, 4, 6, 1]
    assert kv_heads_per_block(16, 1, 16) == 16 and kv_heads_per_block(30, 15, 16) == 2


def test_programs_per_sequence():
    blocks, kv = DecodeConfig(16, 16, 4, 1), DecodeConfig(16, 16, 4, 1, kv_grid=True)
    assert [programs_per_sequence(h, h // n, blocks) for h, n, _ in SHAPES] == [1, 1, 1, 2, 3, 3]
    # kv grid: a program per kv head and 16-head part of its group, never more than h
    assert [programs_per_sequence(h, h // n, kv) for h, n, _ in SHAPES] == [6, 2, 1, 5, 16, 3]
    assert programs_per_sequence(30, 15, kv) == 2 and programs_per_sequence(32, 4, kv) == 8


@pytest.mark.parametrize("kv_grid", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("h,n_kv,d_h", SHAPES)
def test_decode_matches_reference(h, n_kv, d_h, bs, splits, kv_grid):
    lens = [1, 15, 16, 17, 50]
    c = make_case(lens, [1] * 5, h, d_h, n_kv, n_kv, bs, torch.float32, DEV, seed=h * bs + n_kv,
                  const_a=True)
    out = torch.full_like(c.q, float("nan"))
    cfg = DecodeConfig(16, 16, 4, 1, min_split=16, kv_grid=kv_grid) if DEV == "cpu" else \
        DecodeConfig(16, 16, 4, 2, kv_grid=kv_grid)
    out = decode_attention(c.q, *c.caches(), *c.metadata(), c.max_seq_len, num_splits=splits,
                           out=out, config=cfg)
    err = rel_err(out, c.reference())
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


def test_decode_half_precision_and_block_table_prefetch():
    c = make_case([3, 33, 64, 100], [1] * 4, 20, 16, 5, 5, 16, torch.float16, DEV, seed=4,
                  const_a=True)
    cfg = DecodeConfig(16, 16, 4, 1, min_split=16, bt_prefetch=4, merge_sb=2)
    for splits in (1, 4):
        out = decode_attention(c.q, *c.caches(), *c.metadata(), 100, num_splits=splits,
                               out=torch.full_like(c.q, float("nan")), config=cfg)
        assert rel_err(out, c.reference()) < TOL[torch.float16]


@pytest.mark.parametrize("bs", [1, 8])
@pytest.mark.parametrize("h,n_kv,d_h", SHAPES)
def test_prefill_matches_reference(h, n_kv, d_h, bs):
    # whole prompts, a chunk after a cached prefix, decode rows mixed in
    c = make_case([17, 40, 9, 33], [17, 12, 1, 5], h, d_h, n_kv, n_kv, bs, torch.float32, DEV,
                  seed=h + bs, const_a=True)
    out = prefill_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len,
                            out=torch.full_like(c.q, float("nan")))
    err = rel_err(out, c.reference())
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


@pytest.mark.parametrize("h,n_kv,d_h", [(6, 2, 16), (47, 1, 48)])
def test_mixed_step_through_ops(h, n_kv, d_h):
    for n_q in ([5, 1, 0, 1, 16], [1, 1, 1, 1, 1]):
        c = make_case([20, 11, 7, 30, 33], n_q, h, d_h, n_kv, n_kv, 8, torch.float32, DEV,
                      seed=sum(n_q), const_a=True)
        out = paged_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len, c.max_seq_len)
        assert rel_err(out, c.reference()) < 1e-4, n_q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,n_kv,d_h,bs", [(9, 6, 64, 16), (7, 1, 16, 1), (5, 3, 48, 8)])
def test_store_writes_only_b(T, n_kv, d_h, bs, dtype):
    g = torch.Generator().manual_seed(T)
    nb = -(-T // bs) + 2
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(DEV)    # noqa: E731
    slots = torch.randperm(nb * bs, generator=g)[:T]
    slots[::3] = -1
    slots = slots.to(DEV)
    h = 2 * n_kv
    ak = torch.full((T, h, n_kv), float("nan"), dtype=dtype, device=DEV)  # never read
    bk, bv = rnd(T, n_kv, d_h), rnd(T, n_kv, d_h)
    theta = torch.rand(T, d_h // 2, generator=g) * 100
    cos, sin = theta.cos().to(DEV), theta.sin().to(DEV)
    caches = [rnd(nb, bs, n_kv, d_h), rnd(nb, bs, n_kv, d_h)]
    want = [x.clone() for x in caches]
    ref.store_factors_ref(ak, bk, ak, bv, cos, sin, slots, None, want[0], None, want[1])
    store_factors(ak, bk, ak, bv, cos, sin, slots, None, caches[0], None, caches[1])
    torch.testing.assert_close(caches[0], want[0], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(caches[1], want[1], atol=0, rtol=0)


def test_constant_a_input_errors_are_one_line():
    c = make_case([5], [1], 6, 16, 4, 4, 8, device=DEV, seed=1, const_a=True)  # 4 ∤ 6
    with pytest.raises(_validate.KernelInputError, match="multiple of the 4 kv heads"):
        decode_attention(c.q, *c.caches(), *c.metadata(), 5)
    c = make_case([5], [1], 6, 16, 2, 2, 8, device=DEV, seed=1, const_a=True)
    with pytest.raises(_validate.KernelInputError, match="both be None"):
        prefill_attention(c.q, None, c.bk, c.bk, c.bv, *c.metadata(), 1)
    with pytest.raises(_validate.KernelInputError, match="must match bk_cache"):
        decode_attention(c.q, None, c.bk, None, c.bv[:, :4].contiguous(), *c.metadata(), 5)


# ---- real sizes on the GPU (bf16): MHA 16 x 64, GQA-4 (32 heads, 8 kv), MQA medium ----
GPU_SHAPES = {"mha16x64": (16, 16, 64), "gqa4": (32, 8, 64), "gqa15": (30, 2, 64),
              "mqa31": (31, 1, 64)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_grid", [None, True])
@pytest.mark.parametrize("splits", [None, 1, 16])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_decode_real_sizes_bf16(shape, bs, splits, kv_grid):
    h, n_kv, d_h = GPU_SHAPES[shape]
    c = make_case([1, bs - 1, bs + 1, 4096, 32768, 1000], [1] * 6, h, d_h, n_kv, n_kv, bs,
                  torch.bfloat16, "cuda", seed=11, const_a=True)
    cfg = DecodeConfig(16, 16, 1, 5, kv_grid=True) if kv_grid else None
    out = decode_attention(c.q, *c.caches(), *c.metadata(), c.max_seq_len, num_splits=splits,
                           out=torch.full_like(c.q, float("nan")), config=cfg)
    err = rel_err(out, c.reference())
    assert err < TOL[torch.bfloat16], f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_prefill_and_store_real_sizes_bf16(shape):
    h, n_kv, d_h = GPU_SHAPES[shape]
    c = make_case([4096, 1000, 32768, 17], [512, 1000, 1, 1], h, d_h, n_kv, n_kv, 16,
                  torch.bfloat16, "cuda", seed=13, const_a=True)
    out = paged_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len, c.max_seq_len)
    err = rel_err(out, c.reference())
    assert err < TOL[torch.bfloat16], f"relative error {err:.2e}"
    T = 4096
    bk = torch.randn(T, n_kv, d_h, device="cuda", dtype=torch.bfloat16)
    bv = torch.randn_like(bk)
    theta = torch.rand(T, d_h // 2, device="cuda") * 1000
    slots = torch.randperm(c.bk.shape[0] * 16, device="cuda")[:T]
    slots[::17] = -1
    got = [c.bk.clone(), c.bv.clone()]
    want = [c.bk.clone(), c.bv.clone()]
    store_factors(bk, bk, bk, bv, theta.cos(), theta.sin(), slots, None, *got[:1], None,
                  got[1])
    ref.store_factors_ref(bk, bk, bk, bv, theta.cos(), theta.sin(), slots, None, want[0],
                          None, want[1])
    torch.testing.assert_close(got[0], want[0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)
