"""The paged engine against the naive oracle (models/generate.py) on tiny random T6 and
T6-KVonly models, CPU, fp32 (the torch reference attention backend).

Whatever the engine does - batching 32 requests, chunked prefill, preemption and
recomputation, prefix-cache hits, forked n > 1 siblings - each request's tokens must equal
reference_generate's, and its logprobs the reference's log_softmax. Every test ends with
`assert_drained`: no request left, every block free (hashed ones too), `check()` holds.
"""
from __future__ import annotations

import random

import pytest
import torch

from tests.models.conftest import train_spm
from tests.reference import reference_generate, reference_prompt_logprobs
from tpaserve.config import ModelConfig
from tpaserve.core.engine_core import MAX_CONSECUTIVE_FAILURES
from tpaserve.exceptions import EngineDeadError, RequestRejected
from tpaserve.frontend.llm_engine import LLMEngine, build_engine
from tpaserve.frontend.outputs import RequestOutput
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams

V = 101
SHAPE = dict(n_layer=2, n_head=5, head_dim=8, n_embd=32, k_rank=2, v_rank=2, max_position=256)
GREEDY = dict(temperature=0.0, ignore_eos=True)
SAMPLED = dict(temperature=0.8, top_p=0.9, ignore_eos=True)
LP_TOL = 1e-4          # fp32 paged attention vs fp32 full attention, through log_softmax


def make_model(q_rank: int | None, vocab: int = V, seed: int = 1) -> T6:
    # std 0.3: peaked enough that greedy paths differ between prompts, and sampling varies
    cfg = ModelConfig(**SHAPE, vocab_size=vocab, q_rank=q_rank)
    return T6(cfg).init_random(seed=seed, std=0.3).eval()


@pytest.fixture(scope="module", params=[3, None], ids=["t6", "t6-kvonly"])
def model(request) -> T6:
    return make_model(request.param)


@pytest.fixture(scope="module")
def t6() -> T6:
    return make_model(3)


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    from tpaserve.models.tokenizer import load_tokenizer
    return load_tokenizer(train_spm(tmp_path_factory.mktemp("spm_tokenizer")).parent)


ENGINE_ARGS = dict(num_blocks=128, block_size=4, max_num_batched_tokens=64, max_num_seqs=32,
                   device="cpu")


@pytest.fixture(autouse=True, params=[(1, False), (1, True), (4, True)],
                ids=["steps1-sync", "steps1-async", "steps4-async"])
def scheduler_steps(request, monkeypatch):
    """Every test runs with ordinary steps, with async scheduling (a step in flight while
    the next is planned), and with multi-step decode rounds of 4 on top."""
    steps, overlap = request.param
    monkeypatch.setitem(ENGINE_ARGS, "num_scheduler_steps", steps)
    monkeypatch.setitem(ENGINE_ARGS, "async_scheduling", overlap)
    return steps


def engine(model: T6, **kw) -> LLMEngine:
    return build_engine(model, **{**ENGINE_ARGS, **kw})


def record_steps(eng: LLMEngine) -> list:
    """Wraps runner.execute; returns the list the scheduler outputs are appended to."""
    steps, execute = [], eng.core.runner.execute
    eng.core.runner.execute = lambda sched, **kw: steps.append(sched) or execute(sched, **kw)
    return steps


def run(eng: LLMEngine, requests, max_steps: int = 5000) -> dict[str, RequestOutput]:
    """Add (id, prompt, params) requests, step to the end; final outputs by id. Also checks
    that the streamed deltas add up to the final cumulative token ids and text."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    return drive(eng, max_steps)


def drive(eng: LLMEngine, max_steps: int = 5000, check_stream: bool = True
          ) -> dict[str, RequestOutput]:
    done, deltas, texts = {}, {}, {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            break
        for out in eng.step():
            for o in out.outputs:
                deltas.setdefault((out.request_id, o.index), []).extend(o.token_ids_delta)
                key = (out.request_id, o.index)
                texts[key] = texts.get(key, "") + o.text_delta
            if out.finished:
                done[out.request_id] = out
    assert not eng.has_unfinished_requests(), "the engine stopped making progress"
    for rid, out in done.items():
        for o in out.outputs if check_stream else ():
            assert deltas[(rid, o.index)] == o.token_ids
            assert texts[(rid, o.index)] == o.text
    return done


def assert_drained(eng: LLMEngine) -> None:
    s, bm = eng.core.scheduler, eng.core.blocks
    bm.check()
    assert not eng.has_unfinished_requests() and not eng.processor.requests and not eng.processor.seq_to_request
    assert not s.requests and not s.waiting and not s.running
    assert bm.tables == {} and bm.num_free == bm.num_blocks


def tokens(out: RequestOutput, i: int = 0) -> list[int]:
    return out.outputs[i].token_ids


def random_prompts(n: int, lo: int, hi: int, seed: int, vocab: int = V) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


@torch.no_grad()
def ref_logprobs(model: T6, ids: list[int], vocab: int = V) -> torch.Tensor:
    """log_softmax of the reference's next-token logits after ids: (vocab,)."""
    x = model(torch.tensor(ids), torch.arange(len(ids)), FullSequenceAttention([0, len(ids)]))
    return torch.log_softmax(model.compute_logits(x[-1:])[0, :vocab].float(), dim=-1)


# ---- greedy under every scheduling regime ----------------------------------------------------

@pytest.mark.parametrize("block_size", [4, 16])
def test_32_concurrent_greedy_requests_equal_reference(model, block_size):
    prompts = random_prompts(32, 1, 60, seed=block_size)
    rng = random.Random(7)
    params = [SamplingParams(max_tokens=rng.randint(1, 16), **GREEDY) for _ in prompts]
    params[5] = SamplingParams(max_tokens=None, **GREEDY)           # up to the context limit
    prompts[5] = prompts[5][:1] * 240
    eng = engine(model, block_size=block_size, num_blocks=4096 // block_size,
                 max_num_batched_tokens=96)
    done = run(eng, [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None), i
        assert done[str(i)].outputs[0].finish_reason == "length"
    assert len(tokens(done["5"])) == 256 - 240
    assert_drained(eng)


def test_preemption_under_a_small_cache_keeps_outputs(model):
    prompts = random_prompts(10, 8, 25, seed=11)
    params = [SamplingParams(max_tokens=20, **(GREEDY if i % 2 else dict(SAMPLED, seed=i)))
              for i in range(10)]
    eng = engine(model, num_blocks=12, block_size=4)            # 48 token slots in all
    done = run(eng, [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts, params))])
    assert eng.core.scheduler.num_preemptions > 0
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None), i
    assert_drained(eng)


def test_chunked_prefill_under_a_small_token_budget(model):
    prompts = random_prompts(6, 20, 50, seed=3)
    sp = SamplingParams(max_tokens=6, **GREEDY)
    eng = engine(model, max_num_batched_tokens=7)
    steps = record_steps(eng)
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    partial = [r for s in steps for r in s.requests if not r.sample]       # prompt chunks
    assert any(r.start_pos > 0 for r in partial), "a prompt was computed in several chunks"
    # the budget holds for every model step (a round's later steps compute one position
    # per request, and step 0 holds them all)
    assert all(sum(r.num_tokens for r in s.requests) <= 7 for s in steps)
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None)
    assert_drained(eng)


def test_shared_prefixes_hit_the_prefix_cache(model):
    rng = random.Random(5)
    prefix = [rng.randrange(V) for _ in range(26)]
    prompts = [prefix + [rng.randrange(V) for _ in range(rng.randint(1, 9))] for _ in range(8)]
    sp = SamplingParams(max_tokens=8, **GREEDY)
    eng = engine(model, num_blocks=64, block_size=4)
    first = run(eng, [("warm", prompts[0], sp)])
    assert first["warm"].num_cached_tokens == 0
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    assert eng.core.blocks.prefix_hits > 0
    assert all(done[str(i)].num_cached_tokens >= 24 for i in range(8))
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None)
    assert_drained(eng)
    # the same prefix in one batch: later requests hit blocks computed in the same step
    eng2 = engine(model, num_blocks=64, block_size=4)
    done = run(eng2, [(str(i), p, sp) for i, p in enumerate(prompts)])
    assert eng2.core.blocks.prefix_hits > 0
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(model, p, sp, None)
    assert_drained(eng2)


def test_prefix_cache_hits_after_preemption_and_eviction(t6):
    rng = random.Random(9)
    prefix = [rng.randrange(V) for _ in range(16)]
    prompts = [prefix + [rng.randrange(V) for _ in range(rng.randint(1, 12))] for _ in range(12)]
    sp = SamplingParams(max_tokens=14, **GREEDY)
    eng = engine(t6, num_blocks=14, block_size=4, max_num_batched_tokens=16)
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    assert eng.core.scheduler.num_preemptions > 0 and eng.core.blocks.prefix_hits > 0
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(t6, p, sp, None)
    assert_drained(eng)


def test_follow_up_after_same_step_preemption_reads_only_written_blocks(t6):
    """X's decode token fills a block (hashed when scheduled); Y, later in the running list
    and of higher priority, cannot grow and preempts X and then itself. A follow-up prompt
    that continues X's tokens used to hit X's never-written block and read garbage."""
    sp = SamplingParams(max_tokens=12, **GREEDY)
    eng = engine(t6, num_blocks=10, block_size=4, max_num_batched_tokens=16,
                 scheduling_policy="priority")
    eng.add_request("Z", list(range(1, 13)), sp, priority=0)
    eng.add_request("X", list(range(5, 12)), sp, priority=2)
    eng.step()
    eng.add_request("Y", list(range(30, 58)), SamplingParams(max_tokens=4, **GREEDY), priority=1)
    eng.step()
    eng.step()
    assert eng.core.scheduler.num_preemptions == 2
    follow = eng.core.scheduler.requests["X#0"].token_ids + [1, 2, 3]
    eng.add_request("W", follow, SamplingParams(max_tokens=6, **GREEDY), priority=-1)
    done = drive(eng, check_stream=False)
    assert tokens(done["W"]) == reference_generate(t6, follow, SamplingParams(max_tokens=6,
                                                                              **GREEDY), None)
    assert_drained(eng)


# ---- seeded sampling --------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_across_batch_mixes(model):
    targets = [(f"t{i}", p, SamplingParams(max_tokens=12, seed=100 + i, **SAMPLED))
               for i, p in enumerate(random_prompts(3, 5, 30, seed=21))]
    noise = [(f"n{i}", p, SamplingParams(max_tokens=10, **(SAMPLED if i % 3 else GREEDY),
                                          seed=None if i % 2 else 7 + i))
             for i, p in enumerate(random_prompts(10, 1, 40, seed=22))]
    want = {rid: reference_generate(model, p, sp, None) for rid, p, sp in targets}
    alone = run(engine(model), targets)
    mix = noise[:5] + targets[::-1] + noise[5:]
    eng = engine(model, num_blocks=20, max_num_batched_tokens=9, block_size=4)
    mixed = run(eng, mix)
    assert eng.core.scheduler.num_preemptions > 0
    for rid, _, _ in targets:
        assert tokens(alone[rid]) == want[rid] == tokens(mixed[rid]), rid
    assert_drained(eng)


def test_n_siblings_share_prompt_blocks_and_are_seeded_reproducibly(model):
    prompt = random_prompts(1, 18, 18, seed=4)[0]
    sp = SamplingParams(n=3, max_tokens=10, seed=42, **SAMPLED)
    eng = engine(model, block_size=4)
    tables = []
    schedule = eng.core.scheduler.schedule

    def spy():
        out = schedule()
        tables.append({rid: list(t) for rid, t in eng.core.blocks.tables.items()})
        return out
    eng.core.scheduler.schedule = spy
    done = run(eng, [("g", prompt, sp)])
    shared = [t for t in tables if {"g#0", "g#1", "g#2"} <= t.keys()]
    assert shared and all(t["g#1"][:4] == t["g#0"][:4] == t["g#2"][:4] for t in shared)
    outs = done["g"].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    # sibling i samples with seed + i, so each equals the oracle run with that seed
    for i, o in enumerate(outs):
        want = reference_generate(model, prompt, SamplingParams(max_tokens=10, seed=42 + i,
                                                                **SAMPLED), None)
        assert o.token_ids == want
    assert len({tuple(o.token_ids) for o in outs}) > 1
    assert_drained(eng)
    # again, mixed with other traffic and under preemption
    eng2 = engine(model, num_blocks=14, block_size=4, max_num_batched_tokens=8)
    others = [(str(i), p, SamplingParams(max_tokens=12, **SAMPLED))
              for i, p in enumerate(random_prompts(5, 5, 20, seed=8))]
    again = run(eng2, others[:2] + [("g", prompt, sp)] + others[2:])
    assert [o.token_ids for o in again["g"].outputs] == [o.token_ids for o in outs]
    assert_drained(eng2)


def test_greedy_n_siblings_equal_reference(t6):
    prompt = random_prompts(1, 9, 9, seed=12)[0]
    sp = SamplingParams(n=4, max_tokens=7, **GREEDY)
    eng = engine(t6)
    done = run(eng, [("g", prompt, sp)])
    want = reference_generate(t6, prompt, sp, None)
    assert [o.token_ids for o in done["g"].outputs] == [want] * 4
    assert_drained(eng)


# ---- logprobs ---------------------------------------------------------------------------------

def assert_logprob_entries(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if w is None:
            assert g is None
            continue
        assert g[0] == pytest.approx(w[0], abs=LP_TOL)
        assert [t for t, _ in g[1]] == [t for t, _ in w[1]]
        assert [p for _, p in g[1]] == pytest.approx([p for _, p in w[1]], abs=LP_TOL)


@pytest.mark.parametrize("budget", [64, 5])
def test_prompt_logprobs_equal_reference(model, budget):
    prompts = random_prompts(4, 2, 30, seed=31) + [[17]]
    sp = SamplingParams(max_tokens=0, prompt_logprobs=3)
    eng = engine(model, max_num_batched_tokens=budget)
    # a warm prefix cache must not skip prompt positions that still need scoring
    run(eng, [("warm", prompts[0] + [1, 2], SamplingParams(max_tokens=1, **GREEDY))])
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)]
               + [("other", prompts[1], SamplingParams(max_tokens=5, **GREEDY))])
    for i, p in enumerate(prompts):
        out = done[str(i)]
        assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
        assert out.prompt_logprobs[0] is None
        assert_logprob_entries(out.prompt_logprobs, reference_prompt_logprobs(model, p, 3))
    assert_drained(eng)


def test_prompt_logprobs_with_generation_preemption_and_n(t6):
    prompts = random_prompts(5, 10, 24, seed=32)
    sp = SamplingParams(max_tokens=10, prompt_logprobs=2, n=2, **GREEDY)
    eng = engine(t6, num_blocks=16, block_size=4, max_num_batched_tokens=6)
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    assert eng.core.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert_logprob_entries(done[str(i)].prompt_logprobs, reference_prompt_logprobs(t6, p, 2))
        want = reference_generate(t6, p, sp, None)
        assert [o.token_ids for o in done[str(i)].outputs] == [want, want]
    assert_drained(eng)


@pytest.mark.parametrize("extra", [GREEDY, dict(SAMPLED, seed=3)], ids=["greedy", "seeded"])
def test_sampled_token_logprobs_are_log_softmax_of_reference_logits(model, extra):
    prompts = random_prompts(3, 3, 20, seed=41)
    sp = SamplingParams(max_tokens=8, logprobs=4, **extra)
    eng = engine(model)
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        o = done[str(i)].outputs[0]
        assert o.token_ids == reference_generate(model, p, sp, None)
        assert len(o.logprobs) == len(o.token_ids)
        ids = list(p)
        for tok, (chosen, top) in zip(o.token_ids, o.logprobs):
            lp = ref_logprobs(model, ids)
            assert chosen == pytest.approx(lp[tok].item(), abs=LP_TOL)
            best = lp.topk(4)
            assert [t for t, _ in top] == best.indices.tolist()
            assert [v for _, v in top] == pytest.approx(best.values.tolist(), abs=LP_TOL)
            ids.append(tok)
        assert o.cumulative_logprob == pytest.approx(sum(c for c, _ in o.logprobs), abs=1e-6)
    assert_drained(eng)


# ---- request knobs -------------------------------------------------------------------------------

KNOBS = [
    dict(presence_penalty=1.5, **GREEDY),
    dict(frequency_penalty=1.2, **GREEDY),
    dict(repetition_penalty=1.8, **GREEDY),
    dict(presence_penalty=-0.5, frequency_penalty=0.7, repetition_penalty=0.6, **GREEDY),
    dict(presence_penalty=0.4, frequency_penalty=0.9, repetition_penalty=1.3, seed=9,
         temperature=1.1, top_k=20, min_p=0.05, ignore_eos=True),
    dict(logit_bias={5: 3.0, 17: -100.0}, **GREEDY),
    dict(top_k=1, temperature=1.0, ignore_eos=True),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=range(len(KNOBS)))
def test_penalties_and_knobs_equal_reference(t6, knobs):
    prompts = random_prompts(4, 3, 25, seed=51)
    sp = SamplingParams(max_tokens=14, **knobs)
    eng = engine(t6, max_num_batched_tokens=8, num_blocks=30)
    done = run(eng, [(str(i), p, sp) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert tokens(done[str(i)]) == reference_generate(t6, p, sp, None), i
    assert_drained(eng)


def test_stop_token_ids_and_min_tokens(t6):
    prompt = random_prompts(1, 12, 12, seed=61)[0]
    free = reference_generate(t6, prompt, SamplingParams(max_tokens=16, **GREEDY), None)
    stop = free[4]
    k = free.index(stop)
    eng = engine(t6)
    cases = {"stop": SamplingParams(max_tokens=16, stop_token_ids=[stop], temperature=0),
             "late": SamplingParams(max_tokens=16, stop_token_ids=[stop], temperature=0,
                                    min_tokens=k + 2)}
    done = run(eng, [(rid, prompt, sp) for rid, sp in cases.items()])
    o = done["stop"].outputs[0]
    assert o.token_ids == free[:k + 1] and o.finish_reason == "stop" and o.stop_reason == stop
    for rid, sp in cases.items():
        assert tokens(done[rid]) == reference_generate(t6, prompt, sp, None)
    assert len(tokens(done["late"])) > k + 1
    assert_drained(eng)


# ---- with a tokenizer: eos, stop strings, text ------------------------------------------------

@pytest.fixture(scope="module")
def tok_model(spm_tokenizer) -> T6:
    return make_model(3, vocab=spm_tokenizer.vocab_size, seed=2)


def test_stop_string_cuts_text_right_before_it(tok_model, spm_tokenizer):
    tok = spm_tokenizer
    prompt = tok.encode("the quick brown fox")
    eng = engine(tok_model, tokenizer=tok)
    full = run(eng, [("free", prompt, SamplingParams(max_tokens=40, **GREEDY))])["free"].outputs[0]
    text = full.text
    assert text == tok.decode(prompt + full.token_ids)[len(tok.decode(prompt)):]
    # a stop string from the middle of the (random, mostly byte-salad) text, first seen at `at`
    cands = [text[i:i + 2] for i in range(3, len(text) - 2)
             if all(c.isascii() and (c.isalnum() or c == " ") for c in text[i:i + 2])]
    at, stop = next(((text.index(s), s) for s in cands if text.index(s) >= 3), (None, None))
    assert stop, f"no usable stop string in {text!r}"
    done = run(eng, [("cut", prompt, SamplingParams(max_tokens=40, stop=[stop, "never-seen"],
                                                    **GREEDY)),
                     ("keep", prompt, SamplingParams(max_tokens=40, stop=stop,
                                                     include_stop_str_in_output=True, **GREEDY))])
    cut, keep = done["cut"].outputs[0], done["keep"].outputs[0]
    assert cut.text == text[:at] and stop not in cut.text
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)]
    assert len(cut.token_ids) < len(full.token_ids)
    assert keep.text == text[:at + len(stop)] and keep.finish_reason == "stop"
    assert_drained(eng)


def test_eos_ends_request_and_is_not_in_text(tok_model, spm_tokenizer):
    tok = spm_tokenizer
    eos = tok.eos_token_id
    prompt = tok.encode("hello world")
    # bias eos up so that it wins as soon as min_tokens lets it
    sp = SamplingParams(max_tokens=20, temperature=0, min_tokens=3, logit_bias={eos: 100.0})
    eng = engine(tok_model, tokenizer=tok)
    done = run(eng, [("e", prompt, sp), ("plain", prompt, SamplingParams(max_tokens=12,
                                                                       temperature=0))])
    o = done["e"].outputs[0]
    assert len(o.token_ids) == 4 and o.token_ids[-1] == eos and o.finish_reason == "stop"
    assert o.text == tok.decode(prompt + o.token_ids[:3])[len(tok.decode(prompt)):]
    for rid in ("e", "plain"):
        sp_ = sp if rid == "e" else SamplingParams(max_tokens=12, temperature=0)
        assert tokens(done[rid]) == reference_generate(tok_model, prompt, sp_, eos,
                                                       vocab_size=tok.vocab_size)
    assert_drained(eng)


# ---- abort, admission, failures ------------------------------------------------------------------

def test_abort_mid_generation_frees_blocks_at_once(model):
    prompts = random_prompts(5, 6, 20, seed=71)
    sp = SamplingParams(max_tokens=30, **GREEDY)
    eng = engine(model, max_num_seqs=4)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, sp if i != 2 else SamplingParams(n=2, max_tokens=30, **GREEDY))
    for _ in range(4):
        eng.step()
    assert eng.core.blocks.table("1#0") and eng.core.blocks.table("2#1")
    used = eng.core.blocks.num_used
    eng.abort_request("1")                        # running
    eng.abort_request("2")                        # running, both siblings
    eng.abort_request("4")                        # still waiting (max_num_seqs=4)
    eng.abort_request("nope")
    eng.core.blocks.check()
    assert eng.core.blocks.num_used < used
    assert all(eng.core.blocks.table(r) == [] for r in ("1#0", "2#0", "2#1", "4#0"))
    assert set(eng.core.scheduler.requests) == {"0#0", "3#0"}
    done = drive(eng, check_stream=False)         # steps before drive() were not collected
    assert set(done) == {"0", "3"}
    for i in (0, 3):
        assert tokens(done[str(i)]) == reference_generate(model, prompts[i], sp, None)
    assert_drained(eng)


def test_admission_errors_leave_nothing_behind(t6):
    eng = engine(t6, num_blocks=8, block_size=4)
    with pytest.raises(RequestRejected, match="256"):
        eng.add_request("long", [1] * 250, SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="cache blocks"):
        eng.add_request("big", [1] * 30, SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        eng.add_request("oov", [1, V], SamplingParams())
    with pytest.raises(RequestRejected, match="stop strings need a tokenizer"):
        eng.add_request("stop", [1], SamplingParams(stop="x"))
    with pytest.raises(RequestRejected, match="empty"):
        eng.add_request("empty", [], SamplingParams(n=3))
    eng.add_request("ok", [1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(RequestRejected, match="already in flight"):
        eng.add_request("ok", [1, 2], SamplingParams(max_tokens=2))
    drive(eng)
    assert_drained(eng)


def test_failed_step_fails_only_its_requests_and_engine_goes_on(model):
    prompts = random_prompts(4, 5, 15, seed=81)
    sp = SamplingParams(max_tokens=8, **GREEDY)
    eng = engine(model, max_num_seqs=2)
    execute, calls = eng.core.runner.execute, []

    def flaky(sched, **kw):
        if sched.requests:
            calls.append([r.request_id for r in sched.requests])
            if len(calls) == 3:
                raise RuntimeError("device fell over")
        return execute(sched, **kw)
    eng.core.runner.execute = flaky
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, sp)
    outs = []
    while len(calls) < 3:
        outs.append(eng.step())
    # (with async scheduling the call also returns the step before's outputs)
    failed = {o.request_id for o in outs[-1] if o.error is not None}
    assert failed == {r.split("#")[0] for r in calls[2]} and len(failed) == 2
    for o in outs[-1]:
        if o.error is not None:
            assert o.finished and o.error.kind == "step_failed"
            assert "device fell over" in o.error.message
            assert o.outputs[0].finish_reason == "error"
    assert not eng.core.blocks.cached                  # the failed step's blocks: dropped
    eng.core.blocks.check()
    done = {o.request_id: o for step in outs for o in step if o.finished and o.error is None}
    done.update(drive(eng))
    assert set(done) == {"0", "1", "2", "3"} - failed
    for i, out in done.items():
        assert tokens(out) == reference_generate(model, prompts[int(i)], sp, None)
    more = run(eng, [("late", prompts[0], sp)])
    assert tokens(more["late"]) == reference_generate(model, prompts[0], sp, None)
    assert_drained(eng)


def test_consecutive_failures_kill_the_engine(t6):
    eng = engine(t6)

    def broken(sched, **kw):
        raise RuntimeError("still broken")
    eng.core.runner.execute = broken
    for k in range(MAX_CONSECUTIVE_FAILURES - 1):
        eng.add_request(str(k), [1, 2, 3], SamplingParams(max_tokens=3))
        outs = eng.step()
        assert [o.error is not None for o in outs] == [True]
    eng.add_request("last", [1, 2, 3], SamplingParams(max_tokens=3))
    with pytest.raises(EngineDeadError, match="still broken"):
        eng.step()
    assert_drained(eng)


def test_nonfinite_logits_end_the_request_with_an_error_never_a_token(t6):
    """Fault injection: from the 4th logits computation on, the model's logits for the
    requests' rows are NaN. They end with finish_reason "error" and an error; the tokens
    they had are the reference's prefix (nothing drawn from NaN); the engine then serves a
    new request exactly, and nothing leaks."""
    sp = SamplingParams(max_tokens=12, **GREEDY)
    prompts = {"a": [1, 2, 3, 4, 5], "b": [9, 8, 7]}
    eng = engine(t6)
    model, compute, calls = eng.core.runner.model, eng.core.runner.model.compute_logits, [0]

    def poisoned(hidden):
        calls[0] += 1
        out = compute(hidden)
        return out.fill_(float("nan")) if 4 <= calls[0] <= 40 else out
    model.compute_logits = poisoned
    try:
        done = run(eng, [(rid, p, sp) for rid, p in prompts.items()])
    finally:
        model.compute_logits = compute
    for rid, p in prompts.items():
        out = done[rid]
        assert out.outputs[0].finish_reason == "error" and out.error is not None, out
        assert "not finite" in out.error.message
        got = tokens(out)
        assert len(got) < 12 and got == reference_generate(t6, p, sp, None)[:len(got)]
    assert_drained(eng)
    again = run(eng, [("c", [4, 4, 4], sp)])
    assert tokens(again["c"]) == reference_generate(t6, [4, 4, 4], sp, None)
    assert_drained(eng)
