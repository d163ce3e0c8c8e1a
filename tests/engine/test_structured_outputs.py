"""Structured outputs through the engine (a random T6 and a small sentencepiece tokenizer):
every constrained output satisfies its constraint and ends with "stop"; the same tokens
come out with multi-step rounds, chunked prefill, preemption under a tiny cache, and
n > 1; unconstrained requests batched with constrained ones get exactly the tokens they get
alone; logprobs of a constrained row are those of the masked distribution."""
from __future__ import annotations

import json
import math
import re

import jsonschema
import pytest

from tests.engine.test_engine_e2e import assert_drained, make_model, run, spm_tokenizer
from tpaserve.engine.contracts import RunnerOutput
from tpaserve.engine.request import RequestStatus
from tpaserve.exceptions import SamplingParamsError
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["spm_tokenizer"]      # a fixture

SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                         "tag": {"enum": ["red", "blue"]},
                         "name": {"type": "string", "pattern": "^[a-z]{1,3}$"}},
          "required": ["id", "tag", "name"], "additionalProperties": False}
REGEX = r"[a-z]{2,4}@[a-z]{2,3}\.(com|org)"
CHOICE = ["yes", "no", "maybe so"]
GRAMMAR = 'start: "(" NUM ("," NUM)? ("," NUM)? ")"\nNUM: /[0-9]{1,3}/'
GRAMMAR_RE = r"\(\d{1,3}(,\d{1,3}){0,2}\)"
ENGINE = dict(num_blocks=256, block_size=4, max_num_batched_tokens=256, max_num_seqs=16,
              device="cpu", num_scheduler_steps=1)


@pytest.fixture(scope="module")
def tok_model(spm_tokenizer):
    return make_model(3, vocab=spm_tokenizer.vocab_size, seed=2)


def _so(**kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)


def workload(tok):
    """(id, prompt, params, check) for constrained requests, greedy and seeded sampled."""
    prompts = [tok.encode(t) for t in ("the quick brown fox", "hello world, again",
                                        "a b c d e f", "numbers one two three")]
    sampled = dict(temperature=0.9, top_p=0.95)
    specs = [
        ("json", _so(json=SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ("regex", _so(regex=REGEX), lambda t: _full(REGEX, t)),
        ("choice", _so(choice=CHOICE), lambda t: _check(t in CHOICE, t)),
        ("grammar", _so(grammar=GRAMMAR), lambda t: _full(GRAMMAR_RE, t)),
    ]
    reqs = []
    for i, (name, so, check) in enumerate(specs):
        for j, knobs in enumerate((dict(temperature=0.0), dict(sampled, seed=10 + i))):
            reqs.append((f"{name}-{j}", prompts[(i + j) % len(prompts)],
                         SamplingParams(max_tokens=120, structured_outputs=so,
                                        n=2 if j else 1, **knobs), check))
    return reqs


def _full(pattern: str, text: str) -> None:
    assert re.fullmatch(pattern, text), (pattern, text)


def _check(ok: bool, text: str) -> None:
    assert ok, text


def plain_requests(tok):
    return [(f"plain-{i}", tok.encode(t), SamplingParams(max_tokens=12, temperature=t0,
                                                         seed=5, ignore_eos=True))
            for i, (t, t0) in enumerate((("once upon a time", 0.0), ("so it goes", 1.0)))]


def outputs(eng, reqs):
    done = run(eng, [r[:3] for r in reqs])
    assert_drained(eng)
    return {rid: [o.token_ids for o in out.outputs] for rid, out in done.items()}, done


def test_constraints_hold_and_survive_rounds_chunks_and_preemption(tok_model, spm_tokenizer):
    tok = spm_tokenizer
    reqs = workload(tok) + plain_requests(tok)
    base_ids, done = outputs(build_engine(tok_model, tokenizer=tok, **ENGINE), reqs)
    for rid, _, params, check in reqs[:-2]:
        for o in done[rid].outputs:
            assert o.finish_reason == "stop", (rid, o.text, o.finish_reason)
            check(o.text)
    # the unconstrained requests: exactly what they get alone (with rounds and async there)
    alone, _ = outputs(build_engine(tok_model, tokenizer=tok, **{**ENGINE,
                                                                 "num_scheduler_steps": 4}),
                       plain_requests(tok))
    assert {k: v for k, v in base_ids.items() if k.startswith("plain")} == alone

    variants = {"sync": dict(async_scheduling=False),
                "rounds": dict(num_scheduler_steps=4),
                "chunked": dict(max_num_batched_tokens=7),
                "preempt": dict(num_blocks=40, max_num_batched_tokens=64)}
    for name, kw in variants.items():
        eng = build_engine(tok_model, tokenizer=tok, **{**ENGINE, **kw})
        ids, _ = outputs(eng, reqs)
        assert ids == base_ids, name
        if name == "preempt":
            assert eng.core.scheduler.num_preemptions > 0


def test_logprobs_are_those_of_the_masked_distribution(tok_model, spm_tokenizer):
    tok = spm_tokenizer
    eng = build_engine(tok_model, tokenizer=tok, **ENGINE)
    sp = SamplingParams(max_tokens=10, temperature=0, logprobs=5,
                        structured_outputs=_so(choice=["ab", "cd"]))
    free = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    done = run(eng, [("c", tok.encode("x y"), sp), ("f", tok.encode("x y"), free)])
    o = done["c"].outputs[0]
    assert o.text in ("ab", "cd") and o.finish_reason == "stop"
    chosen, top = o.logprobs[0]
    # only tokens that start an allowed text are candidates, and they carry all the mass
    texts = {t: tok.decode([t]) for t, _ in top}
    assert all(("ab".startswith(s) or "cd".startswith(s)) and s for s in texts.values()), texts
    assert len(top) < 5 and math.isclose(sum(math.exp(lp) for _, lp in top), 1.0, rel_tol=1e-4)
    # more likely than under the unmasked distribution
    raw_top = dict(done["f"].outputs[0].logprobs[0][1])
    first = o.token_ids[0]
    assert first not in raw_top or chosen >= raw_top[first]
    assert_drained(eng)


@pytest.mark.parametrize("kw,param", [
    (dict(regex="a(b"), "structured_outputs.regex"),
    (dict(json={"type": "strin"}), "structured_outputs.json"),
    (dict(json="{not json"), "structured_outputs.json"),
    (dict(grammar="start: nothing_here"), "structured_outputs.grammar"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(regex="a", choice=["b"]), "structured_outputs"),
    (dict(), "structured_outputs"),
])
def test_malformed_constraints_name_the_field(kw, param):
    with pytest.raises(SamplingParamsError) as e:
        StructuredOutputsParams(**kw)
    assert e.value.param == param


def test_an_engine_without_a_tokenizer_refuses_constrained_requests(tok_model):
    eng = build_engine(tok_model, **ENGINE)
    with pytest.raises(Exception, match="tokenizer"):
        eng.add_request("x", [1, 2, 3], SamplingParams(structured_outputs=_so(choice=["a"])))
    assert_drained(eng)



def test_a_request_whose_grammar_compiles_is_passed_over_not_waited_for():
    """Scheduler alone (pure Python): a waiting request whose grammar is not ready stays
    queued while the requests behind it run; once ready it is scheduled, in a round with
    the others (the runner fills its masks step by step)."""
    from tests.engine.test_scheduler import make, req

    class Pending:
        ready = False
    s, bm = make(steps=4)
    slow = req("slow", [1, 2, 3], structured_outputs=_so(choice=["a"]))
    slow.grammar = Pending()
    s.add_requests([slow])
    s.add_requests([req("fast", [4, 5, 6])])
    assert s.num_constrained == 1 and not s.needs_history
    out = s.schedule()
    assert [r.request_id for r in out.requests] == ["fast"] and s.waiting == [slow]
    slow.grammar.ready = True
    s.update(out, RunnerOutput(sampled={"fast": [7]}))
    out = s.schedule()
    assert {r.request_id for r in out.requests} == {"fast", "slow"}
    assert out.num_steps == 4                       # a round holds constrained rows too
    s.finish("slow", RequestStatus.FINISHED_ABORTED)
    s.finish("fast", RequestStatus.FINISHED_ABORTED)
    assert s.num_constrained == 0 and not s.needs_history and bm.num_free == bm.num_blocks


def test_bitmask_sets_exactly_the_disallowed_logits_to_minus_inf():
    """Bit t % 32 of word t // 32; a vocabulary that is not a multiple of 32 and logits
    padded past it; an all-ones (-1) row is untouched."""
    import numpy as np
    import torch

    from tpaserve.runner.sampler import apply_token_bitmask
    v, pad = 77, 13                                             # W = 3 words
    allowed = [0, 31, 32, 63, 64, 76]
    mask = np.zeros((2, 3), np.int32)
    for t in allowed:
        mask.view(np.uint32)[0, t // 32] |= np.uint32(1 << (t % 32))
    mask[1] = -1
    logits = torch.randn(2, v + pad)
    out = apply_token_bitmask(logits, mask)
    finite = torch.isfinite(out[0, :v]).nonzero().flatten().tolist()
    assert finite == allowed
    assert torch.equal(out[1], logits[1]) and torch.equal(out[0, 96:], logits[0, 96:])


@pytest.mark.parametrize("fault", ["compile", "reject"])
def test_a_failed_grammar_ends_its_request_with_an_error_not_a_stop(tok_model, spm_tokenizer,
                                                                    fault):
    """Fault injection in the core: the grammar fails to compile there (the frontend had
    validated it), or its matcher rejects a token. The request ends with finish_reason
    "error" and an error, never as a complete output; a plain request beside it is served."""
    tok = spm_tokenizer
    eng = build_engine(tok_model, tokenizer=tok, **ENGINE)
    grammars = eng.core.grammars
    if fault == "compile":
        def broken_compile(spec):
            raise RuntimeError("injected compile failure")
        grammars._compile = broken_compile
    else:
        accept = grammars.accept

        def poisoned_accept(outs, requests):
            accept(outs, requests)
            for o in outs:
                r = requests.get(o.request_id)
                if r is not None and r.grammar is not None and r.grammar.matcher is not None:
                    r.grammar.matcher.consume_token(10**6)     # not a token: an error state
        grammars.accept = poisoned_accept
    prompt = tok.encode("the quick brown fox")
    done = run(eng, [("bad", prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                    structured_outputs=_so(json=SCHEMA))),
                     ("plain", prompt, SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True))])
    bad = done["bad"]
    assert bad.outputs[0].finish_reason == "error" and bad.error is not None, bad
    assert "grammar" in bad.error.message
    assert done["plain"].outputs[0].finish_reason == "length"
    assert_drained(eng)


def test_constrained_steps_overlap_the_next_forward_with_the_mask(tok_model, spm_tokenizer):
    """Async scheduling keeps a step in flight while constrained requests live: step N+1's
    forward is launched with its sampling held back, N is finished, then N+1's masks are
    filled from N's tokens and its sampling enqueued; with rounds, constrained rows run in
    them (the runner fills each step's masks from the step before's samples). Every step
    with constrained rows takes that path (none samples unmasked), and the outputs are
    those of synchronous single steps."""
    tok = spm_tokenizer
    reqs = workload(tok)
    ids = {}
    for name, kw in (("sync", dict(async_scheduling=False)), ("async", {}),
                     ("rounds", dict(num_scheduler_steps=4))):
        eng = build_engine(tok_model, tokenizer=tok, **{**ENGINE, **kw})
        runner, execute = eng.core.runner, eng.core.runner.execute
        deferred, in_flight, rounds = [], [], []

        def spy(sched, defer_sampling=False):
            # every request is constrained: a step defers iff some row samples
            deferred.append(defer_sampling == any(r.sample for r in sched.requests))
            rounds.append(sched.num_steps > 1 and defer_sampling)
            return execute(sched, defer_sampling=defer_sampling)
        runner.execute = spy
        for rid, prompt, params, _ in reqs:
            eng.add_request(rid, prompt, params)
        while eng.has_unfinished_requests():
            eng.step()
            in_flight.append(eng.core.in_flight is not None)
        assert_drained(eng)
        assert all(deferred), "a step with constrained rows sampled without its masks"
        assert any(in_flight) == (name != "sync"), in_flight
        assert any(rounds) == (name == "rounds"), name
        ids[name], _ = outputs(build_engine(tok_model, tokenizer=tok, **{**ENGINE, **kw}),
                               reqs)
    assert ids["async"] == ids["sync"] and ids["rounds"] == ids["sync"]
