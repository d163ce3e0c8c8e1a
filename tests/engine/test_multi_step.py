"""Multi-step decode rounds (num_scheduler_steps > 1): the same tokens, texts and finish
reasons as ordinary steps, on the eager path and on the padded CUDA-graph path (run eagerly
here), while rounds really happen; stops inside a round drop the rest of the round;
blocks filled during a round are hashed for the prefix cache; rounds only form when every
scheduled request samples plainly (no logprobs, no knob that reads its output history)."""
from __future__ import annotations

import pytest

from tests.engine.test_engine_e2e import (
    GREEDY,
    SAMPLED,
    assert_drained,
    drive,
    make_model,
    random_prompts,
    record_steps,
    run,
    spm_tokenizer,
)
from tests.reference import reference_generate
from tpaserve.config import ConfigError
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.runner.graphs import StepGraphs
from tpaserve.sampling_params import SamplingParams

__all__ = ["spm_tokenizer"]      # a fixture, imported for the tokenizer tests


def engine(model, steps, **kw):
    args = dict(num_blocks=128, block_size=4, max_num_batched_tokens=64, max_num_seqs=32,
                device="cpu", num_scheduler_steps=steps)
    return build_engine(model, **{**args, **kw})


@pytest.fixture(scope="module")
def t6():
    return make_model(3)


def _mixed_requests(n: int, seed: int):
    prompts = random_prompts(n, 1, 30, seed=seed)
    reqs = []
    for i, p in enumerate(prompts):
        knobs = GREEDY if i % 2 else dict(SAMPLED, seed=100 + i)
        reqs.append((str(i), p, SamplingParams(max_tokens=1 + (5 * i) % 19, **knobs)))
    return reqs


@pytest.mark.parametrize("graph_path", [False, True], ids=["eager", "graph-path"])
def test_rounds_give_the_tokens_of_single_steps(t6, graph_path):
    reqs = _mixed_requests(10, seed=5)
    want = {rid: out.outputs[0].token_ids for rid, out in run(engine(t6, 1), reqs).items()}
    eng = engine(t6, 5)
    if graph_path:
        r = eng.core.runner
        r.graphs = StepGraphs(t6, eng.core.cache, r.ops, r.buf, r.workspace, [1, 4, 16],
                              [16, 64], [4, 32], eng.max_model_len, eng.core.device,
                              capture=False)
    steps = record_steps(eng)
    got = run(eng, reqs)
    assert {rid: out.outputs[0].token_ids for rid, out in got.items()} == want
    rounds = [s for s in steps if s.num_steps > 1]
    assert rounds, "no multi-step round happened"
    assert any(r.num_steps < 5 for s in rounds for r in s.requests), \
        "no request was cut short by its max_tokens inside a round"
    for rid, p, sp in reqs:
        if sp.greedy:
            assert want[rid] == reference_generate(t6, p, sp, None)
    assert_drained(eng)


def test_round_length_respects_max_tokens_and_context(t6):
    eng = engine(t6, 8, max_model_len=24)
    steps = record_steps(eng)
    out = run(eng, [("a", list(range(1, 13)), SamplingParams(max_tokens=12, **GREEDY)),
                    ("b", list(range(1, 5)), SamplingParams(max_tokens=3, **GREEDY))])
    assert len(out["a"].outputs[0].token_ids) == 12 and len(out["b"].outputs[0].token_ids) == 3
    for s in steps:
        for r in s.requests:     # never a slot past the request's last token
            assert r.start_pos + r.num_steps <= 24
    assert_drained(eng)


def test_eos_inside_a_round_ends_the_request_there(t6):
    p = random_prompts(1, 5, 5, seed=9)[0]
    free = run(engine(t6, 1), [("x", p, SamplingParams(max_tokens=20, temperature=0))])
    toks = free["x"].outputs[0].token_ids
    eos = toks[6]                      # a token the greedy path produces 7th (maybe earlier)
    cut = toks.index(eos) + 1
    m = make_model(3)
    for steps in (1, 4):
        eng = build_engine(m, num_blocks=64, block_size=4, num_scheduler_steps=steps)
        eng.core.eos_token_id = eos         # no tokenizer: set the engine's eos by hand
        out = run(eng, [("x", p, SamplingParams(max_tokens=20, temperature=0))])["x"]
        o = out.outputs[0]
        assert o.token_ids == toks[:cut] and o.finish_reason == "stop"
        assert_drained(eng)


def test_stop_string_inside_a_round(spm_tokenizer):
    tok = spm_tokenizer
    m = make_model(3, vocab=tok.vocab_size, seed=2)
    prompt = tok.encode("the quick brown fox")
    sp = SamplingParams(max_tokens=40, **GREEDY)
    full = run(engine(m, 1, tokenizer=tok), [("f", prompt, sp)])["f"].outputs[0]
    cands = [full.text[i:i + 2] for i in range(4, len(full.text) - 2)
             if all(c.isascii() and c.isalnum() for c in full.text[i:i + 2])]
    assert cands, f"no usable stop string in {full.text!r}"
    stop = cands[0]
    outs = {}
    for steps in (1, 6):
        eng = engine(m, steps, tokenizer=tok)
        rec = record_steps(eng)
        outs[steps] = run(eng, [("s", prompt, SamplingParams(max_tokens=40, stop=stop,
                                                            **GREEDY))])["s"].outputs[0]
        assert_drained(eng)
    assert any(s.num_steps > 1 for s in rec)
    one, six = outs[1], outs[6]
    assert six.text == one.text and stop not in six.text
    assert six.token_ids == one.token_ids and six.finish_reason == "stop" == one.finish_reason
    assert len(six.token_ids) < len(full.token_ids)


def test_blocks_filled_in_a_round_are_hashed_for_the_prefix_cache(t6):
    eng = engine(t6, 8)
    prompt = random_prompts(1, 6, 6, seed=4)[0]
    first = run(eng, [("a", prompt, SamplingParams(max_tokens=17, **GREEDY))])["a"]
    follow = prompt + first.outputs[0].token_ids            # 23 tokens: 5 full blocks of 4
    again = run(eng, [("b", follow + [1, 2], SamplingParams(max_tokens=2, **GREEDY))])["b"]
    assert again.num_cached_tokens == 20                   # blocks written inside rounds hit
    assert_drained(eng)


def test_small_cache_rounds_fall_back_to_single_tokens(t6):
    reqs = [(str(i), p, SamplingParams(max_tokens=12, **GREEDY))
            for i, p in enumerate(random_prompts(6, 3, 9, seed=6))]
    want = {rid: o.outputs[0].token_ids for rid, o in run(engine(t6, 1), reqs).items()}
    eng = engine(t6, 8, num_blocks=14)     # no room for 8 extra slots each: preemption too
    got = run(eng, reqs)
    assert {rid: o.outputs[0].token_ids for rid, o in got.items()} == want
    assert_drained(eng)


def test_rounds_only_when_every_request_just_decodes(t6):
    eng = engine(t6, 4, max_num_seqs=2)
    steps = record_steps(eng)
    plain = SamplingParams(max_tokens=10, **GREEDY)
    eng.add_request("a", [1, 2, 3], plain)
    eng.add_request("b", [4, 5], SamplingParams(max_tokens=10, logprobs=2, **GREEDY))
    eng.add_request("c", [6, 7], plain)            # waits for a free seat
    drive(eng)
    for s in steps:
        ids = {r.request_id.split("#")[0] for r in s.requests}
        if s.num_steps > 1:
            assert "b" not in ids                   # logprobs: one token a step
            # step 0 of a round may finish a prompt, but every request samples in it
            assert all(r.sample for r in s.requests)
    assert any(s.num_steps > 1 for s in steps)      # "a" and "c" alone, at the end
    for knobs in (dict(repetition_penalty=1.3), dict(min_tokens=2), dict(presence_penalty=0.5)):
        eng = engine(t6, 4)
        steps = record_steps(eng)
        run(eng, [("k", [1, 2, 3], SamplingParams(max_tokens=8, **GREEDY, **knobs))])
        assert all(s.num_steps == 1 for s in steps), knobs


def test_num_scheduler_steps_is_checked(t6):
    with pytest.raises(ConfigError, match="num-scheduler-steps"):
        engine(t6, 0)
    with pytest.raises(ConfigError, match="num-scheduler-steps"):
        engine(t6, 65)
