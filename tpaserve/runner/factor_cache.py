"""The paged factor cache: its size arithmetic (FactorCacheSpec, the single source for how
many blocks fit, for metrics and for the memory numbers in docs) and its tensors.

Layout, per factor, all layers in one allocation (layer-major, so a layer's view is
contiguous; the kernels read one block as one contiguous tile per factor):
    ak (L, num_blocks, block_size, h, R_K)      bk (L, num_blocks, block_size, R_K, d_h)  RoPE'd
    av (L, num_blocks, block_size, h, R_V)      bv (L, num_blocks, block_size, R_V, d_h)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tpaserve.config import ConfigError, ModelConfig

_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def cache_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Bytes a paged cache holds per token, all layers, for any member of the family:
    layers x cache_elems_per_token_layer x itemsize, with per layer
        T6 / T6-KVonly  (R_K + R_V)(h + d_h)    the four factors (FactorCacheSpec below)
        MHA / GQA / MQA 2 n_kv d_h              keys and values of the kv heads: served as
                                                non-contextual TPA, A is a per-layer constant
        MLA             kv_lora_rank + rope     the latent and the shared RoPE'd key
    Only T6 has a cache today; the others' numbers size the one item 3 of #17 adds
    (docs/kernel_notes.md, "The family in the factor cache")."""
    return cfg.n_layer * cfg.cache_elems_per_token_layer * _ITEMSIZE[dtype]


@dataclass(frozen=True)
class FactorCacheSpec:
    n_layer: int
    n_head: int
    head_dim: int
    k_rank: int
    v_rank: int
    dtype: torch.dtype
    block_size: int
    mha_heads: int                  # heads of a same-size MHA model, for the comparison

    @classmethod
    def from_model(cls, cfg: ModelConfig, dtype: torch.dtype, block_size: int) -> "FactorCacheSpec":
        if not isinstance(cfg, ModelConfig):        # a module handed to the engine directly
            raise ConfigError(
                f"{type(cfg).__name__} ({getattr(cfg, 'variant', '?').upper()}): serving this "
                f"variant through the paged factor cache is not implemented yet (#17 item 3); "
                f"the engine serves T6 and T6-KVonly")
        return cls(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.k_rank, cfg.v_rank, dtype,
                   block_size, cfg.mha_equivalent_heads)

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def bytes_per_token(self) -> int:
        """layers * (R_K + R_V)(h + d_h) * itemsize."""
        return self.n_layer * (self.k_rank + self.v_rank) * (self.n_head + self.head_dim) * self.itemsize

    @property
    def mha_bytes_per_token(self) -> int:
        """What an MHA model of the same size (d_model / d_h heads) caches: 2 h d_h per layer."""
        return self.n_layer * 2 * self.mha_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, nbytes: int) -> int:
        return nbytes // self.bytes_per_block

    def summary(self, num_blocks: int) -> str:
        tokens = num_blocks * self.block_size
        total = num_blocks * self.bytes_per_block
        mha = total // self.mha_bytes_per_token
        return (f"factor cache: {self.bytes_per_token} B/token ({self.dtype}), {num_blocks} blocks x "
                f"{self.block_size} = {tokens} tokens in {total / 2**30:.2f} GiB; a same-size MHA "
                f"model ({self.mha_heads} heads) would fit {mha} tokens "
                f"({self.mha_bytes_per_token / self.bytes_per_token:.1f}x fewer)")


class FactorCache:
    """The four cache tensors. `layer(i)` gives the per-layer views the kernels take."""

    def __init__(self, spec: FactorCacheSpec, num_blocks: int, device: torch.device | str):
        s, L = spec, spec.n_layer
        self.spec, self.num_blocks = spec, num_blocks
        mk = lambda *shape: torch.zeros((L, num_blocks, s.block_size, *shape), dtype=s.dtype, device=device)
        self.ak = mk(s.n_head, s.k_rank)
        self.bk = mk(s.k_rank, s.head_dim)
        self.av = mk(s.n_head, s.v_rank)
        self.bv = mk(s.v_rank, s.head_dim)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ak[i], self.bk[i], self.av[i], self.bv[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.ak, self.bk, self.av, self.bv))
