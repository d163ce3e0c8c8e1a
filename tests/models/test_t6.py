"""T6 / T6-KVonly against an independent einsum reading of ../shared/TPA.md sections 1-2,
and attention over the paged factor cache against attention over materialised q, k, v.

The reference below shares no code with tpaserve: it reads the model's state dict and
redoes every equation in float64. Tolerances: the model keeps attention in fp32 even for
float64 weights, so every comparison is at fp32 precision: max |model - ref| <= 1e-5 times
the largest |ref| (logits) or rtol 1e-5 / atol 1e-6 (unit-scale attention outputs).
"""
from __future__ import annotations

import math

import pytest
import torch

from tpaserve.config import ModelConfig
from tpaserve.kernels.reference import paged_attention_ref, store_factors_ref
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.layers import Rotary
from tpaserve.models.t6 import T6

REL_TOL = 1e-5
F64 = torch.float64


# ------------------------------------------------------------------ independent reference

def ref_rope(x, pos, base=10000.0, sign=1.0):
    """x (L, n, d_h) at integer positions pos (L,): half-split pairs (i, i + d_h/2),
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos (sign=-1 gives the usual +theta rotation)."""
    dh = x.size(-1)
    inv_freq = base ** (-torch.arange(0, dh, 2, dtype=F64) / dh)           # (d_h/2,)
    theta = pos.to(F64)[:, None, None] * inv_freq                           # (L, 1, d_h/2)
    c, s = theta.cos(), sign * theta.sin()
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return torch.cat((x1 * c + x2 * s, -x1 * s + x2 * c), dim=-1)


def ref_rms(x, eps, w=None):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def ref_logits(model: T6, ids: torch.Tensor, norm_eps: float, rope_sign=1.0) -> torch.Tensor:
    """One sequence at positions 0..L-1 -> logits (L, vocab), all in float64."""
    cfg = model.cfg
    W = {k: v.detach().to(F64) for k, v in model.state_dict().items()}
    L, h, dh = ids.numel(), cfg.n_head, cfg.head_dim
    pos = torch.arange(L)

    def lin(name, t):
        return t @ W[name].T

    def factor(t, a, b, rank, rotate):             # A (L, h, R) x B (L, R, d_h) / R
        A = lin(a, t).view(L, h, rank)
        B = lin(b, t).view(L, rank, dh)
        if rotate:
            B = ref_rope(B, pos, cfg.rope_base, rope_sign)
        return torch.einsum("lhr,lrd->lhd", A, B) / rank

    x = W["transformer.wte.weight"][ids]                                     # (L, d)
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        a = ref_rms(x, norm_eps)
        if cfg.q_rank is None:
            q = ref_rope(lin(p + "attn.c_qkv.c_q.weight", a).view(L, h, dh), pos,
                         cfg.rope_base, rope_sign)
        else:
            q = factor(a, p + "attn.c_qkv.W_A_q.weight", p + "attn.c_qkv.W_B_q.weight",
                       cfg.q_rank, True)
        k = factor(a, p + "attn.c_qkv.W_A_k.weight", p + "attn.c_qkv.W_B_k.weight",
                   cfg.k_rank, True)
        v = factor(a, p + "attn.c_qkv.W_A_v.weight", p + "attn.c_qkv.W_B_v.weight",
                   cfg.v_rank, False)
        s = torch.einsum("lhd,mhd->hlm", q, k) / math.sqrt(dh)               # (h, L, L)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        y = torch.einsum("hlm,mhd->lhd", s.softmax(-1), v)                   # (L, h, d_h)
        if cfg.using_groupnorm:
            y = ref_rms(y, 1e-5, W[p + "attn.subln.weight"])
        x = x + lin(p + "attn.c_proj.weight", y.reshape(L, h * dh))
        m = ref_rms(x, norm_eps)
        gate = lin(p + "mlp.c_fc1.weight", m)
        x = x + lin(p + "mlp.c_proj.weight", gate * torch.sigmoid(gate)
                    * lin(p + "mlp.c_fc2.weight", m))
    return ref_rms(x, norm_eps) @ W["transformer.wte.weight"].T


# ------------------------------------------------------------------ helpers

def make_cfg(q_rank, k_rank, v_rank, groupnorm, n_head=5, head_dim=8, n_embd=24, n_layer=2):
    return ModelConfig(n_layer=n_layer, n_head=n_head, head_dim=head_dim, n_embd=n_embd,
                       vocab_size=50, k_rank=k_rank, v_rank=v_rank, q_rank=q_rank,
                       using_groupnorm=groupnorm, max_position=64)


def make_model(cfg, dtype, seed=0):
    # std 0.2 (not 0.02) so attention is far from uniform and RoPE matters
    return T6(cfg).init_random(seed, std=0.2).to(dtype).eval()


def rel_err(a, b):
    return ((a.to(F64) - b.to(F64)).abs().max() / b.abs().max()).item()


def full_logits(model, ids_list):
    """Sequences packed back to back through FullSequenceAttention -> per-sequence logits."""
    cu = [0]
    for s in ids_list:
        cu.append(cu[-1] + s.numel())
    ids = torch.cat(ids_list)
    pos = torch.cat([torch.arange(s.numel()) for s in ids_list])
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos, FullSequenceAttention(cu)))
    return [logits[s:e] for s, e in zip(cu[:-1], cu[1:])]


CASES = {                                   # (q_rank, k_rank, v_rank, groupnorm)
    "t6": (3, 2, 1, False),
    "t6-groupnorm": (1, 3, 2, True),
    "kvonly": (None, 1, 3, False),
    "kvonly-groupnorm": (None, 2, 2, True),
}


# ------------------------------------------------------------------ model vs reference

@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("seq_len", [1, 13])
@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_einsum_reference(case, seq_len, dtype):
    cfg = make_cfg(*CASES[case])
    model = make_model(cfg, dtype)
    assert model.transformer.h[0].mlp.c_fc1.weight.shape[0] == math.floor(8 / 3 * cfg.n_embd)
    ids = torch.randint(0, cfg.vocab_size, (seq_len,), generator=torch.Generator().manual_seed(1))
    (got,) = full_logits(model, [ids])
    want = ref_logits(model, ids, torch.finfo(dtype).eps)
    assert got.shape == (seq_len, cfg.vocab_size)
    assert rel_err(got, want) <= REL_TOL


@pytest.mark.parametrize("case", ["t6", "kvonly"])
def test_rope_sign_is_visible_in_the_logits(case):
    """The comparison above would catch the wrong RoPE convention: the +theta rotation
    moves the logits by orders of magnitude more than the tolerance."""
    cfg = make_cfg(*CASES[case])
    model = make_model(cfg, F64)
    ids = torch.arange(13) * 3 % cfg.vocab_size
    (got,) = full_logits(model, [ids])
    eps = torch.finfo(F64).eps
    assert rel_err(got, ref_logits(model, ids, eps)) <= REL_TOL
    assert rel_err(got, ref_logits(model, ids, eps, rope_sign=-1.0)) > 1e3 * REL_TOL


def test_rope_convention_on_basis_vectors():
    """y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos, pairing dims i and i + d_h/2,
    theta_i = pos * 10000^(-2i/d_h)."""
    dh, p = 8, 5
    rot = Rotary(dh)
    cos, sin = rot.cos_sin(torch.tensor([p]))                                 # (1, d_h/2)
    theta = p * 10000.0 ** (-torch.arange(0, dh, 2, dtype=F64) / dh)
    torch.testing.assert_close(cos[0].to(F64), theta.cos(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[0].to(F64), theta.sin(), rtol=1e-6, atol=1e-6)
    for i in range(dh // 2):
        e1 = torch.zeros(1, 1, dh)
        e1[..., i] = 1.0                                        # x1 = e_i, x2 = 0
        y = Rotary.apply(e1, cos, sin)[0, 0]
        want = torch.zeros(dh)
        want[i], want[i + dh // 2] = cos[0, i], -sin[0, i]
        torch.testing.assert_close(y, want, rtol=0, atol=1e-7)
        e2 = torch.zeros(1, 1, dh)
        e2[..., i + dh // 2] = 1.0                              # x1 = 0, x2 = e_i
        y = Rotary.apply(e2, cos, sin)[0, 0]
        want = torch.zeros(dh)
        want[i], want[i + dh // 2] = sin[0, i], cos[0, i]
        torch.testing.assert_close(y, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", list(CASES))
def test_packed_sequences_equal_each_alone(case):
    cfg = make_cfg(*CASES[case])
    model = make_model(cfg, torch.float32)
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in (5, 1, 13, 2)]
    packed = full_logits(model, seqs)
    for s, got in zip(seqs, packed):
        (alone,) = full_logits(model, [s])
        assert rel_err(got, alone) <= REL_TOL


# ------------------------------------------------------------------ paged factor attention

def random_factors(g, L, h, dh, rk, rv):
    def r(*shape):
        return torch.randn(*shape, generator=g)
    return r(L, h, dh), r(L, h, rk), r(L, rk, dh), r(L, h, rv), r(L, rv, dh)


class Pager:
    """A shuffled block table over one paged cache per factor, for a batch of sequences."""

    def __init__(self, lens, bs, h, dh, rk, rv, g):
        need = [(n + bs - 1) // bs for n in lens]
        num_blocks = sum(need) + 3                              # spare blocks stay unused
        order = torch.randperm(num_blocks, generator=g).tolist()
        self.bs, self.tables = bs, []
        for n in need:
            self.tables.append(order[:n])
            order = order[n:]
        self.caches = [torch.full((num_blocks, bs, *s), float("nan"))
                       for s in ((h, rk), (rk, dh), (h, rv), (rv, dh))]

    def slots(self, i, positions):
        t = self.tables[i]
        return [t[p // self.bs] * self.bs + p % self.bs for p in positions]

    def block_tables(self):
        width = max(len(t) for t in self.tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32)


@pytest.mark.parametrize("bs", [1, 4, 16])
def test_paged_factor_attention_matches_materialised(bs):
    """Sequences of lengths 1, bs-1, bs, bs+1 and several blocks, batched in one call;
    each asks for its last n positions (n = 1, all, about half: decode, prefill, chunk).
    Factors are stored in two calls (context, then the step's tokens plus a -1 pad row),
    through a shuffled block table whose unused slots hold NaN."""
    h, dh, rk, rv = 5, 8, 2, 3
    g = torch.Generator().manual_seed(bs)
    lens = sorted({1, bs - 1, bs, bs + 1, 3 * bs + 2} - {0})
    pager = Pager(lens, bs, h, dh, rk, rv, g)
    rot = Rotary(dh)
    qs, wants, qsl = [], [], [0]
    for i, L in enumerate(lens):
        n = (1, L, (L + 1) // 2)[i % 3]
        q, ak, bk, av, bv = random_factors(g, L, h, dh, rk, rv)
        cos, sin = rot.cos_sin(torch.arange(L))
        wants.append(FullSequenceAttention([0, L])(0, q, ak, bk, av, bv, cos, sin)[L - n:])
        for part, pad in ((slice(0, L - n), False), (slice(L - n, L), True)):
            idx = list(range(L))[part] + ([0] if pad else [])
            slots = pager.slots(i, range(L)[part]) + ([-1] if pad else [])
            store_factors_ref(ak[idx], bk[idx], av[idx], bv[idx], cos[idx], sin[idx],
                              torch.tensor(slots, dtype=torch.int64), *pager.caches)
        qs.append(q[L - n:])
        qsl.append(qsl[-1] + n)
    got = paged_attention_ref(torch.cat(qs), *pager.caches, pager.block_tables(),
                              torch.tensor(lens, dtype=torch.int32),
                              torch.tensor(qsl, dtype=torch.int32))
    assert not got.isnan().any()
    torch.testing.assert_close(got, torch.cat(wants), rtol=REL_TOL, atol=1e-6)


class PagedRefBackend:
    """The AttentionBackend contract over the paged references, for whole-model runs."""

    def __init__(self, pager: Pager, n_layer: int):
        self.pager = pager
        self.caches = [[c.clone() for c in pager.caches] for _ in range(n_layer)]

    def step(self, seqs: list[tuple[int, int, int]]):
        """seqs: (sequence index, first position, number of tokens) of this step."""
        self.slot_mapping = torch.tensor(
            [s for i, p0, n in seqs for s in self.pager.slots(i, range(p0, p0 + n))])
        self.seq_lens = torch.tensor([p0 + n for _, p0, n in seqs], dtype=torch.int32)
        self.qsl = torch.tensor([0] + list(torch.tensor([n for *_, n in seqs]).cumsum(0)),
                                dtype=torch.int32)
        self.tables = self.pager.block_tables()[[i for i, *_ in seqs]]

    def __call__(self, layer, q, ak, bk, av, bv, cos, sin):
        store_factors_ref(ak, bk, av, bv, cos, sin, self.slot_mapping, *self.caches[layer])
        return paged_attention_ref(q, *self.caches[layer], self.tables, self.seq_lens, self.qsl)


@pytest.mark.parametrize("case", ["t6-groupnorm", "kvonly"])
def test_model_over_paged_cache_matches_full_sequence(case):
    """Chunked prefill (two sequences in one step, then the rest) and decode steps through
    the paged references give the full-sequence logits of every position."""
    cfg = make_cfg(*CASES[case])
    model = make_model(cfg, torch.float32)
    g = torch.Generator().manual_seed(3)
    lens = [11, 7]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    want = full_logits(model, seqs)
    backend = PagedRefBackend(Pager(lens, 4, cfg.n_head, cfg.head_dim, cfg.k_rank,
                                    cfg.v_rank, g), cfg.n_layer)
    got = [[], []]
    steps = [[(0, 0, 5), (1, 0, 6)], [(0, 5, 5), (1, 6, 1)], [(0, 10, 1)]]
    for step in steps:
        backend.step(step)
        ids = torch.cat([seqs[i][p0:p0 + n] for i, p0, n in step])
        pos = torch.cat([torch.arange(p0, p0 + n) for _, p0, n in step])
        with torch.no_grad():
            logits = model.compute_logits(model(ids, pos, backend))
        for (i, _, n), rows in zip(step, logits.split([n for *_, n in step])):
            got[i].append(rows)
    for i in range(2):
        assert rel_err(torch.cat(got[i]), want[i]) <= REL_TOL
