"""The engine on CUDA (Triton kernels, CUDA graphs, multi-step rounds, async scheduling)
against the same engine with the torch reference ops and none of that: greedy tokens of a
mixed prefill/decode workload must agree (fp32 weights, so that kernel rounding (tf32 dots)
cannot flip an argmax except on near-ties). And a step never waits for the device: the
runner's execute() runs under torch's sync debug mode set to raise. Structured outputs'
masks hold there too."""
import json
import random
import re

import pytest
import torch

from tests.engine.test_engine_e2e import assert_drained, run
from tpaserve.config import ModelConfig
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.models import T6
from tpaserve.runner.attention import TorchOps
from tpaserve.sampling_params import SamplingParams, StructuredOutputsParams

# a bounded schema (tests/engine/test_structured_outputs.py's; the device has no jsonschema)
SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tag": {"enum": ["red", "blue"]},
                         "name": {"type": "string", "pattern": "^[a-z]{1,3}$"}},
          "required": ["id", "tag", "name"], "additionalProperties": False}

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _run(engine, prompts, params):
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


def forbid_host_syncs(eng) -> list[tuple[int, int]]:
    """Make every ModelRunner.execute of `eng`, and the held-back sampling of a single step
    with grammar masks (PendingOutput.sample; a round's waits for each step's samples),
    raise on a host-device sync (torch's sync debug mode); returns the list each step's
    (num_steps, tokens, deferred) is appended to."""
    kinds, execute = [], eng.core.runner.execute

    def no_sync(fn, *args, **kw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def strict(sched, **kw):
        pending = no_sync(execute, sched, **kw)
        kinds.append((sched.num_steps, sum(r.num_tokens for r in sched.requests),
                      pending.deferred is not None))
        if pending.deferred is not None and sched.num_steps == 1:   # a round waits by design
            sample = pending.sample
            pending.sample = lambda masks: no_sync(sample, masks)
        return pending
    eng.core.runner.execute = strict
    return kinds


@pytest.mark.parametrize("q_rank", [6, None])
def test_kernels_and_graphs_match_reference_engine(q_rank):
    cfg = ModelConfig(n_layer=3, n_head=47, head_dim=64, n_embd=256, vocab_size=2048, k_rank=2,
                      v_rank=2, q_rank=q_rank, max_position=1024)
    model = T6(cfg).init_random(0).to("cuda").eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(2048) for _ in range(rng.choice([1, 15, 16, 17, 90, 300]))]
               for _ in range(20)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = dict(num_blocks=1024, block_size=16, max_num_batched_tokens=256, max_num_seqs=24)
    fast = build_engine(model, **kw)           # CUDA defaults: graphs, multi-step rounds
    assert fast.core.runner.graphs is not None and fast.core.runner.ops is not TorchOps
    assert fast.core.config.scheduler.num_scheduler_steps > 1 and fast.core.async_scheduling
    rounds, execute = [], fast.core.runner.execute
    fast.core.runner.execute = lambda s, **k: rounds.append(s.num_steps) or execute(s, **k)
    ref = build_engine(model, enforce_eager=True, num_scheduler_steps=1, **kw)
    ref.core.runner.ops = TorchOps
    a, b = _run(fast, prompts, params), _run(ref, prompts, params)
    assert max(rounds) > 1
    agree = sum(x == y for x, y in zip(a, b))
    assert agree >= len(prompts) - 1, f"{agree}/{len(prompts)} identical"
    assert fast.core.blocks.num_free == fast.core.blocks.num_blocks


def _prefix_and_preemption_against_reference(model, agree_min: int):
    """The CUDA engine (kernels, graphs, rounds, async) against the torch reference ops
    engine, greedy, with prefix hits (a shared prefix) and preemption (60 blocks of 16: the
    largest request, 360 tokens, fits; the batch does not)."""
    rng = random.Random(1)
    prefix = [rng.randrange(2048) for _ in range(40)]
    prompts = [(prefix if i % 3 == 0 else []) +
               [rng.randrange(2048) for _ in range(rng.choice([1, 15, 16, 17, 90, 300]))]
               for i in range(20)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = dict(num_blocks=60, block_size=16, max_num_batched_tokens=256, max_num_seqs=24)
    fast = build_engine(model, **kw)
    assert fast.core.runner.graphs is not None and fast.core.runner.ops is not TorchOps
    ref = build_engine(model, enforce_eager=True, num_scheduler_steps=1, **kw)
    ref.core.runner.ops = TorchOps
    a, b = _run(fast, prompts, params), _run(ref, prompts, params)
    assert fast.core.blocks.prefix_hits > 0 and fast.core.scheduler.num_preemptions > 0
    agree = sum(x == y for x, y in zip(a, b))
    assert agree >= agree_min, f"{agree}/{len(prompts)} identical"
    assert fast.core.blocks.num_free == fast.core.blocks.num_blocks
    return fast


@pytest.mark.parametrize("n_head,n_kv", [(16, 16), (32, 8), (31, 1)], ids=["mha16", "gqa4", "mqa31"])
def test_dense_kernels_and_graphs_match_reference_engine(n_head, n_kv):
    """MHA / GQA / MQA (constant-A factor cache, CONST_A kernels) the same way."""
    from tpaserve.models.dense import DenseConfig, DenseLM
    cfg = DenseConfig(n_layer=3, n_head=n_head, n_kv_head=n_kv, head_dim=64, n_embd=256,
                      vocab_size=2048, max_position=1024)
    model = DenseLM(cfg).init_random(0).to("cuda").eval()
    fast = _prefix_and_preemption_against_reference(model, agree_min=19)
    assert fast.core.cache.ak is None and fast.core.spec.const_a


@pytest.mark.parametrize("mla_rope", ["positions", "head_index"])
def test_mla_kernels_and_graphs_match_reference_engine(mla_rope):
    """MLA (latent cache, mla_decode's decode and rows launches, latent store) the same way,
    fp32 weights so the two engines differ only by summation order; then bf16 at the medium
    sizes' latent (23 heads, kv_lora 256, rope 32) agreeing on most greedy continuations."""
    from tpaserve.models.mla import MLA, MLAConfig
    for dtype, agree_min in ((torch.float32, 19), (torch.bfloat16, 15)):
        cfg = MLAConfig(n_layer=3, n_head=23, n_embd=256, vocab_size=2048, q_lora_rank=128,
                        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                        v_head_dim=64, max_position=1024, mla_rope=mla_rope)
        model = MLA(cfg).init_random(0).to("cuda", dtype).eval()
        fast = _prefix_and_preemption_against_reference(model, agree_min)
        assert fast.core.spec.latent and fast.core.cache.latent is not None


def test_execute_never_waits_for_the_device():
    """Every kind of step (mixed graphs, decode graphs, rounds, eager steps with prompt
    logprobs, every sampler knob but the history ones) is enqueued without a host-device
    synchronisation: the async core plans the next step while the device runs this one."""
    cfg = ModelConfig(n_layer=2, n_head=47, head_dim=64, n_embd=256, vocab_size=2048, k_rank=2,
                      v_rank=2, q_rank=6, max_position=1024)
    model = T6(cfg).init_random(0).to("cuda", torch.bfloat16).eval()
    rng = random.Random(1)
    knobs = [dict(temperature=0), dict(temperature=0.8, seed=5), dict(top_p=0.9, top_k=20),
             dict(min_p=0.1), dict(logprobs=3), dict(temperature=0, prompt_logprobs=2),
             dict(n=3, temperature=1.0, seed=9)]
    prompts = [[rng.randrange(2048) for _ in range(rng.choice([1, 17, 90, 300]))]
               for _ in range(21)]
    params = [SamplingParams(max_tokens=rng.choice([1, 9, 30]), ignore_eos=True,
                             **knobs[i % len(knobs)]) for i in range(len(prompts))]
    kw = dict(num_blocks=1024, block_size=16, max_num_batched_tokens=256, max_num_seqs=24)
    eng = build_engine(model, **kw)
    warm = _run(eng, prompts[:4], SamplingParams(max_tokens=3))     # Triton compiles here
    assert warm
    kinds = forbid_host_syncs(eng)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        eng.add_request(str(i), p, sp)
    while eng.has_unfinished_requests():
        eng.step()
    assert any(k > 1 for k, _, _ in kinds) and any(t > 100 for _, t, _ in kinds)
    assert eng.core.blocks.num_free == eng.core.blocks.num_blocks


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_nonfinite_rows_are_marked_on_the_device(greedy):
    """The sampler's NaN / +inf guard with CUDA's reductions (amax propagates NaN there too),
    bf16 logits as the model gives them, a vocab that is not a power of two."""
    from tpaserve.runner.sampler import NONFINITE, Sampler, SamplingRow
    v = 32003
    logits = torch.randn(8, v + 61, device="cuda", dtype=torch.bfloat16)
    logits[1, 17] = float("nan")
    logits[5, v - 1] = float("inf")
    logits[6, :] = float("-inf")
    logits[6, 3] = 0.0                      # masked everywhere but one token: fine
    p = SamplingParams(temperature=0.0 if greedy else 0.9, top_p=0.95)
    rows = [SamplingRow(p, [1, 2], [], None) for _ in range(8)]
    out = Sampler(v, 2)(logits, rows).token_ids
    assert out[1] == NONFINITE and out[5] == NONFINITE
    assert out[6] == 3
    assert all(0 <= t < v for i, t in enumerate(out) if i not in (1, 5))


def test_on_cuda_masks_hold_without_host_syncs_beside_graphs_and_rounds():
    """t6-demo on CUDA (graphs, rounds of 8, async): constrained outputs validate, the
    unconstrained requests get their tokens of a run without constrained ones (fp32: one
    near-tie flip allowed, as in test_engine_gpu), and execute() never waits for the device
    with masks in the step."""
    kw = dict(device="cuda", dtype="float32", num_blocks=512, max_num_seqs=32)
    eng = build_engine(None, **kw)
    tok = eng.tokenizer
    prompts = [tok.encode(t) for t in ("It is a truth", "Mr. Darcy", "Elizabeth said",
                                        "The ball", "Jane", "Longbourn", "Lydia", "Pemberley")]
    plain = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    alone = build_engine(None, **kw)
    reqs = [(f"p{i}", p, plain) for i, p in enumerate(prompts)]
    want = {rid: out.outputs[0].token_ids for rid, out in run(alone, reqs).items()}
    assert alone.core.config.scheduler.num_scheduler_steps > 1 and alone.core.runner.graphs
    yes = StructuredOutputsParams(choice=["yes"])
    run(eng, [("w0", prompts[0], SamplingParams(max_tokens=3)),       # Triton compiles here
              ("w1", prompts[1], SamplingParams(max_tokens=3, structured_outputs=yes))])
    kinds = forbid_host_syncs(eng)
    schema = StructuredOutputsParams(json=SCHEMA)
    reqs += [(f"s{i}", p, SamplingParams(max_tokens=80, temperature=0.7 * (i % 2), seed=i,
                                         structured_outputs=schema))
             for i, p in enumerate(prompts)]
    done = run(eng, reqs)
    for i in range(len(prompts)):
        o = done[f"s{i}"].outputs[0]
        assert o.finish_reason == "stop", o.text
        v = json.loads(o.text)
        assert set(v) == {"id", "tag", "name"} and 0 <= v["id"] <= 99, v
        assert v["tag"] in ("red", "blue") and re.fullmatch("[a-z]{1,3}", v["name"]), v
    assert any(d for _, _, d in kinds) and any(k > 1 for k, _, _ in kinds)
    agree = sum(done[k].outputs[0].token_ids == v for k, v in want.items())
    assert agree >= len(prompts) - 1, f"{agree}/{len(prompts)}"
    assert_drained(eng)
