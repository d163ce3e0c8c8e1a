"""The paged factor cache: its size arithmetic (FactorCacheSpec, the single source for how
many blocks fit, for metrics and for the memory numbers in docs) and its tensors.

Layout, per factor, all layers in one allocation (layer-major, so a layer's view is
contiguous; the kernels read one block as one contiguous tile per factor):
    ak (L, num_blocks, block_size, h, R_K)      bk (L, num_blocks, block_size, R_K, d_h)  RoPE'd
    av (L, num_blocks, block_size, h, R_V)      bv (L, num_blocks, block_size, R_V, d_h)

MHA / GQA / MQA are served as *non-contextual* TPA (models/dense.py): R_K = R_V = n_kv,
B_K / B_V = the kv heads' keys / values, and A is a constant of the layer (query head j
reads kv head j // (h / n_kv)). A constant-A cache (spec.const_a) holds no ak / av at all:
`layer(i)` gives None for them, which the ops read as "A is that one-hot mixing"
(kernels/reference.py). Bytes per token: 2 n_kv d_h a layer, a GQA KV cache's.

dtype float8_e4m3fn (--cache-dtype fp8): one byte a number and nothing else, because the
store folds each token's per-rank scale into its A and B factors (reference.py,
quantize_factors_fp8), so bytes_per_token is exactly half bf16's. Constant A and MLA have
no A to hold the scale: refused.

MLA (spec.kv_lora > 0) is not TPA-shaped: its cache is one latent row per token, shared by
every head (kernels/reference.py, "MLA's latent cache"):
    latent (L, num_blocks, block_size, kv_lora + rope) = [kv_a_layernorm(c), k_pe]
and ak..bv are None. Its saving is measured against the same model's MHA twin: h heads of
materialised keys (nope + rope) and values (v_head_dim).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tpaserve.config import ConfigError, ModelConfig
from tpaserve.models.dense import DenseConfig
from tpaserve.models.mla import MLAConfig

_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8,
             torch.float8_e4m3fn: 1}
# the cache dtypes the start-up log and /metrics state bytes per token for
CACHE_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16",
                     torch.float8_e4m3fn: "fp8", torch.float32: "float32"}


def cache_bytes_per_token(cfg, dtype: torch.dtype) -> int:
    """Bytes a paged cache holds per token, all layers, for any member of the family:
    layers x cache_elems_per_token_layer x itemsize, with per layer
        T6 / T6-KVonly  (R_K + R_V)(h + d_h)    the four factors (FactorCacheSpec below)
        MHA / GQA / MQA 2 n_kv d_h              keys and values of the kv heads: served as
                                                non-contextual TPA, A is a per-layer constant
        MLA             kv_lora_rank + rope     the latent and the shared RoPE'd key
    FactorCacheSpec.bytes_per_token equals this for every variant the engine serves."""
    return cfg.n_layer * cfg.cache_elems_per_token_layer * _ITEMSIZE[dtype]


@dataclass(frozen=True)
class FactorCacheSpec:
    n_layer: int
    n_head: int                     # query heads
    head_dim: int
    k_rank: int                     # MHA / GQA / MQA: n_kv (the B factors are the kv heads)
    v_rank: int
    dtype: torch.dtype
    block_size: int
    mha_heads: int                  # heads of the MHA model the saving is measured against
    const_a: bool = False           # A is a constant of the layer: no ak / av in the cache
    variant: str = "T6"             # for the start-up log: T6, T6-KVonly, MHA, GQA, MQA, MLA
    # MLA's latent cache (kv_lora > 0); head_dim is then nope + rope (the query / key
    # width), k_rank = v_rank = kv_lora (the labels of cache_config_info)
    kv_lora: int = 0
    rope_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        if (self.const_a or self.latent) and self.dtype == torch.float8_e4m3fn:
            raise ConfigError(f"--cache-dtype fp8 is not available for {self.variant} models: "
                              f"the fp8 cache keeps its scales in the TPA A factors, which a "
                              f"constant-A (MHA / GQA / MQA) or MLA latent cache does not "
                              f"store")

    @classmethod
    def from_model(cls, cfg, dtype: torch.dtype, block_size: int) -> "FactorCacheSpec":
        """T6 / T6-KVonly: the four factors, compared with a same-size MHA model (d_model /
        d_h heads, the paper's comparison). MHA / GQA / MQA: constant A, compared with the
        same model's MHA twin (n_head kv heads; MHA itself 1x). MLA: the latent cache,
        compared with the same model's MHA twin (materialised k and v of every head)."""
        if isinstance(cfg, MLAConfig):
            return cls(cfg.n_layer, cfg.n_head, cfg.q_head_dim, cfg.kv_lora_rank,
                       cfg.kv_lora_rank, dtype, block_size, cfg.n_head, variant="MLA",
                       kv_lora=cfg.kv_lora_rank, rope_dim=cfg.qk_rope_head_dim,
                       v_head_dim=cfg.v_head_dim)
        if isinstance(cfg, DenseConfig):
            return cls(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.n_kv_head, cfg.n_kv_head,
                       dtype, block_size, cfg.n_head, const_a=True,
                       variant=cfg.variant.upper())
        if not isinstance(cfg, ModelConfig):        # a module handed to the engine directly
            raise ConfigError(
                f"{type(cfg).__name__} ({getattr(cfg, 'variant', '?').upper()}): serving this "
                f"variant through the paged factor cache is not implemented; the engine "
                f"serves T6, T6-KVonly, MHA, GQA, MQA and MLA")
        return cls(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.k_rank, cfg.v_rank, dtype,
                   block_size, cfg.mha_equivalent_heads,
                   variant="T6-KVonly" if cfg.kv_only else "T6")

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def latent(self) -> bool:
        """MLA's latent cache (one row of kv_lora + rope per token) instead of factors."""
        return self.kv_lora > 0

    @property
    def out_dim(self) -> int:
        """Numbers per head the attention op returns (the split-K workspace's width): d_h,
        or MLA's kv_lora (the absorbed output, before W_uv)."""
        return self.kv_lora if self.latent else self.head_dim

    @property
    def elems_per_token_layer(self) -> int:
        """T6: (R_K + R_V)(h + d_h); constant A: (R_K + R_V) d_h = 2 n_kv d_h; MLA:
        kv_lora + rope."""
        if self.latent:
            return self.kv_lora + self.rope_dim
        a = 0 if self.const_a else self.n_head
        return (self.k_rank + self.v_rank) * (a + self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """layers * elems_per_token_layer * itemsize (= cache_bytes_per_token)."""
        return self.n_layer * self.elems_per_token_layer * self.itemsize

    @property
    def bytes_per_token_by_dtype(self) -> dict[str, int]:
        """bytes_per_token for each cache dtype this model can use (fp8 only with factors)."""
        no_a = self.const_a or self.latent
        dts = [torch.bfloat16, torch.float16] + ([] if no_a else [torch.float8_e4m3fn])
        return {CACHE_DTYPE_NAMES[d]: self.n_layer * self.elems_per_token_layer * _ITEMSIZE[d]
                for d in dts}

    @property
    def mha_bytes_per_token(self) -> int:
        """What the MHA model of the comparison (mha_heads heads) caches: 2 h d_h per layer
        (MLA: h (nope + rope + v_head_dim), its materialised keys and values)."""
        if self.latent:
            return self.n_layer * self.mha_heads * (self.head_dim + self.v_head_dim) * self.itemsize
        return self.n_layer * 2 * self.mha_heads * self.head_dim * self.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, nbytes: int) -> int:
        return nbytes // self.bytes_per_block

    def describe(self) -> str:
        """What one token's cache holds, e.g. "GQA: keys and values of 2 kv heads"."""
        if self.latent:
            return (f"MLA: latent of kv_lora_rank {self.kv_lora} and a RoPE key of "
                    f"{self.rope_dim} shared by {self.n_head} heads")
        if self.const_a:
            return (f"{self.variant}: keys and values of {self.k_rank} kv head"
                    f"{'s' if self.k_rank > 1 else ''} for {self.n_head} query heads, "
                    f"constant A")
        return f"{self.variant}: factors of ranks k/v {self.k_rank}/{self.v_rank}"

    def summary(self, num_blocks: int) -> str:
        tokens = num_blocks * self.block_size
        total = num_blocks * self.bytes_per_block
        mha = total // self.mha_bytes_per_token
        twin = (f"the same model as MHA ({self.mha_heads} kv heads)" if self.const_a
                else f"the same model as MHA ({self.mha_heads} heads of keys "
                     f"{self.head_dim} and values {self.v_head_dim})" if self.latent
                else f"a same-size MHA model ({self.mha_heads} heads)")
        others = ", ".join(f"{k} {b}" for k, b in self.bytes_per_token_by_dtype.items()
                           if k != CACHE_DTYPE_NAMES.get(self.dtype))
        dtype = CACHE_DTYPE_NAMES.get(self.dtype, self.dtype)
        return (f"factor cache ({self.describe()}): {self.bytes_per_token} B/token "
                f"({dtype}; {others}), {num_blocks} blocks x {self.block_size} = {tokens} tokens "
                f"in {total / 2**30:.2f} GiB; {twin} would fit {mha} tokens "
                f"({self.mha_bytes_per_token / self.bytes_per_token:.1f}x fewer)")


class FactorCache:
    """The cache tensors (four; two with constant A, where ak = av = None; MLA: `latent`
    only). `layer(i)` gives the per-layer views the kernels take."""

    def __init__(self, spec: FactorCacheSpec, num_blocks: int, device: torch.device | str):
        s, L = spec, spec.n_layer
        self.spec, self.num_blocks = spec, num_blocks
        mk = lambda *shape: torch.zeros((L, num_blocks, s.block_size, *shape), dtype=s.dtype, device=device)
        self.latent = mk(s.kv_lora + s.rope_dim) if s.latent else None
        factors = not (s.latent or s.const_a)
        self.ak = mk(s.n_head, s.k_rank) if factors else None
        self.bk = None if s.latent else mk(s.k_rank, s.head_dim)
        self.av = mk(s.n_head, s.v_rank) if factors else None
        self.bv = None if s.latent else mk(s.v_rank, s.head_dim)

    def layer(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None,
                                     torch.Tensor]:
        assert not self.spec.latent, "an MLA cache holds latent rows, not factors: .latent[i]"
        if self.spec.const_a:
            return None, self.bk[i], None, self.bv[i]
        return self.ak[i], self.bk[i], self.av[i], self.bv[i]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (self.ak, self.bk, self.av, self.bv, self.latent) if t is not None)
