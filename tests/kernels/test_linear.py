"""kernels/linear.py (skinny GEMM) against F.linear: y = x @ W^T.

Shapes are awkward on purpose: M = 1, 3, 16, 17 (one row, a partial 16-row tile, two
M tiles), N not a multiple of BLOCK_N, K not a multiple of BLOCK_K, split-K with a short
last split, x rows strided (a column view of a wider tensor, as the model's attention
output may be), a weight with a row stride larger than K, and `out` poisoned with NaN
first so every element must be written. Configs are forced as well as defaulted: tl.dot
and the CUDA-core broadcast path, with and without split-K.

CPU: Triton interpreter in fp32 / fp16 only (its bf16 arithmetic is wrong); the
interpreter does not enforce tl.dot's shape minimums, so the gpu-marked test compiles
the real configs at T6-medium's shapes in bf16.
"""
import pytest
import torch
import torch.nn.functional as F

from tpaserve.kernels import _validate
from tpaserve.kernels import linear as lk
from tpaserve.kernels.linear import SkinnyConfig, linear, use_skinny

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(M, N, K, dtype, seed=0, x_pad=0, w_pad=0):
    """x (M, K) as columns 1..K of a (M, K + x_pad + 1) tensor when x_pad; W (N, K) as the
    first K columns of (N, K + w_pad). Scaled so |y| ~ 1."""
    g = torch.Generator().manual_seed(seed)
    xw = torch.randn(M, K + x_pad + (1 if x_pad else 0), generator=g) / K ** 0.5
    ww = torch.randn(N, K + w_pad, generator=g)
    x = xw.to(dtype).to(DEV)[:, (1 if x_pad else 0):(1 if x_pad else 0) + K]
    w = ww.to(dtype).to(DEV)[:, :K]
    return x, w


def _check(M, N, K, dtype, config=None, x_pad=0, w_pad=0, seed=0):
    x, w = _inputs(M, N, K, dtype, seed, x_pad, w_pad)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=DEV)
    got = linear(x, w, out=out, config=config)
    assert got is out
    want = F.linear(x.float(), w.float()).to(dtype)
    torch.testing.assert_close(got, want, **TOL[dtype])
    return x, w, got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M", [1, 3, 16, 17])
@pytest.mark.parametrize("N,K", [(37, 100), (70, 300), (40, 1600)])
def test_default_config_matches_f_linear(M, N, K, dtype):
    # K = 1600 (M > 2): the default splits K (8 requested, 7 used, the last one short)
    _check(M, N, K, dtype, x_pad=5 if M % 2 else 0, w_pad=3 if K == 300 else 0)


CONFIGS = [
    SkinnyConfig(16, 16, 64, 4, 4, 2, True),     # dot, split-K, K = 100 not a multiple of 64
    SkinnyConfig(16, 8, 128, 1, 4, 3, True),     # dot with an 8-wide N tile
    SkinnyConfig(16, 32, 32, 2, 4, 2, True),     # 2 M tiles x split: counters per (m, n)
    SkinnyConfig(4, 8, 64, 3, 4, 2, False),      # broadcast multiply + sum, split
    SkinnyConfig(1, 4, 128, 1, 4, 2, False),     # broadcast, one row per M tile
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("M,N,K", [(1, 37, 100), (3, 70, 300), (17, 33, 200)])
def test_forced_configs_match_f_linear(M, N, K, dtype, config):
    _check(M, N, K, dtype, config=config, x_pad=2)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[3]], ids=str)
def test_split_k_repeats_bit_identically(config):
    """The last split resets its counter and sums the partials in split order, so a second
    call (same counters) gives the same bits."""
    x, w, first = _check(3, 37, 300, torch.float32, config=config)
    again = linear(x, w, config=config)
    assert torch.equal(first, again)
    assert int(lk._counters(x.device).abs().sum()) == 0


def test_empty_and_zero_k():
    w = torch.randn(5, 7, device=DEV)
    assert linear(torch.empty(0, 7, device=DEV), w).shape == (0, 5)
    y = linear(torch.empty(3, 0, device=DEV), torch.empty(5, 0, device=DEV))
    assert torch.equal(y, torch.zeros(3, 5, device=DEV))


def test_rejects_bad_inputs():
    x, w = torch.zeros(2, 8), torch.zeros(5, 8)
    with pytest.raises(_validate.KernelInputError, match="linear needs"):
        linear(x, torch.zeros(5, 9))                              # K mismatch
    with pytest.raises(_validate.KernelInputError, match="linear needs"):
        linear(x.half(), w)                                       # dtypes differ
    with pytest.raises(_validate.KernelInputError, match="linear needs"):
        linear(torch.zeros(8, 2).t(), w)                          # x strided along K
    with pytest.raises(_validate.KernelInputError, match="linear needs"):
        linear(x.double(), w.double())                            # fp64
    with pytest.raises(_validate.KernelInputError, match="linear needs"):
        linear(torch.zeros(2, 3, 8), w)                           # 3-D x
    with pytest.raises(_validate.KernelInputError, match="out must"):
        linear(x, w, out=torch.zeros(2, 6))
    with pytest.raises(_validate.KernelInputError, match="out must"):
        linear(x, w, out=torch.zeros(5, 2).t())                   # strided along N
    with pytest.raises(_validate.KernelInputError, match="block_m"):
        linear(x, w, config=SkinnyConfig(4, 16, 64, 1, 4, 2, True))


def test_use_skinny_rule():
    assert use_skinny(1, 1120, 1024) and use_skinny(lk.MAX_M, 1024, 3008)
    assert not use_skinny(lk.MAX_M + 1, 1024, 3008)              # prefill-sized: cuBLAS
    assert not use_skinny(0, 1024, 1024)
    assert not use_skinny(1, 16, 16)                              # tiny: launch-bound


# ------------------------------------------------------------------ GPU, bf16, real sizes

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 3, 16, 17, 48, 64])
@pytest.mark.parametrize("N,K", [(1120, 1024), (1024, 3008), (5472, 1024), (1024, 2736)])
def test_gpu_t6_medium_shapes_bf16(M, N, K):
    """The default configs compile and match F.linear; the error of the bf16 output
    against an fp32 reference is no worse than cuBLAS's (beyond rounding noise)."""
    x, w = _inputs(M, N, K, torch.bfloat16, seed=M, x_pad=3 if M % 2 else 0)
    out = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=DEV)
    got = linear(x, w, out=out)
    ref = F.linear(x.float(), w.float())
    err = ((got.float() - ref).norm() / ref.norm()).item()
    err_cublas = ((F.linear(x, w).float() - ref).norm() / ref.norm()).item()
    assert err < max(2 * err_cublas, 5e-3), (err, err_cublas)
    assert torch.equal(got, linear(x, w))                        # repeat: same bits


def test_model_routes_layer_gemms_only_with_kernels(monkeypatch):
    """kernels=True sends the 4 per-layer GEMMs (fused factor projections, attention c_proj,
    fused c_fc1|c_fc2, MLP c_proj; not lm_head) through linear() when use_skinny says so, with the same logits;
    kernels=False never calls it."""
    from tpaserve.config import ModelConfig
    from tpaserve.models.attention import FullSequenceAttention
    from tpaserve.models.t6 import T6
    cfg = ModelConfig(n_layer=2, n_head=3, head_dim=16, n_embd=40, vocab_size=60, k_rank=2,
                      v_rank=2, q_rank=2, max_position=64)
    model = T6(cfg).init_random(0, std=0.2).eval().to(DEV).fuse_projections()
    monkeypatch.setattr(lk, "MIN_WEIGHT", 0)                 # test-sized weights count
    calls = []
    real = lk.linear
    monkeypatch.setattr(lk, "linear", lambda x, w, *a, **k: calls.append(w.shape) or real(x, w))
    ids = torch.tensor([1, 5, 7, 2, 9], device=DEV)
    pos = torch.tensor([0, 1, 2, 0, 1], device=DEV)
    with torch.inference_mode():
        run = lambda kernels: model.compute_logits(model(ids, pos, FullSequenceAttention([0, 3, 5]),
                                                          kernels=kernels))
        plain = run(False)
        assert calls == []
        fast = run(True)
    assert len(calls) == 4 * cfg.n_layer and (cfg.vocab_size, cfg.n_embd) not in calls
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=1e-4)
