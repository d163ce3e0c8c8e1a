"""An independent re-implementation of the authors' model classes (tensorgi/TPA: model/T6.py,
T6_kvonly.py, llama-mha.py, llama-gqa.py, llama-mla.py and T6-new/model/llama-mla.py),
written from their equations, conventions and state-dict key names, batch-first as theirs
are, sharing no code with tpaserve.models. It is the oracle for "an authors' checkpoint gives the authors'
logprobs" (tests/models/test_family.py).

What it reproduces on purpose, because trained weights depend on it:
- Rotary: fp32 angles torch.outer(arange(T), inv_freq), then cos/sin rounded to bfloat16
  (`exact=True` keeps fp32); rotation y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos over the
  halves of the last dim; an fp32 x times a bf16 table computes in fp32 (type promotion).
- their RMSNorm module (eps 1e-6 default, 1e-5 for subln): x * rsqrt(mean(x^2) + eps),
  computed in fp32, then times the weight; the block norms are parameter-free F.rms_norm.
- MHA's head_dim is n_embd // n_head whatever config head_dim says; GQA repeats kv head g
  for query heads g*group .. g*group + group - 1 (repeat_interleave).
`save_authors_checkpoint` writes config.json the way their train script does (its model_args,
model_type "gpt2", no tpaserve fields) and the state dict in a chosen file format.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn


@dataclass
class AuthorsConfig:
    """Their GPTConfig fields (model_args of train_adam.py, plus each file's extras)."""
    kind: str                      # "t6" | "t6-kvonly" | "mha" | "gqa" | "mla" | "mla-v1"
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    head_dim: int = 8
    rank: int = 2
    q_rank: int = 6
    vocab_size: int = 61
    block_size: int = 256
    using_groupnorm: bool = False
    group_size: int = 1            # gqa only
    q_lora_rank: int = 12          # mla only (their class defaults; not in config.json)
    kv_lora_rank: int = 10
    qk_rope_head_dim: int = 6
    v_head_dim: int = 8
    extra: dict = field(default_factory=dict)

    def config_json(self) -> dict:
        raw = dict(model_type="gpt2", n_layer=self.n_layer, n_head=self.n_head,
                   n_embd=self.n_embd, block_size=self.block_size, bias=False,
                   head_dim=self.head_dim, rank=self.rank, q_rank=self.q_rank,
                   using_groupnorm=self.using_groupnorm, vocab_size=self.vocab_size,
                   dropout=0.0, scale_attn_by_inverse_layer_idx=True)
        if self.kind == "gqa":
            raw["group_size"] = self.group_size
        return raw | self.extra


def rotary_tables(T: int, dim: int, exact: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, T, 1, dim/2) cos, sin: bf16 (their Rotary) or fp32 (exact)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(T, device=device).float(), inv_freq.to(device))
    cos, sin = freqs.cos(), freqs.sin()
    if not exact:
        cos, sin = cos.bfloat16(), sin.bfloat16()
    return cos[None, :, None, :], sin[None, :, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) -> rotated, x's dtype."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1).type_as(x)


class WeightedRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) \
            * self.weight


def causal(q, k, v, scale=None):
    """q, k, v (B, T, H, D) -> (B, H, T, Dv) (the layout their subln sees)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), is_causal=True, scale=scale)


class FactorLinears(nn.Module):
    """T6's c_qkv (CPLinear): W_A_* (h*R, d) head-major, W_B_* (R*d_h, d) rank-major."""

    def __init__(self, c: AuthorsConfig):
        super().__init__()
        d, h, dh = c.n_embd, c.n_head, c.head_dim
        if c.kind == "t6-kvonly":
            self.c_q = nn.Linear(d, h * dh, bias=False)
        else:
            self.W_A_q = nn.Linear(d, h * c.q_rank, bias=False)
        self.W_A_k = nn.Linear(d, h * c.rank, bias=False)
        self.W_A_v = nn.Linear(d, h * c.rank, bias=False)
        if c.kind != "t6-kvonly":
            self.W_B_q = nn.Linear(d, c.q_rank * dh, bias=False)
        self.W_B_k = nn.Linear(d, c.rank * dh, bias=False)
        self.W_B_v = nn.Linear(d, c.rank * dh, bias=False)


class T6Attention(nn.Module):
    def __init__(self, c: AuthorsConfig):
        super().__init__()
        self.c = c
        self.c_qkv = FactorLinears(c)
        self.c_proj = nn.Linear(c.n_head * c.head_dim, c.n_embd, bias=False)
        if c.using_groupnorm:
            self.subln = WeightedRMSNorm(c.head_dim, eps=1e-5)

    def forward(self, x, exact):
        c, (B, T, _) = self.c, x.shape
        h, dh, r = c.n_head, c.head_dim, c.rank
        f = self.c_qkv
        cos, sin = rotary_tables(T, dh, exact, x.device)
        a_k = f.W_A_k(x).view(B, T, h, r)
        a_v = f.W_A_v(x).view(B, T, h, r)
        b_k = rotate(f.W_B_k(x).view(B, T, r, dh), cos, sin)
        b_v = f.W_B_v(x).view(B, T, r, dh)
        if c.kind == "t6-kvonly":
            q = rotate(f.c_q(x).view(B, T, h, dh), cos, sin)
        else:
            a_q = f.W_A_q(x).view(B, T, h, c.q_rank)
            b_q = rotate(f.W_B_q(x).view(B, T, c.q_rank, dh), cos, sin)
            q = torch.einsum("bthr,btrd->bthd", a_q, b_q) / c.q_rank
        k = torch.einsum("bthr,btrd->bthd", a_k, b_k) / r
        v = torch.einsum("bthr,btrd->bthd", a_v, b_v) / r
        y = causal(q, k, v)                                            # (B, h, T, d_h)
        if c.using_groupnorm:
            y = self.subln(y)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, h * dh))


class DenseAttention(nn.Module):
    """llama-mha (kind "mha": head_dim = n_embd // n_head, c_k (d, d)) and llama-gqa."""

    def __init__(self, c: AuthorsConfig):
        super().__init__()
        self.c = c
        h = c.n_head
        self.dh = c.n_embd // h if c.kind == "mha" else c.head_dim
        self.n_kv = h if c.kind == "mha" else h // c.group_size
        self.c_q = nn.Linear(c.n_embd, h * self.dh, bias=False)
        self.c_k = nn.Linear(c.n_embd, self.n_kv * self.dh, bias=False)
        self.c_v = nn.Linear(c.n_embd, self.n_kv * self.dh, bias=False)
        self.c_proj = nn.Linear(h * self.dh, c.n_embd, bias=False)
        if c.using_groupnorm:
            self.subln = WeightedRMSNorm(self.dh, eps=1e-5)

    def forward(self, x, exact):
        (B, T, _), h, dh = x.shape, self.c.n_head, self.dh
        cos, sin = rotary_tables(T, dh, exact, x.device)
        q = rotate(self.c_q(x).view(B, T, h, dh), cos, sin)
        k = rotate(self.c_k(x).view(B, T, self.n_kv, dh), cos, sin)
        v = self.c_v(x).view(B, T, self.n_kv, dh)
        k = torch.repeat_interleave(k, h // self.n_kv, dim=2)
        v = torch.repeat_interleave(v, h // self.n_kv, dim=2)
        y = causal(q, k, v)
        if self.c.using_groupnorm:
            y = self.subln(y)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, h * dh))


class LatentAttention(nn.Module):
    """llama-mla: kind "mla" = T6-new/model/llama-mla.py (RoPE at token positions on q_pe and
    the shared k_pe); "mla-v1" = the older model/llama-mla.py (see forward)."""

    def __init__(self, c: AuthorsConfig):
        super().__init__()
        self.c = c
        h, nope, rope = c.n_head, c.head_dim, c.qk_rope_head_dim
        self.q_a_proj = nn.Linear(c.n_embd, c.q_lora_rank, bias=False)
        self.q_a_layernorm = WeightedRMSNorm(c.q_lora_rank)
        self.q_b_proj = nn.Linear(c.q_lora_rank, h * (nope + rope), bias=False)
        self.kv_a_layernorm = WeightedRMSNorm(c.kv_lora_rank)
        self.kv_a_proj_with_mqa = nn.Linear(c.n_embd, c.kv_lora_rank + rope, bias=False)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, h * (nope + c.v_head_dim), bias=False)
        self.c_proj = nn.Linear(h * c.v_head_dim, c.n_embd, bias=False)
        if c.using_groupnorm:
            self.subln = WeightedRMSNorm(nope + rope, eps=1e-5)

    def forward(self, x, exact):
        c, (B, T, _) = self.c, x.shape
        h, nope, rope, dv = c.n_head, c.head_dim, c.qk_rope_head_dim, c.v_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, h, nope + rope)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, h, nope + dv)
        if c.kind == "mla":
            cos, sin = rotary_tables(T, rope, exact, x.device)
            q_pe = rotate(q[..., nope:], cos, sin)
            k_pe = rotate(k_pe.view(B, T, 1, rope), cos, sin)
        else:   # "mla-v1", model/llama-mla.py: its Rotary reads the length from axis 1 of
            # (B, heads, T, d) tensors: n_head for q_pe, 1 for the one-head k_pe
            q_pe = q[..., nope:].transpose(1, 2)                          # (B, h, T, rope)
            cos, sin = rotary_tables(h, rope, exact, x.device)            # (1, h, 1, rope/2)
            q_pe = rotate(q_pe, cos, sin).transpose(1, 2)
            k_pe = k_pe.view(B, T, 1, rope).transpose(1, 2)               # (B, 1, T, rope)
            cos, sin = rotary_tables(1, rope, exact, x.device)
            k_pe = rotate(k_pe, cos, sin).transpose(1, 2)
        k_pe = k_pe.expand(B, T, h, rope)
        q = torch.cat([q[..., :nope], q_pe], dim=-1)
        k = torch.cat([kv[..., :nope], k_pe], dim=-1)
        y = causal(q, k, kv[..., nope:], scale=1 / math.sqrt(nope + rope))
        if c.using_groupnorm:
            y = self.subln(y)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, h * dv))


ATTENTION = {"t6": T6Attention, "t6-kvonly": T6Attention, "mha": DenseAttention,
             "gqa": DenseAttention, "mla": LatentAttention, "mla-v1": LatentAttention}


class SwiGLU(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        hidden = math.floor(8 / 3 * d)
        self.c_fc1 = nn.Linear(d, hidden, bias=False)
        self.c_fc2 = nn.Linear(d, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.c_proj(F.silu(self.c_fc1(x)) * self.c_fc2(x))


class Layer(nn.Module):
    def __init__(self, c: AuthorsConfig):
        super().__init__()
        self.attn = ATTENTION[c.kind](c)
        self.mlp = SwiGLU(c.n_embd)

    def forward(self, x, exact):
        x = x + self.attn(F.rms_norm(x, (x.size(-1),)), exact)
        return x + self.mlp(F.rms_norm(x, (x.size(-1),)))


class AuthorsGPT(nn.Module):
    def __init__(self, c: AuthorsConfig):
        super().__init__()
        self.c = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            h=nn.ModuleList(Layer(c) for _ in range(c.n_layer))))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    @torch.no_grad()
    def randomize(self, seed: int, std: float) -> "AuthorsGPT":
        """N(0, std) weights; norm weights 1 + N(0, 5 std)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1 + 5 * noise if name.endswith("norm.weight") or ".subln." in name
                    else noise)
        return self

    @torch.no_grad()
    def logprobs(self, idx: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """idx (B, T) -> log_softmax of the next-token logits (B, T, vocab), fp32."""
        x = self.transformer.wte(idx)
        for layer in self.transformer.h:
            x = layer(x, exact)
        x = F.rms_norm(x, (x.size(-1),))
        return torch.log_softmax(self.lm_head(x).float(), dim=-1)


def save_authors_checkpoint(model: AuthorsGPT, path: Path, fmt: str = "bin",
                            prefix: str = "") -> Path:
    """fmt "bin": pytorch_model.bin with the tied lm_head duplicate (save_pretrained with
    safe_serialization=False); "safetensors": model.safetensors without lm_head;
    "sharded": two safetensors shards + index. prefix: e.g. "_orig_mod." (compiled)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.c.config_json(), indent=2))
    sd = {prefix + k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if fmt == "bin":
        torch.save(sd, path / "pytorch_model.bin")
        return path
    sd.pop(prefix + "lm_head.weight")
    if fmt == "safetensors":
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
        return path
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in part}, path / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, name)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path
