"""reference_generate / reference_prompt_logprobs on a tiny random T6 (CPU)."""
import pytest
import torch

from tests.reference import reference_generate, reference_prompt_logprobs
from tpaserve.config import ModelConfig
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams

VOCAB, EOS = 101, 100
PROMPT = [5, 17, 3, 88, 42, 9, 61]


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=VOCAB,
                      q_rank=3, k_rank=2, v_rank=2, max_position=64)
    # std 0.3: peaked enough that greedy paths differ between prompts, and sampling varies.
    return T6(cfg).init_random(seed=0, std=0.3).eval()


def last_logits(model, ids):
    x = model(torch.tensor(ids), torch.arange(len(ids)), FullSequenceAttention([0, len(ids)]))
    return model.compute_logits(x[-1:])[0]                       # (V,)


@torch.no_grad()
def test_greedy_equals_hand_written_argmax_loop(model):
    ids = list(PROMPT)
    for _ in range(10):
        ids.append(int(last_logits(model, ids).argmax()))
    want = ids[len(PROMPT):]
    got = reference_generate(model, PROMPT, SamplingParams(temperature=0, max_tokens=10,
                                                           ignore_eos=True), EOS)
    assert got == want


def test_seeded_sampling_is_reproducible(model):
    p = SamplingParams(seed=1234, max_tokens=12, temperature=1.0, ignore_eos=True)
    a = reference_generate(model, PROMPT, p, EOS)
    assert a == reference_generate(model, PROMPT, p, EOS) and len(a) == 12
    others = [reference_generate(model, PROMPT, SamplingParams(seed=s, max_tokens=12,
                                                               ignore_eos=True), EOS)
              for s in (1, 2, 3)]
    assert any(o != a for o in others)


def test_stops_at_max_tokens_and_zero(model):
    assert reference_generate(model, PROMPT, SamplingParams(max_tokens=0), EOS) == []
    assert len(reference_generate(model, PROMPT, SamplingParams(max_tokens=5, seed=0,
                                                                ignore_eos=True), EOS)) == 5


def test_context_limit_caps_max_tokens_none(model):
    out = reference_generate(model, PROMPT, SamplingParams(max_tokens=None, temperature=0,
                                                           ignore_eos=True), EOS)
    assert len(out) == model.cfg.max_position - len(PROMPT)


def test_stops_at_eos_and_stop_token_ids_included(model):
    free = reference_generate(model, PROMPT, SamplingParams(temperature=0, max_tokens=10,
                                                            ignore_eos=True), EOS)
    stop_tok = free[3]
    k = free.index(stop_tok)
    greedy = dict(temperature=0, max_tokens=10)
    # pretend the 4th greedy token is eos / a stop id: output ends with it, included
    assert reference_generate(model, PROMPT, SamplingParams(**greedy), stop_tok) == free[:k + 1]
    assert reference_generate(model, PROMPT, SamplingParams(**greedy, stop_token_ids=[stop_tok]),
                              None) == free[:k + 1]
    # ignore_eos runs on through eos
    assert reference_generate(model, PROMPT, SamplingParams(**greedy, ignore_eos=True),
                              stop_tok) == free


def test_min_tokens_delays_eos(model):
    free = reference_generate(model, PROMPT, SamplingParams(temperature=0, max_tokens=10,
                                                            ignore_eos=True), EOS)
    eos = free[0]                                    # the very first greedy token is "eos"
    out = reference_generate(model, PROMPT, SamplingParams(temperature=0, max_tokens=10,
                                                           min_tokens=3), eos)
    assert eos not in out[:3] and len(out) >= 4


def test_padded_vocab_never_generated(model):
    out = reference_generate(model, PROMPT, SamplingParams(seed=7, max_tokens=20,
                                                           temperature=2.0, ignore_eos=True),
                             EOS, vocab_size=50)
    assert max(out) < 50


@torch.no_grad()
def test_prompt_logprobs(model):
    lps = reference_prompt_logprobs(model, PROMPT, 4)
    assert lps[0] is None and len(lps) == len(PROMPT)
    for i in range(1, len(PROMPT)):
        ref = torch.log_softmax(last_logits(model, PROMPT[:i]), -1)
        chosen, top = lps[i]
        assert chosen == pytest.approx(ref[PROMPT[i]].item(), abs=1e-5)
        assert [t for t, _ in top] == ref.topk(4).indices.tolist()
    assert reference_prompt_logprobs(model, [3], 2) == [None]
