"""The LLaMA-style decoder every model of the paper's family shares (../shared/TPA.md
section 2): tied embedding / lm_head, pre-norm blocks x += attn(norm(x)); x += mlp(norm(x)),
parameter-free RMSNorm, SwiGLU, one RoPE table builder. Only the attention differs:
T6 / T6-KVonly (t6.py), MHA / GQA / MQA (dense.py), MLA (mla.py).

A subclass sets `attention` (a module class built as attention(cfg, layer) whose forward is
(xn (T, d), cos, sin, attn backend, kernels) -> (T, d)) and `rope_dim` (which head width
RoPE turns). The config must give n_layer, n_embd, vocab_size, mlp_hidden, rope_base and
rope_table_dtype.
"""
from __future__ import annotations

import torch
from torch import nn

from tpaserve.models.attention import AttentionBackend
from tpaserve.models.layers import FusibleLinears, Rotary, SwiGLU, add_rms_norm, rms_norm

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Block(nn.Module):
    def __init__(self, attn: nn.Module, n_embd: int, mlp_hidden: int):
        super().__init__()
        self.attn = attn
        self.mlp = SwiGLU(n_embd, mlp_hidden)

    def forward(self, x, xn, cos, sin, attn, kernels: bool = False):
        """x: residual stream (T, d); xn = rms_norm(x). Returns the next (x, rms_norm(x))."""
        x, xn = add_rms_norm(x, self.attn(xn, cos, sin, attn, kernels), kernels)
        return add_rms_norm(x, self.mlp(xn, kernels), kernels)


class DecoderLM(nn.Module):
    attention: type[nn.Module]

    @staticmethod
    def rope_dim(cfg) -> int:
        return cfg.head_dim

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            h=nn.ModuleList(Block(self.attention(cfg, i), cfg.n_embd, cfg.mlp_hidden)
                            for i in range(cfg.n_layer)),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight            # tied
        self.rotary = Rotary(self.rope_dim(cfg), cfg.rope_base, cfg.rope_table_dtype)
        # Triton kernels for the elementwise tails: None = on CUDA tensors only (tests set
        # True to run them under TRITON_INTERPRET on the CPU).
        self.use_kernels: bool | None = None

    def fuse_projections(self):
        """One GEMM for each group of Linears sharing an input (FusibleLinears: the
        attention's projections, the MLP's c_fc1/c_fc2). Call after loading and after any
        dtype/device move; idempotent. Parameters become views of the fused weights;
        state_dict is unchanged."""
        for m in self.modules():
            if isinstance(m, FusibleLinears):
                m.fuse()
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn: AttentionBackend, kernels: bool | None = None) -> torch.Tensor:
        """input_ids, positions: (T,) -> final-normed hidden states (T, d_model).

        kernels: run the elementwise tails as Triton kernels (None: self.use_kernels, which
        defaults to "on CUDA"). The engine turns them on inside CUDA graphs only: a replay
        costs one launch per kernel, while an eager Triton launch costs ~50 us of host time
        (Triton 3.6), more than the torch ops it replaces (docs/kernel_notes.md)."""
        cos, sin = self.rotary.cos_sin(positions)                     # (T, rope_dim/2) fp32
        x = self.transformer.wte(input_ids)                           # (T, d), fresh tensor
        if kernels is None:
            kernels = x.is_cuda if self.use_kernels is None else self.use_kernels
        # Triton has no autograd; the kernels take fp16/bf16/fp32 (fp64 stays on torch)
        kernels = kernels and not torch.is_grad_enabled() and x.dtype in KERNEL_DTYPES
        xn = rms_norm(x)
        for block in self.transformer.h:
            x, xn = block(x, xn, cos, sin, attn, kernels)
        return xn                                # the last add's norm is the final norm

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, d_model) -> (N, vocab) fp32. Call only on rows that sample."""
        return self.lm_head(hidden).float()

    @torch.no_grad()
    def init_random(self, seed: int = 0, std: float = 0.02):
        """Random weights (tests and benchmarks); norm weights stay 1 + noise."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm = name.endswith(("subln.weight", "layernorm.weight"))
            p.copy_((1.0 + noise * 5) if is_norm else noise)
        return self
