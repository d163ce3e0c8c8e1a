"""The engine's entry points end to end: store a prompt's factors with store_factors, attend
with paged_attention (prefill, then a decode step), and compare with the full-sequence
oracle that materialises k and v (models.attention.FullSequenceAttention)."""
import torch

from tpaserve.kernels.ops import paged_attention, store_factors
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.layers import Rotary

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def test_store_then_attend_matches_full_sequence():
    torch.manual_seed(0)
    h, d_h, r_k, r_v, bs = 5, 16, 2, 6, 8
    lens = [11, 20]
    T = sum(lens)
    rot = Rotary(d_h)
    pos = torch.cat([torch.arange(L) for L in lens])
    cos, sin = (t.to(DEV) for t in rot.cos_sin(pos))
    q, ak, bk = (torch.randn(T, h, d_h), torch.randn(T, h, r_k), torch.randn(T, r_k, d_h))
    av, bv = torch.randn(T, h, r_v), torch.randn(T, r_v, d_h)
    q, ak, bk, av, bv = (t.to(DEV) for t in (q, ak, bk, av, bv))
    want = FullSequenceAttention([0, lens[0], T])(0, q, ak, bk, av, bv, cos, sin)

    num_blocks = 8
    caches = [torch.full((num_blocks, bs, h, r_k), float("nan")),
              torch.full((num_blocks, bs, r_k, d_h), float("nan")),
              torch.full((num_blocks, bs, h, r_v), float("nan")),
              torch.full((num_blocks, bs, r_v, d_h), float("nan"))]
    caches = [c.to(DEV) for c in caches]
    tables = torch.tensor([[5, 1, 0], [2, 7, 4]], dtype=torch.int32, device=DEV)
    slots = torch.cat([(tables[i, torch.arange(L) // bs].long() * bs + torch.arange(L).to(DEV)
                        % bs) for i, L in enumerate(lens)])
    store_factors(ak, bk, av, bv, cos, sin, slots, *caches)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    qsl = torch.tensor([0, lens[0], T], dtype=torch.int32, device=DEV)
    got = paged_attention(q, *caches, tables, seq_lens, qsl, max(lens), max(lens))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # decode step: the last token of each prompt again as a one-query step
    last = torch.tensor([lens[0] - 1, T - 1], device=DEV)
    got = paged_attention(q[last], *caches, tables, seq_lens,
                          torch.tensor([0, 1, 2], dtype=torch.int32, device=DEV), 1, max(lens))
    torch.testing.assert_close(got, want[last], atol=1e-4, rtol=1e-4)


def test_mixed_step_decode_rows_and_chunks():
    """Decode rows (decode kernel) and prompt chunks (prefill kernel, which skips the
    one-row sequences) in one call, with a sequence that has no query this step."""
    from tests.kernels.paged_case import make_case, rel_err
    for n_q in ([5, 1, 0, 1, 16], [1, 3, 1, 1, 1], [17, 1, 1, 2, 1]):
        c = make_case([20, 11, 7, 30, 33], n_q, 5, 16, 2, 2, 8, torch.float32, DEV, seed=sum(n_q))
        out = paged_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len, c.max_seq_len)
        assert rel_err(out, c.reference()) < 1e-4, n_q
