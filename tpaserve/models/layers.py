"""Building blocks of T6 that carry no attention state: norm, RoPE, SwiGLU.

Conventions follow ../shared/TPA.md section 2 exactly; the trained weights only
reproduce with them (parameter-free RMSNorm with torch's default eps, half-split RoPE
rotating by -theta).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpaserve.kernels.reference import rope_ref


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim, eps = torch's default (dtype's eps)."""
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """RoPE with base `base` over d_h, half-split pairing (i, i + d_h/2) and T6's sign:
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.

    cos/sin are computed in fp32 from integer positions on every call (positions of a
    paged step are arbitrary, so there is no contiguous cache to slice).
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        # fp32 always: a plain attribute, not a buffer, so model.to(bfloat16) cannot round it
        self._inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        theta = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]  # (T, d_h/2)
        return theta.cos(), theta.sin()

    # (T, n, d_h) x (T, d_h/2) cos, sin -> rotated (T, n, d_h); one definition, shared with
    # the kernels' references.
    apply = staticmethod(rope_ref)


class SwiGLU(nn.Module):
    """out = W3(silu(W1 x) * W2 x); hidden = floor(8/3 d). No biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.c_fc1 = nn.Linear(d_model, hidden, bias=False)   # gate (silu side)
        self.c_fc2 = nn.Linear(d_model, hidden, bias=False)   # up
        self.c_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))
