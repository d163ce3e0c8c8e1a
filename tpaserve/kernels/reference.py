"""Torch references for the paged factor-cache kernels (CPU engine backend and test oracle).

Cache layout (one tensor per factor per layer; see engine/factor_cache.py):
    ak_cache (num_blocks, block_size, h, R_K)      raw A_K
    bk_cache (num_blocks, block_size, R_K, d_h)    B_K after RoPE
    av_cache (num_blocks, block_size, h, R_V)      raw A_V
    bv_cache (num_blocks, block_size, R_V, d_h)    B_V
Token slot s lives at block s // block_size, offset s % block_size.

Step metadata (built by the model runner):
    slot_mapping    (T,)   int64  cache slot of each of the step's tokens; -1 = padding, skipped
    query_start_loc (B+1,) int32  sequence i owns query rows qsl[i]:qsl[i+1]
    seq_lens        (B,)   int32  context length of sequence i after this step (cached + new)
    block_tables    (B, max_blocks) int32, row i lists sequence i's blocks in order
The queries of sequence i sit at positions seq_lens[i] - n_i .. seq_lens[i] - 1 and attend
causally over cache positions 0..pos (the step's factors are stored before attending).

FlashTPA equations (../shared/TPA.md section 1), q already = A_Q B_Q / R_Q:
    logit[t, h, m] = scale / R_K * sum_s A_K[m, h, s] * (q[t, h] . B_K[m, s])
    out[t, h, :]   = 1 / R_V * sum_{m, u} p[t, h, m] * A_V[m, h, u] * B_V[m, u, :]

Constant A (MHA / GQA / MQA as non-contextual TPA, runner/factor_cache.py): ak_cache and
av_cache are None, R_K = R_V = n_kv, and A is the one-hot mixing A[h, s] = R if
s == h // (H / R) else 0, the same for every token. The sums collapse to GQA attention
with the ranks as kv heads (g(h) = h // (H / n_kv)):
    logit[t, h, m] = scale * q[t, h] . B_K[m, g(h)]      out[t, h] = sum_m p[t, h, m] B_V[m, g(h)]
The store then writes B_K (rotated) and B_V only; the step's A arguments are ignored.

fp8 caches (float8_e4m3fn, --cache-dtype fp8; docs/kernel_notes.md "fp8 factor cache"):
the store writes A' = A * 2^e_s and B' = B * 2^-e_s per token and rank s, rounded to e4m3
(quantize_factors_fp8), which leaves A B unchanged but for the rounding, so the attention
above reads the dequantised factors as they are: no scale is stored. Constant A has no A
to take the scale: fp8 is refused there.
"""
from __future__ import annotations

import math

import torch


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """T6 RoPE (half-split, rotation by -theta). x (T, n, d_h); cos, sin (T, d_h/2) fp32."""
    half = x.size(-1) // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c + x2 * s, -x1 * s + x2 * c), dim=-1).to(x.dtype)


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0           # largest finite e4m3 value; larger ones saturate to it


def quantize_fp8(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> e4m3, round to nearest even, saturating at +-448 (the store kernel's
    store._round_e4m3 then an exact cast)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """int32 e in [-126, 127] -> 2^e in fp32, exactly (built from the exponent bits)."""
    return ((e + 127) << 23).view(torch.float32)


def fp8_rank_exponents(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The per-rank power of two that balances a factor pair before rounding to e4m3.

    a (T, h, R), b (T, R, d_h) fp32 -> e (T, R) int32: e_s = floor((x(max|b_s|) -
    x(max|a_s|)) / 2), x() the binary exponent (fp32 exponent bits), 0 where either max
    is 0; so max|a_s| 2^e and max|b_s| 2^-e lie within a factor 4 of each other."""
    ma = a.abs().amax(1).contiguous()                               # (T, R)
    mb = b.abs().amax(2).contiguous()                               # (T, R)
    ea = (ma.view(torch.int32) >> 23) & 0xFF
    eb = (mb.view(torch.int32) >> 23) & 0xFF
    e = torch.where((ma == 0) | (mb == 0), torch.zeros_like(ea), (eb - ea) >> 1)
    return e.clamp(-126, 126)


def quantize_factors_fp8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor pair of one token each -> (A', B') in e4m3 with A'_s = A_s 2^e_s and
    B'_s = B_s 2^-e_s (fp8_rank_exponents): A B is unchanged before rounding, and the
    scale lives in the factors, so nothing else is stored. a (T, h, R), b (T, R, d_h)."""
    af, bf = a.float(), b.float()
    e = fp8_rank_exponents(af, bf)                                  # (T, R)
    return quantize_fp8(af * _pow2(e)[:, None, :]), quantize_fp8(bf * _pow2(-e)[:, :, None])


def store_factors_ref(ak, bk, av, bv, cos, sin, slot_mapping,
                      ak_cache, bk_cache, av_cache, bv_cache) -> None:
    """Write a step's factors into their slots, applying RoPE to B_K on the way.

    ak (T, h, R_K), bk (T, R_K, d_h) *unrotated*, av (T, h, R_V), bv (T, R_V, d_h);
    cos, sin (T, d_h/2); slot_mapping (T,), -1 rows are skipped.
    ak_cache = av_cache = None (constant A): only B_K and B_V are written; ak, av ignored.
    fp8 caches: each pair (A_K, RoPE'd B_K), (A_V, B_V) through quantize_factors_fp8.
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = bk_cache.size(1)
    blk, off = slots // bs, slots % bs
    bk_rot = rope_ref(bk[keep], cos[keep], sin[keep])
    if bk_cache.dtype == FP8:
        if ak_cache is None:
            raise ValueError("an fp8 cache needs the A factors to hold its scales; constant "
                             "A (MHA / GQA / MQA) has none")
        ak_cache[blk, off], bk_cache[blk, off] = quantize_factors_fp8(ak[keep], bk_rot)
        av_cache[blk, off], bv_cache[blk, off] = quantize_factors_fp8(av[keep], bv[keep])
        return
    bk_cache[blk, off] = bk_rot.to(bk_cache.dtype)
    bv_cache[blk, off] = bv[keep].to(bv_cache.dtype)
    if ak_cache is not None:
        ak_cache[blk, off] = ak[keep].to(ak_cache.dtype)
        av_cache[blk, off] = av[keep].to(av_cache.dtype)


def gather_sequence(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """(num_blocks, bs, ...) cache, one block-table row -> (length, ...) in position order."""
    bs = cache.size(1)
    nblk = (length + bs - 1) // bs
    return cache[block_row[:nblk].long()].flatten(0, 1)[:length]


def paged_attention_ref(q, ak_cache, bk_cache, av_cache, bv_cache, block_tables, seq_lens,
                        query_start_loc, scale: float | None = None) -> torch.Tensor:
    """Causal attention of each sequence's query rows over its cached factors, in fp32,
    never materialising k or v. q (T, h, d_h) -> (T, h, d_h) in q's dtype.
    ak_cache = av_cache = None: constant A (kv head h // (H / R) per query head h)."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    if ak_cache is None:
        return _const_a_attention_ref(q, bk_cache, bv_cache, block_tables, seq_lens,
                                      query_start_loc, scale)
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for i, L in enumerate(lens):
        qs, qe = qsl[i], qsl[i + 1]
        if qe == qs:
            continue
        ak = gather_sequence(ak_cache, block_tables[i], L).float()   # (L, h, R_K)
        bk = gather_sequence(bk_cache, block_tables[i], L).float()   # (L, R_K, d_h)
        av = gather_sequence(av_cache, block_tables[i], L).float()   # (L, h, R_V)
        bv = gather_sequence(bv_cache, block_tables[i], L).float()   # (L, R_V, d_h)
        qi = q[qs:qe].float()                                         # (n, h, d_h)
        qb = torch.einsum("nhd,msd->nhms", qi, bk)                   # (n, h, L, R_K)
        logits = torch.einsum("nhms,mhs->nhm", qb, ak) * (scale / ak.size(-1))
        pos = torch.arange(L - (qe - qs), L, device=q.device)         # query positions
        mask = torch.arange(L, device=q.device)[None, :] > pos[:, None]  # (n, L) future
        logits.masked_fill_(mask[:, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1)                             # (n, h, L)
        w = torch.einsum("nhm,mhu->nhmu", p, av)                      # (n, h, L, R_V)
        out[qs:qe] = (torch.einsum("nhmu,mud->nhd", w, bv) / av.size(-1)).to(q.dtype)
    return out


def kv_head_of(h: int, n_kv: int, device=None) -> torch.Tensor:
    """(h,) int64: the kv head each query head reads with constant A (repeat_interleave)."""
    if h % n_kv:
        raise ValueError(f"{n_kv} kv heads do not divide {h} query heads")
    return torch.arange(h, device=device) // (h // n_kv)


def _const_a_attention_ref(q, bk_cache, bv_cache, block_tables, seq_lens, query_start_loc,
                           scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    g = kv_head_of(q.size(1), bk_cache.size(2), q.device)                # (h,)
    qsl = query_start_loc.tolist()
    for i, L in enumerate(seq_lens.tolist()):
        qs, qe = qsl[i], qsl[i + 1]
        if qe == qs:
            continue
        k = gather_sequence(bk_cache, block_tables[i], L).float()[:, g]   # (L, h, d_h)
        v = gather_sequence(bv_cache, block_tables[i], L).float()[:, g]   # (L, h, d_h)
        qi = q[qs:qe].float()                                             # (n, h, d_h)
        logits = torch.einsum("nhd,mhd->nhm", qi, k) * scale              # (n, h, L)
        pos = torch.arange(L - (qe - qs), L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] > pos[:, None]   # (n, L) future
        logits.masked_fill_(mask[:, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out[qs:qe] = torch.einsum("nhm,mhd->nhd", p, v).to(q.dtype)
    return out



# ---------------------------------------------------------------- MLA's latent cache
# MLA (models/mla.py) caches one row per token and layer, shared by every head:
#     latent_cache (num_blocks, block_size, kv_lora + rope) = [c, k_pe]
# c = kv_a_layernorm(latent) (kv_lora numbers), k_pe the shared RoPE key as the model
# rotated it (mla_rope "head_index": not rotated). With the up-projections absorbed
# (q_lat[h] = W_uk[h]^T q_nope[h], out[h] = W_uv[h] o_lat[h], done in the model) attention
# over the latent is MQA with one kv "head" whose key is the whole row and whose value is c:
#     q (T, h, kv_lora + rope) = [q_lat, q_pe], laid out like a cache row
#     logit[t, h, m] = scale * q[t, h] . row[m]  (= q_lat . c_m + q_pe . k_pe_m)
#     o_lat[t, h]    = sum_m p[t, h, m] c_m       (T, h, kv_lora)

def store_latent_ref(c: torch.Tensor, k_pe: torch.Tensor, slot_mapping: torch.Tensor,
                     latent_cache: torch.Tensor) -> None:
    """c (T, kv_lora), k_pe (T, rope) -> their slots' rows; slot -1 rows are skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs, kv_lora = latent_cache.size(1), c.size(-1)
    blk, off = slots // bs, slots % bs
    latent_cache[blk, off, :kv_lora] = c[keep].to(latent_cache.dtype)
    latent_cache[blk, off, kv_lora:] = k_pe[keep].to(latent_cache.dtype)


def mla_attention_ref(q: torch.Tensor, latent_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, query_start_loc: torch.Tensor, kv_lora: int,
                      scale: float) -> torch.Tensor:
    """Causal absorbed attention over the paged latent, fp32, per sequence (metadata as
    above). q (T, h, kv_lora + rope) -> o_lat (T, h, kv_lora) in q's dtype."""
    out = q.new_empty(*q.shape[:2], kv_lora)
    qsl = query_start_loc.tolist()
    for i, L in enumerate(seq_lens.tolist()):
        qs, qe = qsl[i], qsl[i + 1]
        if qe == qs:
            continue
        rows = gather_sequence(latent_cache, block_tables[i], L).float()   # (L, kv_lora + rope)
        logits = torch.einsum("nhe,me->nhm", q[qs:qe].float(), rows) * scale   # (n, h, L)
        pos = torch.arange(L - (qe - qs), L, device=q.device)
        mask = torch.arange(L, device=q.device)[None, :] > pos[:, None]   # (n, L) future
        logits.masked_fill_(mask[:, None, :], float("-inf"))
        p = torch.softmax(logits, dim=-1)
        out[qs:qe] = torch.einsum("nhm,mc->nhc", p, rows[:, :kv_lora]).to(q.dtype)
    return out

# ---------------------------------------------------------------- decode-step fusions
# References of kernels/fused.py (the model's elementwise tails, fused on CUDA).

def query_ref(aq: torch.Tensor, bq: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor) -> torch.Tensor:
    """TPA queries: q = A_Q @ RoPE(B_Q) / R_Q. aq (T, h, R_Q), bq (T, R_Q, d_h) unrotated;
    cos, sin (T, d_h/2) fp32 -> (T, h, d_h) in aq's dtype. RoPE rounds to the input dtype
    (rope_ref), the product and the division are fp32."""
    bq = rope_ref(bq, cos, sin)
    return (torch.bmm(aq.float(), bq.float()) / aq.size(-1)).to(aq.dtype)


def silu_mul_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(a) * b = a * sigmoid(a) * b in fp32, one rounding to a's dtype."""
    af = a.float()
    return (af * torch.sigmoid(af) * b.float()).to(a.dtype)


def rms_norm_eps(dtype: torch.dtype) -> float:
    """F.rms_norm's default eps: the machine epsilon of the dtype it computes in, i.e.
    fp32's (1.19e-7) for fp16/bf16 inputs, not bf16's 7.8e-3."""
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def add_rms_norm_ref(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Residual add + parameter-free RMSNorm. x (T, d) is updated in place: x += y (rounded
    to x's dtype); returns x * rsqrt(mean(x^2) + eps) over d, computed in fp32 (fp64 for
    fp64 inputs) from the rounded sum, eps = rms_norm_eps(x.dtype)."""
    x += y
    xf = x.double() if x.dtype == torch.float64 else x.float()
    ms = xf.pow(2).mean(-1, keepdim=True)
    return (xf * torch.rsqrt(ms + rms_norm_eps(x.dtype))).to(x.dtype)
