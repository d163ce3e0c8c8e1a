"""--cache-dtype: the fp8 factor cache through the engine (CPU).

The engine's CPU backend is the torch reference (reference.py), which quantises exactly as
the store kernel does; the Triton kernels (interpreter here, the GPU in `-m gpu` runs) are
swapped into the same engine and must produce the same greedy tokens and logprobs up to
float error. Plus: the flag's errors, bytes per token, and what is refused (constant A,
a GPU without e4m3, a CUDA cache dtype other than the model's).
"""
from __future__ import annotations

import pytest
import torch

from tests.engine.test_engine_e2e import V, make_model, random_prompts
from tpaserve.api.cli import build_parser
from tpaserve.config import CacheConfig, ModelConfig
from tpaserve.core.engine_core import resolve_cache_dtype
from tpaserve.exceptions import ConfigError
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.models.dense import DenseConfig, DenseLM
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams

FP8 = torch.float8_e4m3fn


def _engine(model, **kw):
    args = dict(num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                device="cpu", enable_prefix_caching=False)
    return build_engine(model, **{**args, **kw})


def _run(eng, prompts, max_tokens=6):
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            logprobs=3, prompt_logprobs=0)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    eng.core.blocks.check()
    assert eng.core.blocks.num_free == eng.core.blocks.num_blocks
    return [done[str(i)] for i in range(len(prompts))]


def test_cache_dtype_flag_and_its_errors():
    p = build_parser()
    assert p.parse_args(["--cache-dtype", "fp8"]).cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        p.parse_args(["--cache-dtype", "fp9"])
    with pytest.raises(ConfigError, match="--cache-dtype must be one of .*'e5m2'"):
        CacheConfig(cache_dtype="e5m2")


def test_fp8_halves_bytes_per_token_exactly():
    model = make_model(3)
    eng = _engine(model, cache_dtype="fp8")
    spec, cache = eng.core.spec, eng.core.cache
    assert cache.ak.dtype == cache.bk.dtype == FP8
    c = model.cfg
    per_layer = (c.k_rank + c.v_rank) * (c.n_head + c.head_dim)
    assert spec.bytes_per_token == c.n_layer * per_layer == cache.nbytes // (64 * 4)
    assert spec.bytes_per_token_by_dtype == {"bfloat16": 2 * spec.bytes_per_token,
                                             "float16": 2 * spec.bytes_per_token,
                                             "fp8": spec.bytes_per_token}
    info = eng.core.info
    assert info.cache_dtype == "fp8" and info.dtype == "float32"     # the model's
    assert f"{spec.bytes_per_token} B/token (fp8; bfloat16 " in spec.summary(64)


def test_dense_models_refuse_fp8():
    cfg = DenseConfig(n_layer=1, n_head=4, n_kv_head=2, head_dim=8, n_embd=32, vocab_size=V,
                      max_position=64)
    with pytest.raises(ConfigError, match="fp8 is not available for GQA"):
        _engine(DenseLM(cfg).init_random(seed=1).eval(), cache_dtype="fp8")


def test_cuda_refusals(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"8\.9\+.*A100 is 8\.0"):
        resolve_cache_dtype("fp8", torch.bfloat16, cuda)
    with pytest.raises(ConfigError, match="differs from the model's dtype bfloat16"):
        resolve_cache_dtype("float16", torch.bfloat16, cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    assert resolve_cache_dtype("fp8", torch.bfloat16, cuda) == FP8
    assert resolve_cache_dtype("bf16", torch.bfloat16, cuda) == torch.bfloat16
    assert resolve_cache_dtype("auto", torch.float32, torch.device("cpu")) == torch.float32
    assert resolve_cache_dtype("float16", torch.float32, torch.device("cpu")) == torch.float16


def test_fp8_engine_triton_kernels_equal_reference_ops():
    """Same engine, fp8 cache, reference ops vs the Triton store / decode / prefill (dims
    >= 16 for the interpreter's tl.dot); chunked prefill (budget 16) and decode steps."""
    from tpaserve.kernels import ops as triton_ops
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=16, n_embd=32, vocab_size=V, k_rank=2,
                      v_rank=2, q_rank=3, max_position=128)
    model = T6(cfg).init_random(seed=2, std=0.3).eval()
    prompts = random_prompts(3, 5, 30, seed=4)
    ref_out = _run(_engine(model, cache_dtype="fp8"), prompts)
    eng = _engine(model, cache_dtype="fp8")
    eng.core.runner.ops = triton_ops
    got = _run(eng, prompts)
    for a, b in zip(ref_out, got):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        if n < len(ta):
            # a near tie the fp16 products may flip: the reference ranks the kernel's token
            # within 2e-2 nats of its own there (then the two continuations differ)
            top = dict(a.outputs[0].logprobs[n][1])
            assert tb[n] in top and top[ta[n]] - top[tb[n]] < 2e-2, (n, ta, tb, top)
        # the decode kernel's products are fp16 (q and p * A_V rounded, ~5e-4 relative),
        # the reference's fp32; std-0.3 weights make logits of tens: ~1e-2 nats at most
        lp_a = [lp for lp, _ in a.outputs[0].logprobs[:n]]
        lp_a += [x[0] for x in a.prompt_logprobs[1:]]
        lp_b = [lp for lp, _ in b.outputs[0].logprobs[:n]]
        lp_b += [x[0] for x in b.prompt_logprobs[1:]]
        torch.testing.assert_close(torch.tensor(lp_b), torch.tensor(lp_a), atol=2e-2, rtol=0)
