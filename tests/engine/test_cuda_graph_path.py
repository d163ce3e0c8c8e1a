"""The padded static-buffer paths that CUDA graphs replay (runner/graphs.py), run eagerly on
CPU: padding rows (slot -1, length 1), padding tokens and padding sequences must not disturb
real rows, whatever bucket a step lands in."""
import random

import pytest

from tests.reference import reference_generate
from tpaserve.config import ModelConfig
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.models import T6
from tpaserve.runner.graphs import StepGraphs, decode_buckets
from tpaserve.sampling_params import SamplingParams


def step_graphs(eng, decode=None, tokens=(16, 48), seqs=(4, 10)) -> StepGraphs:
    """Uncaptured graphs (their padded forwards run eagerly) on the engine's runner; the
    buckets stay within the engine's max_num_seqs (its buffers' size)."""
    r = eng.core.runner
    max_seqs = eng.core.config.scheduler.max_num_seqs
    decode = decode or [d for d in (1, 4) if d < max_seqs] + [max_seqs]
    g = StepGraphs(r.model, eng.core.cache, r.ops, r.buf, r.workspace, list(decode),
                   list(tokens), list(seqs), eng.max_model_len, eng.core.device, capture=False)
    r.graphs = g
    return g


def test_decode_buckets_cover_max_num_seqs():
    assert decode_buckets(1) == [1]
    assert decode_buckets(20)[-1] == 20 and decode_buckets(20)[:4] == [1, 2, 4, 8]
    assert decode_buckets(1000)[-1] == 512 and 384 in decode_buckets(1000)


@pytest.mark.parametrize("q_rank", [3, None])
def test_padded_decode_path_equals_reference(q_rank):
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=101, k_rank=2,
                      v_rank=1, q_rank=q_rank, max_position=128)
    model = T6(cfg).init_random(1).eval()
    eng = build_engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64,
                       max_num_seqs=12)
    graphs = step_graphs(eng)
    calls = []
    bucket = graphs.decode_bucket
    graphs.decode_bucket = lambda b: calls.append(b) or bucket(b)
    rng = random.Random(3)
    prompts = [[rng.randrange(101) for _ in range(rng.randint(1, 20))] for _ in range(12)]
    params = SamplingParams(temperature=0, max_tokens=9)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert calls and any(c not in (1, 4, 12) for c in calls), "padding rows were exercised"
    for i, p in enumerate(prompts):
        assert done[str(i)] == reference_generate(model, p, params, None)
    eng.core.blocks.check()
    assert eng.core.blocks.num_free == eng.core.blocks.num_blocks


@pytest.mark.parametrize("q_rank", [3, None])
def test_padded_mixed_step_path_equals_reference(q_rank):
    """Mixed steps (prompt chunks + decode rows) through the padded static buffers, eagerly:
    padding tokens (no slot, no sequence) and padding sequences (no queries) must not
    disturb real rows; steps with prompt logprobs fall back to the eager path."""
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=101, k_rank=2,
                      v_rank=1, q_rank=q_rank, max_position=128)
    model = T6(cfg).init_random(2).eval()
    eng = build_engine(model, num_blocks=96, block_size=4, max_num_batched_tokens=48,
                       max_num_seqs=10)
    mixed = step_graphs(eng)
    calls = []
    bucket = mixed.mixed_bucket
    mixed.mixed_bucket = lambda t, b: calls.append((t, b)) or bucket(t, b)
    rng = random.Random(4)
    prompts = [[rng.randrange(101) for _ in range(rng.randint(1, 40))] for _ in range(14)]
    params = SamplingParams(temperature=0, max_tokens=7)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params if i != 3 else SamplingParams(
            temperature=0, max_tokens=7, prompt_logprobs=1))
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert any(t not in (16, 48) for t, _ in calls), "padding tokens were exercised"
    assert any(b not in (4, 10) for _, b in calls), "padding sequences were exercised"
    for i, p in enumerate(prompts):
        assert done[str(i)] == reference_generate(model, p, params, None)
    eng.core.blocks.check()
    assert eng.core.blocks.num_free == eng.core.blocks.num_blocks


def test_decode_graph_context_class_follows_the_longest_sequence():
    cfg = ModelConfig(n_layer=1, n_head=5, head_dim=8, n_embd=32, vocab_size=101, k_rank=2,
                      v_rank=1, q_rank=3, max_position=5000)
    model = T6(cfg).init_random(1).eval()
    eng = build_engine(model, num_blocks=8, block_size=16, max_num_seqs=4)
    g = step_graphs(eng, decode=[1, 4], tokens=[16], seqs=[4])
    assert g.classes == [1024, 4096, 5000]
    for longest, want in ((1, 1024), (1024, 1024), (1025, 4096), (4097, 5000)):
        assert g.context_class(longest) == want
