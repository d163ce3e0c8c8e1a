"""The engine on CUDA (Triton kernels + decode CUDA graphs) against the same engine with the
torch reference ops: greedy tokens of a mixed prefill/decode workload must agree. fp32
weights so that kernel rounding (tf32 dots) cannot flip an argmax except on near-ties."""
import random

import pytest
import torch

from tpaserve.config import ModelConfig
from tpaserve.engine.factory import build_engine
from tpaserve.engine.paged_attention import TorchOps
from tpaserve.models import T6
from tpaserve.sampling_params import SamplingParams

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
    assert fast.runner.graphs is not None and fast.runner.ops is not TorchOps
    assert fast.config.scheduler.num_scheduler_steps > 1
    rounds, execute = [], fast.runner.execute
    fast.runner.execute = lambda s: rounds.append(s.num_steps) or execute(s)
    ref = build_engine(model, enforce_eager=True, num_scheduler_steps=1, **kw)
    ref.runner.ops = TorchOps
    a, b = _run(fast, prompts, params), _run(ref, prompts, params)
    assert max(rounds) > 1
    agree = sum(x == y for x, y in zip(a, b))
    assert agree >= len(prompts) - 1, f"{agree}/{len(prompts)} identical"
    assert fast.blocks.num_free == fast.blocks.num_blocks
