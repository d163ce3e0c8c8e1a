"""MHA, GQA, MQA (constant-A factor cache) and MLA (latent cache, absorbed form) through the
paged engine (CPU, fp32, the torch reference ops) against reference generation (a full
recompute per token with the model's plain forward, tests/reference.py).

The scenarios run for every variant (n_head 6: 6 kv heads, 2 kv heads = groups of 3, 1 kv
head; MLA with both RoPE conventions, test_engine_mla.make_mla) and under the three
scheduling regimes of test_engine_e2e.py (sync, async, rounds of 4):
batched greedy requests with chunked prefill, preemption under a tiny cache with greedy and
seeded requests, prefix-cache hits (with preemption and eviction), logprobs and prompt
logprobs, n > 1 siblings. Every test ends with assert_drained (no request, every block free).
"""
from __future__ import annotations

import random

import pytest

from tests.engine.test_engine_e2e import (  # noqa: F401  (scheduler_steps: autouse fixture)
    ENGINE_ARGS,
    GREEDY,
    LP_TOL,
    SAMPLED,
    V,
    assert_drained,
    assert_logprob_entries,
    engine,
    random_prompts,
    ref_logprobs,
    run,
    scheduler_steps,
    tokens,
)
from tests.engine.test_engine_mla import make_mla
from tests.reference import reference_generate, reference_prompt_logprobs
from tpaserve.models.dense import DenseConfig, DenseLM
from tpaserve.sampling_params import SamplingParams

KV_HEADS = {"mha": 6, "gqa": 2, "mqa": 1}
MLA_ROPE = {"mla": "positions", "mla-head-index": "head_index"}


def make_dense(variant: str) -> DenseLM:
    cfg = DenseConfig(n_layer=2, n_head=6, n_kv_head=KV_HEADS[variant], head_dim=8,
                      n_embd=32, vocab_size=V, max_position=256)
    assert cfg.variant == variant
    return DenseLM(cfg).init_random(seed=1, std=0.3).eval()


@pytest.fixture(scope="module", params=list(KV_HEADS))
def dense(request) -> DenseLM:
    return make_dense(request.param)


@pytest.fixture(scope="module", params=list(KV_HEADS) + list(MLA_ROPE))
def model(request):
    """Every baseline of the family (T6 itself: test_engine_e2e.py)."""
    if request.param in MLA_ROPE:
        return make_mla(MLA_ROPE[request.param])
    return make_dense(request.param)


def test_cache_holds_only_the_kv_heads(dense):
    eng = engine(dense, num_blocks=16, block_size=4)
    spec, cache, c = eng.core.spec, eng.core.cache, dense.cfg
    assert spec.const_a and cache.ak is None and cache.av is None
    assert tuple(cache.bk.shape) == (2, 16, 4, c.n_kv_head, c.head_dim) == tuple(cache.bv.shape)
    assert spec.bytes_per_token == 2 * 2 * c.n_kv_head * c.head_dim * 4 == cache.nbytes // 64
    # against the same model with a kv head per query head: MHA 1x, GQA 3x, MQA 6x
    assert spec.mha_bytes_per_token == 2 * 2 * 6 * 8 * 4
    assert spec.mha_bytes_per_token // spec.bytes_per_token == 6 // c.n_kv_head
    assert c.variant.upper() in spec.summary(16)


def test_concurrent_greedy_requests_with_chunked_prefill_equal_reference(model):
    prompts = random_prompts(12, 1, 40, seed=2)
    rng = random.Random(3)
    params = [SamplingParams(max_tokens=rng.randint(1, 12), **GREEDY) for _ in prompts]
    eng = engine(model, num_blocks=256, block_size=4, max_num_batched_tokens=24)
    done = run(eng, [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None), i
    assert_drained(eng)


def test_preemption_under_a_tiny_cache_keeps_outputs(model):
    prompts = random_prompts(8, 6, 20, seed=11)
    params = [SamplingParams(max_tokens=14, **(GREEDY if i % 2 else dict(SAMPLED, seed=i)))
              for i in range(8)]
    eng = engine(model, num_blocks=11, block_size=4, max_num_batched_tokens=16)
    done = run(eng, [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    assert eng.core.scheduler.num_preemptions > 0
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None), i
    assert_drained(eng)


def test_prefix_hits_with_preemption_and_eviction(model):
    rng = random.Random(9)
    prefix = [rng.randrange(V) for _ in range(14)]
    prompts = [prefix + [rng.randrange(V) for _ in range(rng.randint(1, 9))] for _ in range(8)]
    sp = SamplingParams(max_tokens=10, **GREEDY)
    eng = engine(model, num_blocks=13, block_size=4, max_num_batched_tokens=16)
    run(eng, [("warm", prompts[0], sp)])
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    assert eng.core.blocks.prefix_hits > 0 and eng.core.scheduler.num_preemptions > 0
    assert any(done[str(i)].num_cached_tokens >= 12 for i in range(8))
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None), i
    assert_drained(eng)


def test_logprobs_prompt_logprobs_and_siblings(model):
    prompts = random_prompts(3, 2, 25, seed=31)
    eng = engine(model, max_num_batched_tokens=9)
    plp = SamplingParams(max_tokens=0, prompt_logprobs=3)
    lp = SamplingParams(max_tokens=5, logprobs=2, **GREEDY)
    sib = SamplingParams(n=3, max_tokens=6, seed=42, **SAMPLED)
    done = run(eng, [("p", prompts[0], plp), ("l", prompts[1], lp), ("s", prompts[2], sib)])
    assert_logprob_entries(done["p"].prompt_logprobs,
                           reference_prompt_logprobs(model, prompts[0], 3))
    got = done["l"].outputs[0]
    assert got.token_ids == reference_generate(model, prompts[1], lp, None)
    ids = list(prompts[1])
    for tok, entry in zip(got.token_ids, got.logprobs):
        assert entry[0] == pytest.approx(ref_logprobs(model, ids)[tok].item(), abs=LP_TOL)
        ids.append(tok)
    for i, o in enumerate(done["s"].outputs):
        want = reference_generate(model, prompts[2], SamplingParams(
            max_tokens=6, seed=42 + i, **SAMPLED), None)
        assert o.token_ids == want, i
    assert_drained(eng)


@pytest.mark.parametrize("n_kv", [6, 2, 1], ids=["mha", "gqa", "mqa"])
def test_triton_kernels_and_padded_graph_paths_equal_reference(n_kv):
    """The engine with the Triton ops (CPU interpreter) instead of the torch references, and
    the static-buffer paths the CUDA graphs replay (run eagerly: padding rows, padding tokens
    and sequences): greedy tokens equal reference generation."""
    from tpaserve.kernels import _validate
    if not _validate.INTERPRET:
        pytest.skip("Triton on CPU tensors needs the interpreter (test_engine_gpu.py on CUDA)")
    if ENGINE_ARGS["num_scheduler_steps"] != 4:
        pytest.skip("one regime is enough: the interpreter is slow")
    from tests.engine.test_cuda_graph_path import step_graphs
    from tpaserve.kernels import ops as triton_ops
    cfg = DenseConfig(n_layer=2, n_head=6, n_kv_head=n_kv, head_dim=8, n_embd=32,
                      vocab_size=V, max_position=128)
    model = DenseLM(cfg).init_random(seed=2, std=0.3).eval()
    eng = engine(model, num_blocks=40, block_size=4, max_num_batched_tokens=48,
                 max_num_seqs=10)
    eng.core.runner.ops = triton_ops
    step_graphs(eng)
    prompts = random_prompts(10, 1, 30, seed=n_kv)
    sp = SamplingParams(max_tokens=7, **GREEDY)
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None), i
    assert_drained(eng)
