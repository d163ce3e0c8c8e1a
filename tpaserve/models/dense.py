"""The paper's baselines MHA, GQA and MQA (the authors' model/llama-mha.py and
model/llama-gqa.py) on the shared decoder, parameter names = the authors' state-dict keys:
    transformer.h.i.attn.c_q.weight (h*d_h, d), c_k / c_v (n_kv*d_h, d),
    attn.c_proj.weight (d, h*d_h), attn.subln.weight (d_h) if using_groupnorm.
Query head j reads kv head j // (h / n_kv) (their repeat_interleave); MQA is n_kv = 1.

Attention is written as *non-contextual* TPA, so the same AttentionBackend (and the
full-sequence oracle) serves it: B_K = the n_kv key heads (before RoPE), B_V = the value
heads, and the head-mixing factors are constants, A_K[j, g] = A_V[j, g] = n_kv if kv head g
serves query head j else 0 (the backend divides by R = n_kv). Only B varies per token:
that is what a paged cache of these models needs to hold (docs/kernel_notes.md, "the
family in the factor cache").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpaserve.config import ConfigError, check_rope_table_dtype
from tpaserve.models.attention import AttentionBackend
from tpaserve.models.decoder import DecoderLM
from tpaserve.models.layers import (
    GROUPNORM_EPS,
    FusibleLinears,
    Rotary,
    WeightedRMSNorm,
    fused_ops,
    linear,
)


@dataclass(frozen=True)
class DenseConfig:
    """Shape of an MHA / GQA / MQA model. head_dim: the authors' llama-mha derives it as
    n_embd // n_head (ignoring config.json's head_dim); llama-gqa reads head_dim."""
    n_layer: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_embd: int
    vocab_size: int
    max_position: int = 1024
    using_groupnorm: bool = False
    rope_base: float = 10000.0
    rope_table_dtype: str = "float32"
    name: str = "llama"

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_head", "n_kv_head", "head_dim", "n_embd", "vocab_size",
                  "max_position"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model config: {f} must be a positive integer, got {v!r}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"model config: n_kv_head {self.n_kv_head} must divide n_head "
                              f"{self.n_head}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE, got {self.head_dim}")
        check_rope_table_dtype(self.rope_table_dtype)

    @property
    def variant(self) -> str:
        return ("mha" if self.n_kv_head == self.n_head
                else "mqa" if self.n_kv_head == 1 else "gqa")

    @property
    def mlp_hidden(self) -> int:
        return int(8 * self.n_embd / 3)

    @property
    def cache_elems_per_token_layer(self) -> int:
        """Keys and values of the kv heads: 2 n_kv d_h (the A factors are constants)."""
        return 2 * self.n_kv_head * self.head_dim


class DenseAttention(FusibleLinears):
    def __init__(self, cfg: DenseConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, h, g, dh = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.c_q = nn.Linear(d, h * dh, bias=False)
        self.c_k = nn.Linear(d, g * dh, bias=False)
        self.c_v = nn.Linear(d, g * dh, bias=False)
        self.c_proj = nn.Linear(h * dh, d, bias=False)
        self.subln = WeightedRMSNorm(dh, GROUPNORM_EPS) if cfg.using_groupnorm else None
        self._mixing: dict[tuple, torch.Tensor] = {}    # (device, dtype) -> (h, n_kv)

    def _fusible(self) -> list[nn.Linear]:
        return [self.c_q, self.c_k, self.c_v]

    def mixing(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The constant A (h, n_kv): n_kv at [j, j // group], else 0 (built once per
        device and dtype; a plain attribute, so the meta-device loader never sees it)."""
        key = (device, dtype)
        if key not in self._mixing:
            h, g = self.cfg.n_head, self.cfg.n_kv_head
            group = torch.arange(h, device=device) // (h // g)                   # (h,)
            a = torch.zeros(h, g, device=device, dtype=dtype)
            a[torch.arange(h, device=device), group] = g
            self._mixing[key] = a
        return self._mixing[key]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, kernels: bool = False) -> torch.Tensor:
        cfg, T = self.cfg, x.size(0)
        h, g, dh = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        xq, k, v = self.project(x, kernels)                 # (T, h*d_h), (T, g*d_h) x 2
        xq = xq.view(T, h, dh)
        q = fused_ops().rope_queries(xq, cos, sin) if kernels else Rotary.apply(xq, cos, sin)
        a = self.mixing(x.device, x.dtype).expand(T, h, g)  # (T, h, n_kv), stride 0 over T
        y = attn(self.layer, q, a, k.view(T, g, dh), a, v.view(T, g, dh), cos, sin)
        if self.subln is not None:
            y = self.subln(y)                                                   # (T, h, d_h)
        return linear(y.reshape(T, h * dh), self.c_proj.weight, kernels)


class DenseLM(DecoderLM):
    """MHA / GQA / MQA language model (which one: cfg.variant)."""

    attention = DenseAttention
