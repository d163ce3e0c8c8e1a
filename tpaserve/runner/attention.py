"""The paged engine's implementation of the models' attention interface
(models/attention.py): store the step's factors into their cache slots, then attend each
query over its sequence's cached factors (MLA: `latent`, over its latent rows). The ops
are the Triton kernels on CUDA and the torch references elsewhere; both take the same
arguments."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tpaserve.kernels import reference
from tpaserve.runner.factor_cache import FactorCache


@dataclass
class StepMetadata:
    """Device tensors of one step (shapes in kernels/reference.py) plus host-side maxima,
    so no kernel launch has to read a size back from the GPU."""
    slot_mapping: torch.Tensor      # (T,) int64
    query_start_loc: torch.Tensor   # (B+1,) int32
    seq_lens: torch.Tensor          # (B,) int32
    block_tables: torch.Tensor      # (B, max_blocks) int32
    max_query_len: int
    max_seq_len: int
    prefill_work: torch.Tensor | None = None   # (items * 2,) int32, kernels/prefill.work_list


class TorchOps:
    """The reference ops (CPU engine backend and test oracle)."""
    store_factors = staticmethod(reference.store_factors_ref)

    @staticmethod
    def make_workspace(batch, h, d_h, device=None):
        return None                       # the reference needs no scratch

    @staticmethod
    def paged_attention(q, ak, bk, av, bv, block_tables, seq_lens, query_start_loc,
                        max_query_len, max_seq_len, scale=None, workspace=None,
                        prefill_work=None):
        return reference.paged_attention_ref(q, ak, bk, av, bv, block_tables, seq_lens,
                                             query_start_loc, scale)

    store_latent = staticmethod(reference.store_latent_ref)

    @staticmethod
    def mla_attention(q, latent_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                      max_seq_len, kv_lora, scale, workspace=None):
        return reference.mla_attention_ref(q, latent_cache, block_tables, seq_lens,
                                           query_start_loc, kv_lora, scale)


def select_ops(device: torch.device):
    if device.type == "cuda":
        from tpaserve.kernels import ops as triton_ops  # needs triton + a GPU
        return triton_ops
    return TorchOps


class PagedAttention:
    def __init__(self, cache: FactorCache, meta: StepMetadata, ops=TorchOps,
                 workspace: torch.Tensor | None = None):
        # workspace: split-K scratch allocated once by the runner (a graph replays its address)
        self.cache, self.meta, self.ops, self.workspace = cache, meta, ops, workspace

    def __call__(self, layer, q, ak, bk, av, bv, cos, sin):
        m = self.meta
        ak_c, bk_c, av_c, bv_c = self.cache.layer(layer)
        self.ops.store_factors(ak, bk, av, bv, cos, sin, m.slot_mapping, ak_c, bk_c, av_c, bv_c)
        return self.ops.paged_attention(q, ak_c, bk_c, av_c, bv_c, m.block_tables, m.seq_lens,
                                        m.query_start_loc, m.max_query_len, m.max_seq_len,
                                        workspace=self.workspace, prefill_work=m.prefill_work)

    def latent(self, layer: int, q: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
               scale: float) -> torch.Tensor:
        """MLA (models/attention.LatentBackend): store the step's [c, k_pe] rows, then
        q (T, h, kv_lora + rope) -> o_lat (T, h, kv_lora) over each sequence's rows."""
        m, cache = self.meta, self.cache.latent[layer]
        self.ops.store_latent(c, k_pe, m.slot_mapping, cache)
        return self.ops.mla_attention(q, cache, m.block_tables, m.seq_lens, m.query_start_loc,
                                      m.max_query_len, m.max_seq_len, c.size(-1), scale,
                                      workspace=self.workspace)
