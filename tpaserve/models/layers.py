"""Building blocks of T6 that carry no attention state: norm, RoPE, SwiGLU, and the
fused-GEMM view of several Linears that share an input.

Conventions follow ../shared/TPA.md section 2 exactly; the trained weights only
reproduce with them (parameter-free RMSNorm with torch's default eps, half-split RoPE
rotating by -theta).

`kernels=True` (the model sets it on CUDA) routes the elementwise tails through the Triton
kernels of kernels/fused.py, and the per-layer GEMMs through kernels/linear.py's skinny GEMM
where its use_skinny rule says it beats cuBLAS (decode batches); `kernels=False` is plain
torch and computes what the model always computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tpaserve.kernels.reference import rope_ref


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim, eps = torch's default. Note that default is
    the eps of the dtype torch *computes* in: fp32's for fp16/bf16 inputs, not bf16's."""
    return F.rms_norm(x, (x.size(-1),))


GROUPNORM_EPS = 1e-5                      # the authors' subln (config flag using_groupnorm)
LATENT_NORM_EPS = 1e-6                    # their RMSNorm default: MLA's q_a / kv_a norms


class WeightedRMSNorm(nn.Module):
    """RMSNorm with a weight (dim,) over the last dim: the authors' per-head subln (eps
    1e-5) and MLA's latent norms (eps 1e-6). Theirs normalises in fp32, rounds to the input
    dtype, then scales; F.rms_norm is the same function up to that rounding."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, eps=self.eps)


def fused_ops():
    """kernels/fused.py, imported on first use (it needs triton; CPU-only paths never do)."""
    from tpaserve.kernels import fused
    return fused


def linear(x: torch.Tensor, weight: torch.Tensor, kernels: bool) -> torch.Tensor:
    """x (T, d_in) @ weight (d_out, d_in)^T: the skinny-GEMM kernel (kernels/linear.py) when
    `kernels` and its use_skinny rule pick it, else F.linear."""
    if kernels:
        from tpaserve.kernels import linear as skinny
        if skinny.use_skinny(x.shape[0], weight.shape[0], weight.shape[1]):
            return skinny.linear(x, weight)
    return F.linear(x, weight)


def add_rms_norm(x: torch.Tensor, y: torch.Tensor,
                 kernels: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual step: x + y, and rms_norm of it. (T, d), (T, d) -> (new x, normed).
    With kernels the sum is written into x in place (one pass, one launch)."""
    if kernels:
        return x, fused_ops().add_rms_norm_(x, y)
    x = x + y
    return x, rms_norm(x)


class Rotary(nn.Module):
    """RoPE with base `base` over `dim` (d_h), half-split pairing (i, i + dim/2) and T6's sign:
    y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.

    cos/sin are computed in fp32 from integer positions on every call (positions of a
    paged step are arbitrary, so there is no contiguous cache to slice). table_dtype
    "bfloat16" then rounds them to bf16 and back: the authors' Rotary does
    `freqs.cos().bfloat16()` whatever dtype the model runs in, so every checkpoint they
    trained saw those tables (exact fp32 ones move prompt logprobs by ~1e-2 nats). The
    tables stay fp32 *tensors* either way, so every consumer (reference path, query and
    store kernels, CUDA graphs) takes them unchanged: they are built here and only here.
    """

    def __init__(self, dim: int, base: float = 10000.0, table_dtype: str = "float32"):
        super().__init__()
        # fp32 always: a plain attribute, not a buffer, so model.to(bfloat16) cannot round it
        self._inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.table_dtype = table_dtype
        self._round = {"bfloat16": torch.bfloat16, "float32": None}[table_dtype]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) int -> cos, sin (T, dim/2) fp32 (values bf16-exact if rounded)."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        theta = positions.to(torch.float32)[:, None] * self._inv_freq[None, :]  # (T, dim/2)
        cos, sin = theta.cos(), theta.sin()
        if self._round is not None:
            cos, sin = cos.to(self._round).float(), sin.to(self._round).float()
        return cos, sin

    def extra_repr(self) -> str:
        return f"dim={2 * self._inv_freq.numel()}, tables={self.table_dtype}"

    # (T, n, d_h) x (T, d_h/2) cos, sin -> rotated (T, n, d_h); one definition, shared with
    # the kernels' references.
    apply = staticmethod(rope_ref)


class FusedLinear:
    """Bias-free nn.Linears of one input run as one GEMM.

    The weights are copied once into one (out_total, d_in) tensor, segment i at rows
    offsets[i] : offsets[i] + sizes[i], and each Linear's weight becomes a Parameter that is
    a *view* of its segment: memory does not double, state_dict keys and values stay the
    same, and in-place updates (load_state_dict's copy_) reach the fused weight.
    Segments start at multiples of ALIGN rows (zero rows between them), so every output
    slice starts 16-byte aligned in half precision and the GEMM's output row stride is a
    multiple of 8 elements.

    Anything that replaces a weight instead of writing into it (`weight.data = ...`,
    load_state_dict(assign=True)) breaks the sharing; `intact()` notices (one data_ptr per
    segment) and the owner falls back to the separate Linears, which are always right.
    """

    ALIGN = 8

    def __init__(self, linears: list[nn.Linear]):
        w0 = linears[0].weight
        for lin in linears:
            assert lin.bias is None and lin.in_features == w0.shape[1]
            assert lin.weight.dtype == w0.dtype and lin.weight.device == w0.device
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self.offsets, total = [], 0
        for n in self.sizes:
            self.offsets.append(total)
            total += -(-n // self.ALIGN) * self.ALIGN
        self.weight = torch.zeros(total, w0.shape[1], dtype=w0.dtype, device=w0.device)
        with torch.no_grad():
            for lin, off, n in zip(linears, self.offsets, self.sizes):
                seg = self.weight[off:off + n]                        # (n, d_in) view
                seg.copy_(lin.weight)
                lin.weight = nn.Parameter(seg, requires_grad=lin.weight.requires_grad)
        self._ptrs = tuple(lin.weight.data_ptr() for lin in linears)

    def intact(self) -> bool:
        return all(lin.weight.data_ptr() == p for lin, p in zip(self.linears, self._ptrs))

    def __call__(self, x: torch.Tensor, kernels: bool = False) -> list[torch.Tensor]:
        """(T, d_in) -> [(T, size_i)] column views of one (T, out_total) GEMM output."""
        y = linear(x, self.weight, kernels)
        return [y[:, off:off + n] for off, n in zip(self.offsets, self.sizes)]


class FusibleLinears(nn.Module):
    """A module whose Linears (listed by `_fusible()`, in output order) may share one
    GEMM. `fuse()` builds it; `project(x)` returns each Linear's output either way.

    module.to()/.half()/.cuda() give every parameter its own storage again, so `_apply`
    re-fuses afterwards."""

    _fused: FusedLinear | None = None

    def _fusible(self) -> list[nn.Linear]:
        raise NotImplementedError

    def fuse(self) -> None:
        if self._fused is None or not self._fused.intact():
            self._fused = FusedLinear(self._fusible())

    def is_fused(self) -> bool:
        return self._fused is not None and self._fused.intact()

    def project(self, x: torch.Tensor, kernels: bool = False) -> list[torch.Tensor]:
        # Under autograd the separate Linears run: the fused weight is a plain tensor that
        # would route no gradient to the parameters.
        if self._fused is not None and not torch.is_grad_enabled() and self._fused.intact():
            return self._fused(x, kernels)
        return [lin(x) for lin in self._fusible()]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._fused is not None and not self._fused.intact():
            # the old fused weight is still alive here, so no new parameter can reuse its
            # addresses and look intact by accident
            self._fused = None
            self.fuse()
        return self


class SwiGLU(FusibleLinears):
    """out = W3(silu(W1 x) * W2 x); hidden = floor(8/3 d). No biases."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.c_fc1 = nn.Linear(d_model, hidden, bias=False)   # gate (silu side)
        self.c_fc2 = nn.Linear(d_model, hidden, bias=False)   # up
        self.c_proj = nn.Linear(hidden, d_model, bias=False)

    def _fusible(self) -> list[nn.Linear]:
        return [self.c_fc1, self.c_fc2]

    def forward(self, x: torch.Tensor, kernels: bool = False) -> torch.Tensor:
        gate, up = self.project(x, kernels)                         # (T, hidden) each
        hidden = fused_ops().silu_mul(gate, up) if kernels else F.silu(gate) * up
        return linear(hidden, self.c_proj.weight, kernels)
