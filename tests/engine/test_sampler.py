"""Sampler: each knob on hand-made logits, penalties against a per-row direct computation,
padded vocab, per-request reproducibility, raw-distribution logprobs. CPU, small."""
import math

import pytest
import torch

from tpaserve.runner.sampler import Sampler, SamplingRow, compute_logprobs
from tpaserve.sampling_params import SamplingParams

V, V_PAD, EOS = 37, 48, 36          # awkward real vocab, padded model vocab


def row(params=None, prompt=(1, 2), out=(), gen=None, **kw):
    return SamplingRow(params or SamplingParams(**kw), list(prompt), list(out), gen)


def padded(logits: torch.Tensor) -> torch.Tensor:
    """(B, V) -> (B, V_PAD) whose padding columns would win any argmax or sample."""
    return torch.cat([logits, torch.full((logits.size(0), V_PAD - V), 50.0)], dim=1)


def frequencies(logits_1d: torch.Tensor, n: int = 20000, seed: int = 0, **kw) -> torch.Tensor:
    """Empirical token distribution of n unseeded rows with the same logits and params."""
    p = SamplingParams(**kw)
    out = Sampler(V, EOS, seed=seed)(padded(logits_1d.expand(n, V)), [row(p)] * n)
    return torch.bincount(torch.tensor(out.token_ids), minlength=V).float() / n


@pytest.fixture
def logits():
    return torch.randn(6, V, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax_and_ignores_padding(logits):
    out = Sampler(V, EOS)(padded(logits), [row(temperature=0.0)] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs is None


def test_top_k_1_is_greedy(logits):
    out = Sampler(V, EOS)(padded(logits), [row(top_k=1, temperature=1.5)] * 6)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_max(logits):
    rows = [row(top_p=1e-6, temperature=5.0)] * 6
    for seed in range(5):
        assert Sampler(V, EOS, seed=seed)(padded(logits), rows).token_ids == \
            logits.argmax(-1).tolist()


def test_sampled_rows_never_pick_padding():
    flat = torch.zeros(500, V)                       # uniform over the real vocab
    toks = Sampler(V, EOS)(padded(flat), [row()] * 500).token_ids
    assert max(toks) < V and len(set(toks)) > V // 2


def test_temperature_matches_softmax():
    l = torch.linspace(0.0, 2.0, V)
    for t in (0.5, 1.0, 2.0):
        f = frequencies(l, temperature=t)
        expect = torch.softmax(l / t, -1)
        # loose chi-square-like bound: 20k draws, |f - p| well under 0.015 everywhere
        assert (f - expect).abs().max() < 0.015, t
    assert frequencies(l, temperature=0.5)[-1] > frequencies(l, temperature=2.0)[-1] + 0.05


def test_top_k_renormalises_over_k_best():
    l = torch.linspace(0.0, 2.0, V)
    f = frequencies(l, top_k=3)
    expect = torch.zeros(V)
    expect[-3:] = torch.softmax(l[-3:], -1)
    assert (f[:-3] == 0).all() and (f - expect).abs().max() < 0.015


def test_top_p_smallest_prefix_reaching_p():
    l = torch.full((V,), -1e4)
    l[:3] = torch.tensor([0.5, 0.3, 0.2]).log()
    f = frequencies(l, top_p=0.6)                    # 0.5 < 0.6 <= 0.8: keep two
    assert f[2:].sum() == 0 and abs(f[0] - 0.625) < 0.015
    f = frequencies(l, top_p=0.85)                   # keep three
    assert f[2] > 0.15


def test_min_p_drops_tokens_below_fraction_of_max():
    l = torch.zeros(V)
    l[0], l[1] = math.log(10.0), math.log(5.0)       # p ratios 10 : 5 : 1 ...
    f = frequencies(l, min_p=0.3)                    # keeps tokens >= 0.3 * p_max
    assert f[2:].sum() == 0 and abs(f[0] - 2 / 3) < 0.015


def test_logit_bias_forces_and_bans(logits):
    target = int(logits[0].argmin())
    out = Sampler(V, EOS)(padded(logits), [row(logit_bias={target: 100.0})] * 6)
    assert out.token_ids == [target] * 6
    best = int(logits[1].argmax())
    out = Sampler(V, EOS)(padded(logits[1:2]), [row(temperature=0, logit_bias={best: -100})])
    assert out.token_ids[0] != best


def test_min_tokens_blocks_eos_and_stop_ids():
    l = torch.zeros(1, V)
    l[0, EOS], l[0, 7] = 30.0, 29.0                  # eos, then stop id 7, dominate
    s = Sampler(V, EOS)
    p = SamplingParams(min_tokens=2, stop_token_ids=[7], temperature=0)
    assert s(padded(l), [row(p, out=[3])]).token_ids[0] not in (EOS, 7)
    assert s(padded(l), [row(p, out=[3, 4])]).token_ids[0] == EOS
    # with ignore_eos, eos ends nothing, so only the stop id is blocked
    p = SamplingParams(min_tokens=2, stop_token_ids=[7], temperature=0, ignore_eos=True)
    assert s(padded(l), [row(p, out=[])]).token_ids[0] == EOS


def reference_penalties(logits_row, p: SamplingParams, prompt, out):
    """Direct per-row, per-token computation of bias + repetition + OpenAI penalties."""
    x = logits_row.clone().tolist()
    for tok, b in p.logit_bias:
        x[tok] += b
    for tok in set(prompt) | set(out):
        x[tok] = x[tok] / p.repetition_penalty if x[tok] > 0 else x[tok] * p.repetition_penalty
    for tok in set(out):
        x[tok] -= p.frequency_penalty * out.count(tok) + p.presence_penalty
    return torch.tensor(x)


def test_penalties_match_direct_computation(logits):
    cases = [
        (SamplingParams(repetition_penalty=1.3), [1, 5, 5], [2, 2, 9]),
        (SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4), [1, 2], [3, 3, 3, 8]),
        (SamplingParams(repetition_penalty=0.8, frequency_penalty=-1.5, presence_penalty=2.0,
                        logit_bias={4: 3.0, 8: -2.5}), [4, 4, 30], [8, 30, 30, 0]),
        (SamplingParams(), [1, 2, 3], [4]),                      # no penalties
        (SamplingParams(frequency_penalty=1.0), [5], []),        # nothing generated yet
        (SamplingParams(repetition_penalty=2.0, logit_bias={0: 1.0}), [], [6]),
    ]
    rows = [row(p, prompt, out) for p, prompt, out in cases]
    got = Sampler(V, EOS).process(padded(logits), rows)
    assert got.shape == (6, V)
    for i, (p, prompt, out) in enumerate(cases):
        torch.testing.assert_close(got[i], reference_penalties(logits[i], p, prompt, out),
                                   rtol=1e-6, atol=1e-6)


def test_process_does_not_modify_input(logits):
    before = padded(logits)
    x = before.clone()
    Sampler(V, EOS).process(x, [row(repetition_penalty=1.5, logit_bias={1: 5.0})] * 6)
    assert torch.equal(x, before)


def test_seeded_rows_independent_of_batch_and_order():
    l = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    pa = SamplingParams(seed=11, temperature=1.3, top_k=20)
    pb = SamplingParams(seed=22, top_p=0.9, repetition_penalty=1.2)
    other = SamplingParams()                                     # unseeded
    greedy = SamplingParams(temperature=0, seed=5)               # greedy seeded: draws nothing

    def run(order, steps=4, sampler_seed=0):
        gens = {n: torch.Generator().manual_seed(p.seed) for n, p in (("a", pa), ("b", pb))}
        gens["g"] = torch.Generator().manual_seed(5)
        spec = {"a": (pa, l[0]), "b": (pb, l[1]), "o": (other, l[2]), "g": (greedy, l[3])}
        s, outs = Sampler(V, EOS, seed=sampler_seed), {n: [] for n in order}
        for _ in range(steps):
            rows = [row(spec[n][0], out=outs[n], gen=gens.get(n) if n != "o" else None)
                    for n in order]
            toks = s(padded(torch.stack([spec[n][1] for n in order])), rows).token_ids
            for n, t in zip(order, toks):
                outs[n].append(t)
        return outs

    ref = run(["a"], sampler_seed=0)["a"]
    for order, ss in ((["a", "b", "o"], 1), (["o", "b", "a", "g"], 2), (["b", "g", "a"], 3)):
        assert run(order, sampler_seed=ss)["a"] == ref
    assert run(["b"])["b"] == run(["a", "o", "b"])["b"]
    assert len(set(tuple(run(["a"], sampler_seed=k)["a"]) for k in range(3))) == 1


def test_unseeded_rows_follow_sampler_seed(logits):
    rows = [row()] * 6
    a = Sampler(V, EOS, seed=3)(padded(logits), rows).token_ids
    assert Sampler(V, EOS, seed=3)(padded(logits), rows).token_ids == a


def test_logprobs_are_raw_log_softmax_sorted_and_per_row(logits):
    rows = [row(logprobs=3, temperature=0.7, repetition_penalty=1.5, out=[1, 2]),
            row(temperature=0),                                  # did not ask
            row(logprobs=0, logit_bias={5: 50.0}),
            row(logprobs=5, top_k=2, temperature=0)]
    out = Sampler(V, EOS)(padded(logits[:4]), rows)
    ref = torch.log_softmax(logits[:4], -1)                      # raw, real vocab only
    assert out.logprobs[1] is None
    for i, n in ((0, 3), (2, 0), (3, 5)):
        chosen, top = out.logprobs[i]
        assert chosen == pytest.approx(ref[i, out.token_ids[i]].item(), abs=1e-6)
        assert len(top) == n
        vals, ids = ref[i].topk(n)
        assert [t for t, _ in top] == ids.tolist()
        assert [lp for _, lp in top] == pytest.approx(vals.tolist(), abs=1e-6)
        assert all(top[j][1] >= top[j + 1][1] for j in range(n - 1))
    assert out.token_ids[2] == 5


def test_compute_logprobs_restricts_to_vocab(logits):
    lps = compute_logprobs(padded(logits), [0, 1, 2, 3, 4, 5], 2, vocab_size=V)
    ref = torch.log_softmax(logits, -1)
    for i, (chosen, top) in enumerate(lps):
        assert chosen == pytest.approx(ref[i, i].item(), abs=1e-6)
        assert all(t < V for t, _ in top)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kw", [dict(temperature=0.0), dict(temperature=0.8),
                                dict(temperature=0.8, top_p=0.9, top_k=5),
                                dict(temperature=1.0, repetition_penalty=1.3)],
                         ids=["greedy", "sample", "top-p-k", "penalty"])
def test_rows_with_nonfinite_logits_get_no_token(logits, bad, kw):
    """A row with a NaN or +inf logit gets NONFINITE, never a token drawn from it (argmax
    of a NaN softmax picks the NaN's index, token 0 here); the other rows are untouched."""
    from tpaserve.runner.sampler import NONFINITE
    spoiled = logits.clone()
    spoiled[2, 0] = bad
    spoiled[4, :] = float("nan")
    rows = [row(seed=i, **kw) for i in range(6)]
    clean = Sampler(V, EOS)(padded(logits), rows).token_ids
    out = Sampler(V, EOS)(padded(spoiled), rows).token_ids
    assert out[2] == NONFINITE and out[4] == NONFINITE
    assert [t for i, t in enumerate(out) if i not in (2, 4)] == \
        [t for i, t in enumerate(clean) if i not in (2, 4)]


def test_masked_rows_are_not_nonfinite(logits):
    """-inf is a mask, not a fault: min_tokens' -inf on eos leaves the row sampling."""
    masked = logits.clone()
    masked[:, :V // 2] = float("-inf")
    out = Sampler(V, EOS)(padded(masked), [row(temperature=0.7, seed=1)] * 6).token_ids
    assert all(V // 2 <= t < V for t in out)
