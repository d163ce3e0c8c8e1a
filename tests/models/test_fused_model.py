"""T6.fuse_projections and the kernel path of the model (kernels/fused.py) compute the same
function as the plain model, which test_t6.py checks against an independent einsum
reading of the paper.

- Fusing shares memory: every Linear's weight is a view of one fused weight per module;
  state_dict keys and values are unchanged; in-place loads reach the fused weight, and a
  weight replaced outside it makes the module fall back to the separate Linears.
- Kernels on (Triton interpreter on the CPU, fp32): logits within 1e-5 of the plain model
  (relative to the largest logit; only summation order differs).
- gpu: T6-medium-shaped layers in bf16 through the engine's factor-cache path are checked by
  tests/engine/test_engine_gpu.py; here, fused + kernels vs plain on CUDA in fp32 (tight)
  and bf16 (loose: 6 layers of bf16 rounding, but a wrong eps or RoPE would be far off).
"""
from __future__ import annotations

import pytest
import torch

from tpaserve.config import ModelConfig
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.t6 import T6

CASES = {                                   # (q_rank, k_rank, v_rank, groupnorm)
    "t6": (6, 2, 2, False),
    "t6-groupnorm": (1, 3, 2, True),
    "kvonly": (None, 1, 3, False),
}


def make_model(case, n_head=7, head_dim=16, n_embd=40, n_layer=2, seed=0, std=0.2):
    q, k, v, gn = CASES[case]
    cfg = ModelConfig(n_layer=n_layer, n_head=n_head, head_dim=head_dim, n_embd=n_embd,
                      vocab_size=60, k_rank=k, v_rank=v, q_rank=q, using_groupnorm=gn,
                      max_position=64)
    return T6(cfg).init_random(seed, std=std).eval()


def logits(model, lens=(5, 1, 9), seed=1):
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    ids = torch.randint(0, model.cfg.vocab_size, (sum(lens),), generator=g).to(dev)
    pos = torch.cat([torch.arange(n) for n in lens]).to(dev)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    with torch.inference_mode():
        return model.compute_logits(model(ids, pos, FullSequenceAttention(cu)))


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def fused_modules(model):
    for block in model.transformer.h:
        yield block.attn.c_qkv
        yield block.mlp


@pytest.mark.parametrize("case", list(CASES))
def test_fused_projections_same_function_and_state_dict(case):
    model = make_model(case)
    want = logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_bytes = sum(p.numel() for p in model.parameters())
    assert model.fuse_projections() is model
    assert all(m.is_fused() for m in fused_modules(model))
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert sum(p.numel() for p in model.parameters()) == n_bytes
    for m in fused_modules(model):              # views of one storage, not copies
        base = m._fused.weight.untyped_storage().data_ptr()
        assert all(lin.weight.untyped_storage().data_ptr() == base for lin in m._fusible())
    assert rel(logits(model), want) <= 1e-5
    model.fuse_projections()                    # idempotent: the same fused weights
    assert all(m.is_fused() for m in fused_modules(model))


def test_in_place_loads_reach_the_fused_weight_and_replacements_fall_back():
    model = make_model("t6").fuse_projections()
    other = make_model("t6", seed=5)
    want = logits(other)
    model.load_state_dict(other.state_dict())                       # copy_ into the views
    assert all(m.is_fused() for m in fused_modules(model))
    assert rel(logits(model), want) <= 1e-5
    model = make_model("t6").fuse_projections()
    model.load_state_dict(other.state_dict(), assign=True)          # replaces the Parameters
    assert not any(m.is_fused() for m in fused_modules(model))
    assert rel(logits(model), want) <= 1e-5                         # separate Linears run
    model.fuse_projections()
    assert all(m.is_fused() for m in fused_modules(model))
    assert rel(logits(model), want) <= 1e-5


def test_dtype_move_refuses():
    want = logits(make_model("kvonly").double())
    model = make_model("kvonly").fuse_projections().double()
    assert all(m.is_fused() and m._fused.weight.dtype == torch.float64
               for m in fused_modules(model))
    assert rel(logits(model), want) <= 1e-12
    fused = [m._fused for m in fused_modules(model)]
    model.to(torch.float64)                     # a no-op move keeps the fused weights
    assert [m._fused for m in fused_modules(model)] == fused


def test_autograd_uses_the_parameters():
    """Under autograd the separate Linears run, so every weight gets its gradient."""
    model = make_model("t6").fuse_projections()
    ids, pos = torch.arange(4), torch.arange(4)
    model.compute_logits(model(ids, pos, FullSequenceAttention([0, 4]))).sum().backward()
    c = model.transformer.h[0].attn.c_qkv
    assert all(lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0
               for lin in c._fusible())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("fuse", [True, False])
def test_kernel_path_matches_plain_model(case, fuse):
    """The Triton kernels (interpreter on the CPU) inside the model, fp32."""
    pytest.importorskip("triton")
    model = make_model(case)
    want = logits(model)
    if fuse:
        model.fuse_projections()
    model.use_kernels = True
    assert rel(logits(model), want) <= 1e-5


# ------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["t6", "kvonly"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_gpu_fused_kernel_model_matches_plain(case, dtype, tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    n_head = 47 if case == "t6" else 29
    model = make_model(case, n_head=n_head, head_dim=64, n_embd=1024, n_layer=6, std=0.02)
    model = model.to(device="cuda", dtype=dtype)
    model.use_kernels = False
    want = logits(model, lens=(1, 17, 64))
    model.fuse_projections()
    model.use_kernels = None                    # auto: CUDA -> kernels
    got = logits(model, lens=(1, 17, 64))
    assert rel(got, want) <= tol
