"""The attention interface T6 layers are written against, and the full-sequence oracle.

A T6 layer turns its tokens into factors and hands them to an `AttentionBackend`:

    out = backend(layer, q, AK, BK, AV, BV, cos, sin)
      q   (T, h, d_h)    queries, RoPE applied, already divided by R_Q
      AK  (T, h, R_K)    key head-mixing factor (raw; the backend divides by R_K)
      BK  (T, R_K, d_h)  key basis *before* RoPE: the backend rotates it once, as it
                         stores it ("pre-rotation"), so a GPU backend fuses RoPE into the store
      AV  (T, h, R_V)    value head-mixing factor (raw; the backend divides by R_V)
      BV  (T, R_V, d_h)  value basis
      cos, sin (T, d_h/2) fp32 RoPE angles of the tokens' positions
      out (T, h, d_h)    softmax(q.k / sqrt(d_h)) v with k = AK RoPE(BK) / R_K, v = AV BV / R_V

The backend owns the step's metadata (which sequence each token belongs to, where its
factors go in the cache). It does two things: write these tokens' factors where later
steps will find them, and attend each query over its sequence's cached factors
(causally). The paged engine implements it over the block-paged factor cache; this file
implements the plain full-sequence version: every sequence is given whole, nothing is
cached, k and v are materialised. It is the oracle the paged paths are tested against.

MLA (models/mla.py) is not TPA-shaped. A backend that caches its latent offers
`latent` (LatentBackend below; the paged engine's does) and the layer then runs the
absorbed form over it; a backend without it (this oracle) gets materialised heads through
`dense`:

    o_lat = backend.latent(layer, q, c, k_pe, scale)
      q     (T, h, kv_lora + rope)  [W_uk^T q_nope, RoPE(q_pe)] per head
      c     (T, kv_lora)            kv_a_layernorm of the token's latent
      k_pe  (T, rope)               the shared key part, as cached (RoPE'd by the model)
      o_lat (T, h, kv_lora)         softmax(scale q . [c, k_pe]) c per head (before W_uv)
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from tpaserve.models.layers import Rotary


class AttentionBackend(Protocol):
    def __call__(self, layer: int, q: torch.Tensor, ak: torch.Tensor, bk: torch.Tensor,
                 av: torch.Tensor, bv: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> torch.Tensor: ...


class LatentBackend(Protocol):
    def latent(self, layer: int, q: torch.Tensor, c: torch.Tensor, k_pe: torch.Tensor,
               scale: float) -> torch.Tensor: ...


def materialize(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(T, h, R), (T, R, d_h) -> (T, h, d_h) = a @ b / R."""
    return torch.einsum("thr,trd->thd", a.float(), b.float()) / a.size(-1)


class FullSequenceAttention:
    """Causal attention over whole sequences packed back to back.

    cu_seqlens (B+1,): sequence i holds tokens cu_seqlens[i]:cu_seqlens[i+1], positions
    0..len-1. Computes in fp32 and returns q's dtype.
    """

    def __init__(self, cu_seqlens: list[int]):
        self.cu_seqlens = cu_seqlens

    def __call__(self, layer, q, ak, bk, av, bv, cos, sin):
        k = materialize(ak, Rotary.apply(bk, cos, sin))           # (T, h, d_h)
        v = materialize(av, bv)
        return self.dense(layer, q, k, v)

    def dense(self, layer: int, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> torch.Tensor:
        """Materialised heads (MLA, mla.py): q, k (T, h, d_qk), v (T, h, d_v), RoPE already
        applied -> softmax(q.k / sqrt(d_qk)) v (T, h, d_v) in q's dtype. Only this
        full-sequence oracle has it: no paged backend caches materialised heads."""
        out = q.new_empty(*q.shape[:2], v.size(-1))
        scale = 1.0 / math.sqrt(q.size(-1))
        for s, e in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:]):
            qs, ks, vs = (t[s:e].transpose(0, 1).float() for t in (q, k, v))  # (h, L, d)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
            out[s:e] = o.transpose(0, 1).to(q.dtype)
        return out
