"""The paper's MLA baseline (multi-head latent attention as in DeepSeek-V2, the authors'
llama-mla.py) on the shared decoder. Parameter names are the authors' state-dict keys
(i = layer):
    attn.q_a_proj.weight (q_lora, d)            attn.q_a_layernorm.weight (q_lora)
    attn.q_b_proj.weight (h*(nope+rope), q_lora)
    attn.kv_a_proj_with_mqa.weight (kv_lora+rope, d)   attn.kv_a_layernorm.weight (kv_lora)
    attn.kv_b_proj.weight (h*(nope+v), kv_lora)  attn.c_proj.weight (d, h*v)
    attn.subln.weight (nope+rope) if using_groupnorm (their code then needs v == nope+rope)
with nope = config.json head_dim, rope = qk_rope_head_dim, v = v_head_dim.

Per token: q = q_b(norm(q_a x)) split per head into [q_nope, q_pe]; [c, k_pe] = kv_a x;
[k_nope, v] = kv_b(norm(c)) per head; RoPE on q_pe and on the one shared k_pe;
k = [k_nope, k_pe]; scale 1/sqrt(nope + rope).

Two forms of the same attention (models/attention.py):
- plain (the full-sequence oracle, FullSequenceAttention.dense): k and v materialised per
  head from the latent, as the authors compute it;
- absorbed (a backend with `latent`, the paged engine): the cache holds per token only
  [norm(c), k_pe] (kv_lora + rope numbers per layer, shared by every head), and with
  kv_b_proj viewed as W (h, nope + v, kv_lora) = [W_uk; W_uv] per head,
      q_lat[h] = W_uk[h]^T q_nope[h]                     (one bmm over heads, in the model)
      o_lat[h] = softmax(scale [q_lat, q_pe] . [c, k_pe]) c   (the backend, over the cache)
      y[h]     = W_uv[h] o_lat[h]                        (one bmm over heads)
  which equals the plain form because k_nope[h] = W_uk[h] c and v[h] = W_uv[h] c.

RoPE positions (config.json `mla_rope`, absent = "positions"): "positions" follows the
authors' current code (T6-new/model/llama-mla.py). Their older model/llama-mla.py passed
tensors laid out (batch, heads, time, dim) to Rotary, which reads the sequence length from
axis 1: q_pe was turned by its *head index* (one angle per head, the same at every position)
and the one-head k_pe by angle 0, i.e. not at all. The state dict cannot tell the two apart,
so a checkpoint trained with that file needs `"mla_rope": "head_index"` in its config.json.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tpaserve.config import ConfigError, check_rope_table_dtype
from tpaserve.models.decoder import DecoderLM
from tpaserve.models.layers import (
    GROUPNORM_EPS,
    LATENT_NORM_EPS,
    Rotary,
    WeightedRMSNorm,
    linear,
)

MLA_ROPE = ("positions", "head_index")


@dataclass(frozen=True)
class MLAConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    q_lora_rank: int
    kv_lora_rank: int
    qk_nope_head_dim: int                  # config.json head_dim
    qk_rope_head_dim: int
    v_head_dim: int
    max_position: int = 1024
    using_groupnorm: bool = False
    rope_base: float = 10000.0
    rope_table_dtype: str = "float32"
    mla_rope: str = "positions"            # MLA_ROPE: see the module docstring
    name: str = "llama-mla"

    def __post_init__(self) -> None:
        for f in ("n_layer", "n_head", "n_embd", "vocab_size", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"model config: {f} must be a positive integer, got {v!r}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model config: qk_rope_head_dim must be even for RoPE, got "
                              f"{self.qk_rope_head_dim}")
        if self.using_groupnorm and self.v_head_dim != self.q_head_dim:
            raise ConfigError(
                f"model config: using_groupnorm normalises each head's output with a weight of "
                f"head_dim + qk_rope_head_dim = {self.q_head_dim} numbers, but v_head_dim is "
                f"{self.v_head_dim} (the authors' llama-mla cannot run this either)")
        check_rope_table_dtype(self.rope_table_dtype)
        if self.mla_rope not in MLA_ROPE:
            raise ConfigError(f"model config: mla_rope must be one of {', '.join(MLA_ROPE)}, "
                              f"got {self.mla_rope!r}")

    variant = "mla"

    @property
    def q_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(8 * self.n_embd / 3)

    @property
    def cache_elems_per_token_layer(self) -> int:
        """The latent c and the shared RoPE'd key: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim


class MLAttention(nn.Module):
    def __init__(self, cfg: MLAConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        d, h = cfg.n_embd, cfg.n_head
        self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = WeightedRMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.q_head_dim, bias=False)
        self.kv_a_layernorm = WeightedRMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                            bias=False)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                   bias=False)
        self.c_proj = nn.Linear(h * cfg.v_head_dim, d, bias=False)
        self.subln = (WeightedRMSNorm(cfg.q_head_dim, GROUPNORM_EPS) if cfg.using_groupnorm
                      else None)
        self._head_tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def head_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables at "positions" 0..h-1 (mla_rope "head_index"), the model's kind of
        table (bf16-rounded or exact); built on first use, outside the loader's meta device."""
        if self._head_tables is None or self._head_tables[0].device != device:
            rot = Rotary(self.cfg.qk_rope_head_dim, self.cfg.rope_base, self.cfg.rope_table_dtype)
            self._head_tables = rot.cos_sin(torch.arange(self.cfg.n_head, device=device))
        return self._head_tables

    def forward(self, x, cos, sin, attn, kernels: bool = False) -> torch.Tensor:
        """x (T, d); cos, sin (T, rope/2). attn: a backend with `latent` (the absorbed
        form over a latent cache) or with `dense` (the full-sequence oracle)."""
        cfg, T = self.cfg, x.size(0)
        h, nope, rope, dv = cfg.n_head, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(T, h, nope + rope)
        c, k_pe = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], dim=-1)
        c = self.kv_a_layernorm(c)                                        # (T, kv_lora)
        q_pe, k_pe = self._rope(q[..., nope:], k_pe, cos, sin)   # (T, h, rope), (T, 1, rope)
        if hasattr(attn, "latent"):
            y = self._absorbed(attn, q[..., :nope], q_pe, c, k_pe.view(T, rope))
        else:
            kv = self.kv_b_proj(c).view(T, h, nope + dv)
            k_nope, v = kv.split([nope, dv], dim=-1)               # (T, h, nope), (T, h, v)
            q = torch.cat((q[..., :nope], q_pe), dim=-1)              # (T, h, nope + rope)
            k = torch.cat((k_nope, k_pe.expand(T, h, rope)), dim=-1)  # (T, h, nope + rope)
            y = attn.dense(self.layer, q, k, v)                                   # (T, h, v)
        if self.subln is not None:
            y = self.subln(y)
        return linear(y.reshape(T, h * dv), self.c_proj.weight, kernels)

    def _absorbed(self, attn, q_nope, q_pe, c, k_pe) -> torch.Tensor:
        """q_nope (T, h, nope), q_pe (T, h, rope), c (T, kv_lora), k_pe (T, rope) -> (T, h, v)."""
        cfg = self.cfg
        nope = cfg.qk_nope_head_dim
        w = self.kv_b_proj.weight.view(cfg.n_head, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        q_lat = torch.bmm(q_nope.transpose(0, 1), w[:, :nope])             # (h, T, kv_lora)
        q = torch.cat((q_lat.transpose(0, 1), q_pe), dim=-1)     # (T, h, kv_lora + rope)
        o_lat = attn.latent(self.layer, q, c, k_pe, 1.0 / cfg.q_head_dim ** 0.5)
        y = torch.bmm(o_lat.transpose(0, 1), w[:, nope:].transpose(1, 2))        # (h, T, v)
        return y.transpose(0, 1)                                                 # (T, h, v)

    def _rope(self, q_pe, k_pe, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """q_pe (T, h, rope), k_pe (T, rope) -> rotated (T, h, rope), (T, 1, rope)."""
        T, rope = k_pe.size(0), self.cfg.qk_rope_head_dim
        if self.cfg.mla_rope == "positions":
            q_pe = Rotary.apply(q_pe, cos, sin)                               # (T, h, rope)
            k_pe = Rotary.apply(k_pe.reshape(T, 1, rope), cos, sin)   # (T, 1, rope), shared
        else:               # the older file: head j's q_pe turned by angle(j), k_pe by 0
            cos_h, sin_h = self.head_tables(q_pe.device)                    # (h, rope/2)
            q_pe = Rotary.apply(q_pe.transpose(0, 1), cos_h, sin_h).transpose(0, 1)
            k_pe = k_pe.reshape(T, 1, rope)
        return q_pe, k_pe


class MLA(DecoderLM):
    """MLA language model (the authors' llama-mla)."""

    attention = MLAttention

    @staticmethod
    def rope_dim(cfg: MLAConfig) -> int:
        return cfg.qk_rope_head_dim
