"""Write a step's MLA latents into the paged latent cache (reference.store_latent_ref):
    latent_cache[slot] = [c, k_pe]      c (T, kv_lora), k_pe (T, rope); slot -1 is skipped
One program per token. k_pe arrives as the model rotated it (models/mla.py): RoPE is not
fused here because mla_rope "head_index" caches it unrotated, and it is rope numbers of
one head per token, not worth a second code path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpaserve.kernels import _validate as v


@triton.jit
def _store_latent_kernel(c_ptr, kpe_ptr, slot_ptr, cache_ptr, stride_c, stride_k,
                         C: tl.constexpr, P: tl.constexpr, C_PAD: tl.constexpr,
                         P_PAD: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:                                   # padding token: nothing to store
        return
    dst = cache_ptr + slot * (C + P)
    i = tl.arange(0, C_PAD)
    tl.store(dst + i, tl.load(c_ptr + t * stride_c + i, mask=i < C), mask=i < C)
    j = tl.arange(0, P_PAD)
    tl.store(dst + C + j, tl.load(kpe_ptr + t * stride_k + j, mask=j < P), mask=j < P)


def store_latent(c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
                 latent_cache: torch.Tensor) -> None:
    """c (T, kv_lora), k_pe (T, rope), both contiguous in their last dim and in the cache's
    dtype; slot_mapping (T,) int64; latent_cache (num_blocks, block_size, kv_lora + rope)."""
    kv_lora = c.shape[-1] if c.dim() == 2 else -1
    _, _, row = v.latent_cache(latent_cache, kv_lora)
    T = c.shape[0]
    for name, t, width in (("c", c, kv_lora), ("k_pe", k_pe, row - kv_lora)):
        if (t.dim() != 2 or t.shape != (T, width) or t.stride(1) != 1
                or t.dtype != latent_cache.dtype or t.device != latent_cache.device):
            raise v.KernelInputError(
                f"{name} must be ({T}, {width}) {latent_cache.dtype} on {latent_cache.device}, "
                f"contiguous in its last dim; got {tuple(t.shape)} {t.dtype} strides "
                f"{t.stride()} on {t.device}")
    if (slot_mapping.shape != (T,) or slot_mapping.dtype != torch.int64
            or slot_mapping.device != latent_cache.device):
        raise v.KernelInputError(f"slot_mapping must be ({T},) int64 on {latent_cache.device}, "
                                 f"got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if T == 0:
        return
    _store_latent_kernel[(T,)](c, k_pe, slot_mapping, latent_cache, c.stride(0), k_pe.stride(0),
                               C=kv_lora, P=row - kv_lora, C_PAD=v.next_pow2(kv_lora),
                               P_PAD=v.next_pow2(row - kv_lora))
