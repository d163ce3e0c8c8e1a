"""The two entry points the engine calls per layer per step.

    store_factors(...)    write the step's factors into the paged cache (RoPE on B_K fused)
    paged_attention(...)  attend the step's queries over the cache: the decode kernel for
                          sequences with one query, the extend/prefill kernel for chunks
MLA's latent cache has its own pair (kernels/mla_store.py, kernels/mla_decode.py):
    store_latent(...)     write the step's [c, k_pe] rows
    mla_attention(...)    absorbed attention over the latent (decode and chunk rows)

Both take sizes as Python ints from the scheduler and never read the GPU, so a step can be
captured in a CUDA graph (pass `workspace`, sized by decode.workspace_numel, for decode).
"""
from __future__ import annotations

import torch

from tpaserve.kernels.decode import decode_attention, make_workspace
from tpaserve.kernels.mla_decode import mla_attention
from tpaserve.kernels.mla_store import store_latent
from tpaserve.kernels.prefill import prefill_attention
from tpaserve.kernels.store import store_factors

__all__ = ["store_factors", "paged_attention", "make_workspace", "store_latent",
           "mla_attention"]


def paged_attention(q: torch.Tensor, ak_cache: torch.Tensor, bk_cache: torch.Tensor,
                    av_cache: torch.Tensor, bv_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, max_query_len: int,
                    max_seq_len: int, scale: float | None = None,
                    workspace: torch.Tensor | None = None,
                    prefill_work: torch.Tensor | None = None) -> torch.Tensor:
    """q (T, h, d_h) -> (T, h, d_h): causal FlashTPA over the paged factor cache
    (reference.paged_attention_ref defines the result; ak_cache = av_cache = None: constant
    A, MHA / GQA / MQA). prefill_work: see
    prefill.prefill_attention's `work` (built with skip_single_rows=True)."""
    out = decode_attention(q, ak_cache, bk_cache, av_cache, bv_cache, block_tables,
                           seq_lens, query_start_loc, max_seq_len, scale=scale,
                           workspace=workspace)
    if max_query_len == 1:
        return out
    # A mixed step (decode rows + prompt chunks): the decode kernel above served the
    # one-query sequences (its rows for the longer chunks are garbage: it treats row 0 of
    # a chunk as the last position); the prefill kernel writes every row of the chunks.
    # Decode rows in the prefill kernel would each run a 64-128-row query block.
    return prefill_attention(q, ak_cache, bk_cache, av_cache, bv_cache, block_tables, seq_lens,
                             query_start_loc, max_query_len, scale=scale, out=out,
                             skip_single_rows=True, work=prefill_work)
