"""T6 and T6-KVonly (../shared/TPA.md section 2) as nn.Modules whose parameter names are
the authors' state-dict keys, so their checkpoints load without renaming.

The model works on a flat batch of tokens: forward(input_ids (T,), positions (T,),
attn) -> hidden (T, d_model). Which sequence a token belongs to, and where its factors
are cached, is the attention backend's business (models/attention.py).

Decode speed (a step is ~10 launches per layer, not ~30): `fuse_projections()` runs each
layer's factor projections as one GEMM and the MLP's c_fc1/c_fc2 as another (the Linears'
weights become views of the fused weight; state_dict unchanged), and on CUDA the
elementwise tails are Triton kernels (kernels/fused.py): query formation with RoPE,
silu(a) * b, and residual add + RMSNorm in one pass. The residual stream is carried with
its norm, so each add is fused with the norm that follows it (the final norm included).
With kernels on, the per-layer GEMMs of decode-sized batches run as kernels/linear.py's
skinny GEMM (use_skinny); lm_head stays on cuBLAS (already near bandwidth).
"""
from __future__ import annotations

import torch
from torch import nn

from tpaserve.config import ModelConfig
from tpaserve.kernels.reference import query_ref
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


class FactorProjections(FusibleLinears):
    """c_qkv: the linear maps from x to the TPA factors. A outputs are viewed (h, R)
    head-major, B outputs (R, d_h) rank-major. project(x) returns, in this order,
    [A_Q, B_Q, A_K, B_K, A_V, B_V] (KVonly: [q, A_K, B_K, A_V, B_V]), each (T, out_i)."""

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

    def _fusible(self) -> list[nn.Linear]:
        q = [self.c_q] if hasattr(self, "c_q") else [self.W_A_q, self.W_B_q]
        return q + [self.W_A_k, self.W_B_k, self.W_A_v, self.W_B_v]


class TPAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.c_qkv = FactorProjections(cfg)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)
        # per-head RMSNorm with weight on the attention output (config flag using_groupnorm)
        self.subln = WeightedRMSNorm(cfg.head_dim, GROUPNORM_EPS) if cfg.using_groupnorm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn: AttentionBackend, kernels: bool = False) -> torch.Tensor:
        cfg, T = self.cfg, x.size(0)
        h, dh = cfg.n_head, cfg.head_dim
        # column views of one GEMM's output once fused: token stride = its width
        *qp, ak, bk, av, bv = self.c_qkv.project(x, kernels)
        if cfg.kv_only:
            xq = qp[0].view(T, h, dh)
            q = fused_ops().rope_queries(xq, cos, sin) if kernels else Rotary.apply(xq, cos, sin)
        else:
            aq = qp[0].view(T, h, cfg.q_rank)                                    # (T, h, R_Q)
            bq = qp[1].view(T, cfg.q_rank, dh)                                   # (T, R_Q, d_h)
            # q = A_Q RoPE(B_Q) / R_Q for this step's tokens only: T*h*d_h numbers, never
            # per cached token.
            q = (fused_ops().form_queries if kernels else query_ref)(aq, bq, cos, sin)
        ak = ak.view(T, h, cfg.k_rank)                                           # (T, h, R_K)
        bk = bk.view(T, cfg.k_rank, dh)                    # (T, R_K, d_h), rotated by attn
        av = av.view(T, h, cfg.v_rank)                                           # (T, h, R_V)
        bv = bv.view(T, cfg.v_rank, dh)                                          # (T, R_V, d_h)
        y = attn(self.layer, q, ak, bk, av, bv, cos, sin)                        # (T, h, d_h)
        if self.subln is not None:
            y = self.subln(y)
        return linear(y.reshape(T, h * dh), self.c_proj.weight, kernels)


class T6(DecoderLM):
    """T6 / T6-KVonly language model (which one: cfg.kv_only)."""

    attention = TPAttention
