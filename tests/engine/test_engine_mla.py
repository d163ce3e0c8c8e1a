"""MLA through the paged engine (its latent cache, the absorbed form; CPU, fp32, the torch
reference ops) against reference generation: a full recompute per token with mla.py's
plain forward (materialised heads, tests/reference.py). Absorption changes only the
summation order, so greedy tokens must be equal and logprobs within LP_TOL.

Both RoPE conventions (mla_rope "positions" with groupnorm; the older file's "head_index",
whose cache holds k_pe unrotated): the cache's layout and sizes, the Triton ops
(interpreter) through the padded CUDA-graph paths, the absorbed forward against the plain
one, the fp8 refusal. The scheduling scenarios (batched greedy with chunked prefill,
preemption, prefix hits with eviction, logprobs, prompt logprobs, n > 1, under the three
regimes) run for MLA with the rest of the family in test_engine_family.py.
"""
from __future__ import annotations

import pytest
import torch

from tests.engine.test_engine_e2e import (  # noqa: F401  (scheduler_steps: autouse fixture)
    ENGINE_ARGS,
    GREEDY,
    LP_TOL,
    V,
    assert_drained,
    assert_logprob_entries,
    engine,
    random_prompts,
    run,
    scheduler_steps,
    tokens,
)
from tests.reference import reference_generate, reference_prompt_logprobs
from tpaserve.models.mla import MLA, MLAConfig
from tpaserve.sampling_params import SamplingParams


def make_mla(mla_rope: str, seed: int = 1, max_position: int = 256) -> MLA:
    """Awkward sizes: 3 heads, kv_lora 7, rope 4, nope 6; v 10 (= nope + rope, groupnorm)
    with "positions", v 5 without groupnorm with "head_index"."""
    groupnorm = mla_rope == "positions"
    cfg = MLAConfig(n_layer=2, n_head=3, n_embd=32, vocab_size=V, q_lora_rank=12,
                    kv_lora_rank=7, qk_nope_head_dim=6, qk_rope_head_dim=4,
                    v_head_dim=10 if groupnorm else 5, using_groupnorm=groupnorm,
                    max_position=max_position, mla_rope=mla_rope)
    return MLA(cfg).init_random(seed=seed, std=0.3).eval()


@pytest.fixture(scope="module", params=["positions", "head_index"])
def mla(request) -> MLA:
    return make_mla(request.param)


def test_cache_is_the_latent_rows(mla):
    eng = engine(mla, num_blocks=16, block_size=4)
    spec, cache, c = eng.core.spec, eng.core.cache, mla.cfg
    assert spec.latent and cache.ak is cache.bk is cache.av is cache.bv is None
    assert tuple(cache.latent.shape) == (2, 16, 4, 7 + 4)
    assert spec.bytes_per_token == 2 * (7 + 4) * 4 == cache.nbytes // 64
    # against the same model's MHA twin: 3 heads of keys (6 + 4) and values
    assert spec.mha_bytes_per_token == 2 * 3 * (10 + c.v_head_dim) * 4
    assert "MLA: latent of kv_lora_rank 7" in spec.summary(16)
    assert_drained(eng)


@pytest.mark.parametrize("mla_rope", ["positions", "head_index"])
def test_triton_kernels_and_padded_graph_paths_equal_reference(mla_rope):
    """The engine with the Triton ops (CPU interpreter) instead of the torch references, and
    the static-buffer paths the CUDA graphs replay (run eagerly: padding rows, padding tokens
    and sequences): greedy tokens equal reference generation, prompt logprobs within LP_TOL."""
    from tpaserve.kernels import _validate
    if not _validate.INTERPRET:
        pytest.skip("Triton on CPU tensors needs the interpreter (test_engine_gpu.py on CUDA)")
    if ENGINE_ARGS["num_scheduler_steps"] != 4:
        pytest.skip("one regime is enough: the interpreter is slow")
    from tests.engine.test_cuda_graph_path import step_graphs
    from tpaserve.kernels import ops as triton_ops
    model = make_mla(mla_rope, seed=2, max_position=128)
    eng = engine(model, num_blocks=40, block_size=4, max_num_batched_tokens=48,
                 max_num_seqs=10)
    eng.core.runner.ops = triton_ops
    step_graphs(eng)
    prompts = random_prompts(10, 1, 30, seed=5)
    sp = SamplingParams(max_tokens=7, **GREEDY)
    reqs = [(str(i), p, sp) for i, p in enumerate(prompts)]
    reqs.append(("plp", prompts[0], SamplingParams(max_tokens=1, prompt_logprobs=2, **GREEDY)))
    done = run(eng, reqs)
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None), i
    assert_logprob_entries(done["plp"].prompt_logprobs,
                           reference_prompt_logprobs(model, prompts[0], 2))
    assert_drained(eng)


def test_absorbed_forward_equals_plain_forward():
    """The model-level identity the engine relies on, without scheduling: one sequence
    through PagedAttention (torch ops, block size 3) vs FullSequenceAttention, fp64 weights
    (the oracle's attention itself runs in fp32: 2e-6 apart here, a wrong absorption >0.1)."""
    from tpaserve.models.attention import FullSequenceAttention
    from tpaserve.runner.attention import PagedAttention, StepMetadata
    from tpaserve.runner.factor_cache import FactorCache, FactorCacheSpec
    for rope in ("positions", "head_index"):
        model = make_mla(rope).double()
        L = 23
        ids, pos = torch.randint(0, V, (L,)), torch.arange(L)
        cache = FactorCache(FactorCacheSpec.from_model(model.cfg, torch.float64, 3), 8, "cpu")
        meta = StepMetadata(pos.clone(), torch.tensor([0, L], dtype=torch.int32),
                            torch.tensor([L], dtype=torch.int32),
                            torch.arange(8, dtype=torch.int32)[None], L, L)
        with torch.no_grad():
            got = model(ids, pos, PagedAttention(cache, meta))
            want = model(ids, pos, FullSequenceAttention([0, L]))
        assert (got - want).abs().max().item() < 2e-5, rope


def test_fp8_cache_is_refused_in_one_line(mla):
    """The fp8 factor cache keeps its scales in the A factors; MLA's latent rows have none."""
    from tpaserve.config import ConfigError
    from tpaserve.runner.factor_cache import FactorCacheSpec
    with pytest.raises(ConfigError, match="fp8 is not available for MLA") as e:
        FactorCacheSpec.from_model(mla.cfg, torch.float8_e4m3fn, 16)
    assert "\n" not in str(e.value)
    assert "fp8" not in FactorCacheSpec.from_model(mla.cfg, torch.bfloat16, 16).summary(4)
