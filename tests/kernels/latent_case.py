"""Random paged latent caches (MLA) and step metadata for the kernel tests and bench/mla.py,
in tests/kernels/paged_case.py's manner: every block random, block tables shuffled, unused
entries pointing at valid blocks, so a wrong slot gives a wrong answer."""
from __future__ import annotations

import math

import torch

import tpaserve.kernels.reference as ref


def make_latent_case(lens, n_queries, h, kv_lora, rope, bs, dtype=torch.float32, seed=0,
                     device="cpu"):
    """lens[i]: context of sequence i after the step, n_queries[i]: its query rows. Returns
    mla_attention's arguments by name; scale is arbitrary (not derived from q's width)."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-L // bs) for L in lens]
    num_blocks = sum(nblk) + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.randint(0, num_blocks, (len(lens), max(nblk) + 1), generator=g)
    at = 0
    for i, k in enumerate(nblk):
        tables[i, :k] = perm[at:at + k]
        at += k
    qsl = [0]
    for n in n_queries:
        qsl.append(qsl[-1] + n)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    return dict(
        q=rnd(qsl[-1], h, kv_lora + rope), cache=rnd(num_blocks, bs, kv_lora + rope),
        block_tables=tables.to(torch.int32).to(device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        max_query_len=max(n_queries), max_seq_len=max(lens), kv_lora=kv_lora,
        scale=1 / math.sqrt(kv_lora / 2 + rope))


def reference(c: dict) -> torch.Tensor:
    """reference.mla_attention_ref of a case (on the CPU: its causal mask is built there)."""
    cpu = {k: (x.cpu() if torch.is_tensor(x) else x) for k, x in c.items()}
    return ref.mla_attention_ref(cpu["q"], cpu["cache"], cpu["block_tables"], cpu["seq_lens"],
                                 cpu["query_start_loc"], c["kv_lora"], c["scale"]).to(c["q"].device)
