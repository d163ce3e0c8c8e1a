"""MLA's latent-cache kernels (kernels/mla_decode.py, kernels/mla_store.py) against the torch
references (kernels/reference.py), on awkward shapes: heads 1/3/23/47 (not powers of two,
one and several head blocks), kv_lora 96/80/7 (not powers of two), rope 16/32/4, block
sizes 1/8/16, mixed lengths around the tile size in one batch, split-K 1/3, fp32, fp16 and
bf16 (the interpreter upcasts after loads, UPCAST). The reference is itself checked
against the plain MLA forward (materialised k and v), which is what absorption must equal.
Tolerances: relative Frobenius error, tests/kernels/paged_case.TOL per dtype.
"""
from __future__ import annotations

import math

import pytest
import torch

import tpaserve.kernels.reference as ref
from tests.kernels.latent_case import make_latent_case, reference
from tests.kernels.paged_case import TOL, rel_err
from tpaserve.kernels._validate import INTERPRET, KernelInputError
from tpaserve.kernels.decode import DecodeConfig
from tpaserve.kernels.mla_decode import mla_attention
from tpaserve.kernels.mla_store import store_latent

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu" and not INTERPRET:
    pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1", allow_module_level=True)

SHAPES = [  # (h, kv_lora, rope)
    (3, 96, 16),
    (23, 80, 32),        # the medium config's head count: one block of 16 + a masked one
    (1, 7, 4),           # the authors' test sizes: every dim padded
    (47, 96, 16),        # three head blocks
]


def case(*args, **kw) -> dict:
    return make_latent_case(*args, device=DEV, **kw)


def run(c: dict, **kw) -> torch.Tensor:
    out = torch.full((*c["q"].shape[:2], c["kv_lora"]), float("nan"), dtype=c["q"].dtype,
                     device=c["q"].device)
    return mla_attention(c["q"], c["cache"], c["block_tables"], c["seq_lens"],
                         c["query_start_loc"], c["max_query_len"], c["max_seq_len"],
                         c["kv_lora"], c["scale"], out=out, **kw)


def test_reference_equals_the_plain_forward_with_materialised_heads():
    """Absorption is exact algebra: per head, k = [W_uk c, k_pe] and v = W_uv c, so
    softmax(q . k) v = W_uv (softmax([W_uk^T q_nope, q_pe] . [c, k_pe]) c)."""
    g = torch.Generator().manual_seed(1)
    h, nope, rope, dv, C, L = 3, 6, 4, 5, 7, 11
    c, k_pe = torch.randn(L, C, generator=g), torch.randn(L, rope, generator=g)
    q_nope, q_pe = torch.randn(L, h, nope, generator=g), torch.randn(L, h, rope, generator=g)
    w = torch.randn(h, nope + dv, C, generator=g)                  # kv_b_proj, viewed
    k = torch.cat((torch.einsum("hnc,lc->lhn", w[:, :nope], c), k_pe[:, None].expand(L, h, rope)), -1)
    v = torch.einsum("hvc,lc->lhv", w[:, nope:], c)
    scale = 1 / math.sqrt(nope + rope)
    logits = torch.einsum("thd,mhd->thm", torch.cat((q_nope, q_pe), -1), k) * scale
    logits.masked_fill_(torch.ones(L, L).triu(1).bool()[:, None, :], float("-inf"))
    want = torch.einsum("thm,mhv->thv", logits.softmax(-1), v)           # (L, h, dv)
    cache = torch.cat((c, k_pe), -1).view(L, 1, C + rope)               # block size 1
    q = torch.cat((torch.einsum("thn,hnc->thc", q_nope, w[:, :nope]), q_pe), -1)
    o_lat = ref.mla_attention_ref(q, cache, torch.arange(L, dtype=torch.int32)[None],
                                  torch.tensor([L], dtype=torch.int32),
                                  torch.tensor([0, L], dtype=torch.int32), C, scale)
    got = torch.einsum("thc,hvc->thv", o_lat, w[:, nope:])
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("h,kv_lora,rope", SHAPES)
def test_decode_matches_reference(h, kv_lora, rope, bs, splits):
    c = case([1, 15, 16, 17, 50], [1] * 5, h, kv_lora, rope, bs, seed=h + bs)
    err = rel_err(run(c, num_splits=splits), reference(c))
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision(dtype):
    c = case([3, 33, 64, 100], [1] * 4, 23, 80, 32, 16, dtype, seed=4)
    for splits in (1, 4):
        assert rel_err(run(c, num_splits=splits), reference(c)) < TOL[dtype], splits


@pytest.mark.parametrize("bs", [1, 8])
@pytest.mark.parametrize("h,kv_lora,rope", SHAPES)
def test_chunks_mixed_with_decode_rows(h, kv_lora, rope, bs):
    """Prompt chunks (whole prompts, and chunks after a cached prefix: prefix hits and
    chunked prefill), one-row sequences and a sequence without a query in one step."""
    lens, n_q = [1, 9, 30, 17, 40, 5], [1, 4, 30, 1, 0, 5]
    c = case(lens, n_q, h, kv_lora, rope, bs, seed=h * bs)
    err = rel_err(run(c, num_splits=2), reference(c))       # every query row is written
    assert err < TOL[torch.float32], f"relative error {err:.2e}"


@pytest.mark.parametrize("rows_m", [16, 64, 128])
def test_rows_programs_spanning_several_sequences(rows_m, monkeypatch):
    """The rows launch takes rows_m / 16 query rows a program (1, 4, 8 here), so one program
    covers parts of up to 8 sequences: short chunks, single rows between them, the last
    program partly past the step's rows."""
    from tpaserve.kernels import mla_decode
    monkeypatch.setattr(mla_decode, "_ROWS_M", rows_m)
    n_q = [2, 3, 1, 2, 1, 1, 5, 2, 9, 1, 3]
    lens = [n + k for n, k in zip(n_q, [0, 4, 7, 0, 3, 0, 20, 1, 2, 0, 40])]
    c = case(lens, n_q, 5, 80, 16, 8, seed=rows_m)
    assert rel_err(run(c, num_splits=2), reference(c)) < TOL[torch.float32]


def test_padding_tokens_and_sequences_of_a_graph_bucket():
    """A mixed graph bucket: tokens past the last sequence's rows and sequences without
    rows (query_start_loc repeats T) are skipped; their out rows are left alone."""
    c = case([6, 12, 1, 1], [6, 3, 0, 0], 3, 96, 16, 8, seed=7)
    T = 9
    c["q"] = torch.cat((c["q"], torch.randn(4, *c["q"].shape[1:], device=DEV)))   # pad to 13
    got = run(c, num_splits=1)
    assert rel_err(got[:T], reference(dict(c, q=c["q"][:T]))) < TOL[torch.float32]
    assert torch.isnan(got[T:]).all()


@pytest.mark.parametrize("bs", [1, 8, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_matches_reference(bs, dtype):
    g = torch.Generator().manual_seed(bs)
    T, C, P = 11, 80, 32
    raw = torch.randn(T, C + P + 5, generator=g).to(dtype).to(DEV)   # strided views, as the
    c, k_pe = raw[:, :C], raw[:, C + 5:]                             # model hands them
    slots = torch.randperm(4 * 16, generator=g)[:T].to(DEV)
    slots[3] = -1                                                    # padding: not stored
    got = torch.zeros(4 * 16 // bs, bs, C + P, dtype=dtype, device=DEV)
    want = got.clone()
    store_latent(c, k_pe, slots, got)
    ref.store_latent_ref(c, k_pe, slots, want)
    assert torch.equal(got, want)


def test_input_errors_are_one_line():
    c = case([5], [1], 3, 96, 16, 8)
    bad = [
        dict(cache=c["cache"].transpose(0, 1)),            # not contiguous
        dict(kv_lora=112),                                 # leaves no rope
        dict(q=c["q"][..., :100]),                         # q's width is not the row's
        dict(q=c["q"].half()),                             # dtype differs from the cache
        dict(block_tables=c["block_tables"].long()),
    ]
    for edit in bad:
        with pytest.raises(KernelInputError) as e:
            run(dict(c, **edit))
        assert "\n" not in str(e.value)
    with pytest.raises(KernelInputError, match="workspace"):
        run(c, num_splits=2, workspace=torch.empty(3, device=DEV))
    with pytest.raises(KernelInputError, match="k_pe"):
        store_latent(torch.zeros(2, 96, device=DEV), torch.zeros(2, 8, device=DEV),
                     torch.zeros(2, dtype=torch.int64, device=DEV), c["cache"])


# ---------------------------------------------------------------- real shapes (GPU)
REAL = [  # (h, kv_lora, rope): the medium MLA (class defaults), DeepSeek-V2-Lite's latent
    (23, 256, 32),
    (16, 512, 64),
]


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("splits", [None, 1, 7])
@pytest.mark.parametrize("bs", [16, 1])
@pytest.mark.parametrize("h,kv_lora,rope", REAL)
def test_decode_real_sizes_bf16(h, kv_lora, rope, bs, splits):
    lens = [1, 100, 4097, 32768] + [513] * 12
    c = case(lens, [1] * len(lens), h, kv_lora, rope, bs, torch.bfloat16, seed=5)
    assert rel_err(run(c, num_splits=splits), reference(c)) < TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a GPU")
@pytest.mark.parametrize("h,kv_lora,rope", REAL)
def test_chunks_real_sizes_bf16(h, kv_lora, rope):
    lens, n_q = [700, 1, 2048, 300], [700, 1, 512, 1]
    c = case(lens, n_q, h, kv_lora, rope, 16, torch.bfloat16, seed=6)
    assert rel_err(run(c), reference(c)) < TOL[torch.bfloat16]
    cfg = DecodeConfig(head_block=16, block_n=16, num_warps=4, num_stages=2)
    assert rel_err(run(c, config=cfg), reference(c)) < TOL[torch.bfloat16]
