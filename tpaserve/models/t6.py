"""T6 and T6-KVonly (../shared/TPA.md section 2) as nn.Modules whose parameter names are
the authors' state-dict keys, so their checkpoints load without renaming.

The model works on a flat batch of tokens: forward(input_ids (T,), positions (T,),
attn) -> hidden (T, d_model). Which sequence a token belongs to, and where its factors
are cached, is the attention backend's business (models/attention.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpaserve.config import ModelConfig
from tpaserve.models.attention import AttentionBackend
from tpaserve.models.layers import Rotary, SwiGLU, rms_norm

GROUPNORM_EPS = 1e-5


class FactorProjections(nn.Module):
    """c_qkv: the linear maps from x to the TPA factors. A outputs are viewed (h, R)
    head-major, B outputs (R, d_h) rank-major."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h, dh = cfg.n_embd, cfg.n_head, cfg.head_dim
        if cfg.kv_only:
            self.c_q = nn.Linear(d, h * dh, bias=False)
        else:
            self.W_A_q = nn.Linear(d, h * cfg.q_rank, bias=False)
            self.W_B_q = nn.Linear(d, cfg.q_rank * dh, bias=False)
        self.W_A_k = nn.Linear(d, h * cfg.k_rank, bias=False)
        self.W_B_k = nn.Linear(d, cfg.k_rank * dh, bias=False)
        self.W_A_v = nn.Linear(d, h * cfg.v_rank, bias=False)
        self.W_B_v = nn.Linear(d, cfg.v_rank * dh, bias=False)


class HeadRMSNorm(nn.Module):
    """Per-head RMSNorm with weight (d_h,), eps 1e-5 (config flag using_groupnorm)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(y, (y.size(-1),), self.weight, eps=GROUPNORM_EPS)


class TPAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.c_qkv = FactorProjections(cfg)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        self.subln = HeadRMSNorm(cfg.head_dim) if cfg.using_groupnorm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend) -> torch.Tensor:
        cfg, c, T = self.cfg, self.c_qkv, x.size(0)
        h, dh = cfg.n_head, cfg.head_dim
        if cfg.kv_only:
            q = Rotary.apply(c.c_q(x).view(T, h, dh), cos, sin)                  # (T, h, d_h)
        else:
            aq = c.W_A_q(x).view(T, h, cfg.q_rank)                               # (T, h, R_Q)
            bq = Rotary.apply(c.W_B_q(x).view(T, cfg.q_rank, dh), cos, sin)      # (T, R_Q, d_h)
            # q for this step's tokens only: T*h*d_h numbers, never per cached token.
            q = (torch.bmm(aq.float(), bq.float()) / cfg.q_rank).to(x.dtype)    # (T, h, d_h)
        ak = c.W_A_k(x).view(T, h, cfg.k_rank)                                   # (T, h, R_K)
        bk = c.W_B_k(x).view(T, cfg.k_rank, dh)            # (T, R_K, d_h), rotated by attn
        av = c.W_A_v(x).view(T, h, cfg.v_rank)                                   # (T, h, R_V)
        bv = c.W_B_v(x).view(T, cfg.v_rank, dh)                                  # (T, R_V, d_h)
        y = attn(self.layer, q, ak, bk, av, bv, cos, sin)                                # (T, h, d_h)
        if self.subln is not None:
            y = self.subln(y)
        return self.c_proj(y.reshape(T, h * dh))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn = TPAttention(cfg, layer)
        self.mlp = SwiGLU(cfg.n_embd, cfg.mlp_hidden)

    def forward(self, x, cos, sin, attn):
        x = x + self.attn(rms_norm(x), cos, sin, attn)
        return x + self.mlp(rms_norm(x))


class T6(nn.Module):
    """T6 / T6-KVonly language model (which one: cfg.kv_only)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight            # tied
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBackend) -> torch.Tensor:
        """input_ids, positions: (T,) -> final-normed hidden states (T, d_model)."""
        cos, sin = self.rotary.cos_sin(positions)                     # (T, d_h/2) fp32
        x = self.transformer.wte(input_ids)
        for block in self.transformer.h:
            x = block(x, cos, sin, attn)
        return rms_norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d_model) -> (N, vocab) fp32. Call only on rows that sample."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02) -> "T6":
        """Random weights (tests and benchmarks); groupnorm weights stay 1 + noise."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_((1.0 + noise * 5) if name.endswith("subln.weight") else noise)
        return self
