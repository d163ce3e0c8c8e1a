"""The padded static-buffer decode path that CUDA graphs replay, run eagerly on CPU: padding
rows (slot -1, length 1) must not disturb real rows, whatever bucket a batch lands in."""
import random

import pytest
import torch

from tpaserve.config import ModelConfig
from tpaserve.engine.cuda_graphs import DecodeGraphs, default_buckets
from tpaserve.engine.factory import build_engine
from tpaserve.models import T6
from tpaserve.models.generate import reference_generate
from tpaserve.sampling_params import SamplingParams


def test_default_buckets_cover_max_num_seqs():
    assert default_buckets(1) == [1]
    assert default_buckets(20)[-1] == 20 and default_buckets(20)[:4] == [1, 2, 4, 8]
    assert default_buckets(1000)[-1] == 256


@pytest.mark.parametrize("q_rank", [3, None])
def test_padded_decode_path_equals_reference(q_rank):
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=101, k_rank=2,
                      v_rank=1, q_rank=q_rank, max_position=128)
    model = T6(cfg).init_random(1).eval()
    eng = build_engine(model, num_blocks=64, block_size=4, max_num_batched_tokens=64,
                       max_num_seqs=12)
    graphs = DecodeGraphs(model, eng.cache, eng.runner.ops, [1, 4, 16], eng.max_model_len,
                          eng.device, capture=False)
    eng.runner.graphs = graphs
    calls = []
    run = graphs.run
    graphs.run = lambda *a: calls.append(len(a[0])) or run(*a)
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
    assert calls and any(c not in (1, 4, 16) for c in calls), "padding rows were exercised"
    for i, p in enumerate(prompts):
        assert done[str(i)] == reference_generate(model, p, params, None)
    eng.blocks.check()
    assert eng.blocks.num_free == eng.blocks.num_blocks


@pytest.mark.parametrize("q_rank", [3, None])
def test_padded_mixed_step_path_equals_reference(q_rank):
    """Mixed steps (prompt chunks + decode rows) through MixedGraphs' padded static buffers,
    eagerly: padding tokens (no slot, no sequence) and padding sequences (no queries) must not
    disturb real rows; steps with prompt logprobs fall back to the eager path."""
    from tpaserve.engine.mixed_graphs import MixedGraphs
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=101, k_rank=2,
                      v_rank=1, q_rank=q_rank, max_position=128)
    model = T6(cfg).init_random(2).eval()
    eng = build_engine(model, num_blocks=96, block_size=4, max_num_batched_tokens=48,
                       max_num_seqs=10)
    mixed = MixedGraphs(model, eng.cache, eng.runner.ops, [16, 48], [4, 10], eng.max_model_len,
                        eng.device, capture=False)
    eng.runner.mixed_graphs = mixed
    calls = []
    run = mixed.run
    mixed.run = lambda *a: calls.append((len(a[0]), len(a[4]))) or run(*a)
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
    eng.blocks.check()
    assert eng.blocks.num_free == eng.blocks.num_blocks


def test_decode_graph_context_class_follows_the_longest_sequence():
    cfg = ModelConfig(n_layer=1, n_head=5, head_dim=8, n_embd=32, vocab_size=101, k_rank=2,
                      v_rank=1, q_rank=3, max_position=5000)
    model = T6(cfg).init_random(1).eval()
    eng = build_engine(model, num_blocks=8, block_size=16, max_num_seqs=4)
    g = DecodeGraphs(model, eng.cache, eng.runner.ops, [1, 4], 5000, eng.device, capture=False)
    assert g.classes == [1024, 4096, 5000]
    for longest, want in ((1, 1024), (1024, 1024), (1025, 4096), (4097, 5000)):
        g.prepare([[0]], longest)
        assert g._class == want
