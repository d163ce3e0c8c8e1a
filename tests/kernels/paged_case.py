"""Random paged factor caches and step metadata for the kernel tests.

Every cache block is filled with random numbers (blocks no sequence owns included) and the
block tables are shuffled, so a kernel that reads a wrong slot gets a wrong answer rather
than a lucky zero. Unused block-table entries point at random (valid) blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import tpaserve.kernels.reference as ref


@dataclass
class PagedCase:
    q: torch.Tensor               # (T, h, d_h)
    ak: torch.Tensor | None       # (num_blocks, bs, h, R_K); None: constant A (R_K = n_kv)
    bk: torch.Tensor              # (num_blocks, bs, R_K, d_h)
    av: torch.Tensor | None       # (num_blocks, bs, h, R_V)
    bv: torch.Tensor              # (num_blocks, bs, R_V, d_h)
    block_tables: torch.Tensor    # (B, max_blocks) int32
    seq_lens: torch.Tensor        # (B,) int32
    query_start_loc: torch.Tensor  # (B+1,) int32
    max_query_len: int
    max_seq_len: int

    def caches(self):
        return self.ak, self.bk, self.av, self.bv

    def metadata(self):
        return self.block_tables, self.seq_lens, self.query_start_loc

    def reference(self, scale=None):
        # reference.py builds its causal mask on the CPU, so it runs there
        cpu = [t if t is None else t.cpu() for t in (self.q, *self.caches(), *self.metadata())]
        return ref.paged_attention_ref(*cpu, scale=scale).to(self.q.device)


def make_case(lens, n_queries, h, d_h, r_k, r_v, bs, dtype=torch.float32, device="cpu",
              seed=0, spare_blocks=3, const_a=False) -> PagedCase:
    """lens[i]: context length of sequence i after the step; n_queries[i]: its query rows.
    const_a: MHA / GQA / MQA's cache, r_k = r_v = the kv heads, no A caches."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nblk = [-(-L // bs) for L in lens]
    num_blocks = sum(nblk) + spare_blocks
    max_blocks = max(nblk) + 1

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(lens), max_blocks), generator=g)
    at = 0
    for i, k in enumerate(nblk):
        tables[i, :k] = perm[at:at + k]
        at += k
    qsl = [0]
    for n in n_queries:
        qsl.append(qsl[-1] + n)
    q = rnd(qsl[-1], h, d_h)
    ak = None if const_a else rnd(num_blocks, bs, h, r_k)
    bk = rnd(num_blocks, bs, r_k, d_h)
    av = None if const_a else rnd(num_blocks, bs, h, r_v)
    return PagedCase(
        q=q, ak=ak, bk=bk, av=av, bv=rnd(num_blocks, bs, r_v, d_h),
        block_tables=tables.to(torch.int32).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        max_query_len=max(n_queries), max_seq_len=max(lens))


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaN (unwritten or poisoned rows)"
    return ((out.double() - want.double()).norm() / want.double().norm()).item()


TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 1e-2}
