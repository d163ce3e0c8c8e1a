"""Logits -> next tokens (+ logprobs), batched over rows, reproducible per request, and
never waiting for the device: a step's sampling is enqueued like its forward, and its
results are read back once, at the end (runner/model_runner.py).

Invariants:
- Only the real vocabulary is ever sampled or reported: columns >= vocab_size (the model's
  padded vocab, e.g. 50304 vs the tokenizer's 50257) are sliced off first.
- Logprobs, sampled and prompt, are log_softmax of the RAW logits (vLLM's default): they
  describe the model, not the knobs. One exception, as in vLLM v1 (its model runner applies
  the grammar bitmask to the logits before the sampler computes raw logprobs): a
  structured-output row's logits are masked first (`apply_token_bitmask`), so its logprobs
  are the model's distribution renormalised over the tokens its grammar allows.
- A seeded row's randomness comes only from its own generator, which draws exactly
  vocab_size exponentials in each step where the row samples (not when greedy, not in the
  steps of a round after the row stopped). So the same seed gives the same tokens whatever
  else is in the batch and in whatever order. Generators live on the logits' device.
- No host<->device synchronisation: per-row knobs go to the device once per batch
  (SamplingMetadata, pinned and non-blocking), greedy and sampled rows are combined with
  torch.where instead of Python-list indexing (a list index is a blocking copy).

Processing order, per row (all batched over rows that need it):
    logit_bias -> min_tokens (mask eos and stop_token_ids) -> repetition penalty
    -> presence / frequency penalties -> greedy argmax, or
       temperature -> top_k -> top_p -> min_p -> sample
Sampling uses the exponential race: token = argmax(p / q), q ~ Exp(1) i.i.d., which draws
token i with probability p_i and needs one noise vector per row, no cumulative sums.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tpaserve.sampling_params import SamplingParams

# One row's logprobs: (logprob of the chosen token, top-N [(token_id, logprob)] sorted desc).
TokenLogprobs = tuple[float, list[tuple[int, float]]]


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without waiting: on CUDA through pinned memory and a
    non-blocking copy (torch.tensor(..., device="cuda") from a list blocks until the stream
    is idle)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)


@dataclass
class SamplingRow:
    """One row of the logits matrix and what the sampler needs to know about its request."""
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]        # generated so far (penalties, min_tokens)
    generator: torch.Generator | None      # the request's own, when params.seed is set


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, None for rows that did not ask; the whole field is None if no row asked.
    logprobs: list[TokenLogprobs | None] | None


class SamplingMetadata:
    """One batch's per-row knobs, on the device: built once per batch and reused by every
    step of a multi-step round."""

    def __init__(self, rows: list[SamplingRow], vocab_size: int, device: torch.device):
        self.rows, self.device = rows, device
        ps = [r.params for r in rows]
        greedy = [p.greedy for p in ps]
        self.all_greedy = all(greedy)
        self.any_greedy = any(greedy)
        self.has_processors = any(_has_processors(r) for r in rows)
        self.seeded = [(i, r.generator) for i, r in enumerate(rows)
                       if r.generator is not None and not greedy[i]]
        self.greedy = to_device(greedy, torch.bool, device) if self.any_greedy else None
        if self.all_greedy:
            return
        # greedy rows get temperature 1 (their sample is discarded; no division by ~0)
        self.temperature = to_device([1.0 if g else p.temperature for p, g in zip(ps, greedy)],
                                     torch.float32, device)[:, None]          # (B, 1)
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in ps]
        top_p = [p.top_p for p in ps]
        self.use_sort = any(k < vocab_size for k in top_k) or any(p < 1.0 for p in top_p)
        if self.use_sort:
            self.top_k = to_device(top_k, torch.int64, device)[:, None]       # (B, 1)
            # p == 1 means off: float cumsums may reach 1.0 early and must not cut the tail
            self.top_p = to_device([p if p < 1.0 else float("inf") for p in top_p],
                                   torch.float32, device)[:, None]            # (B, 1)
        min_p = [p.min_p for p in ps]
        self.min_p = to_device(min_p, torch.float32, device)[:, None] \
            if any(m > 0 for m in min_p) else None                            # (B, 1)


def compute_logprobs(logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor,
                     num_top: int, *, vocab_size: int | None = None) -> list[TokenLogprobs]:
    """log_softmax of the raw logits (N, V_pad) over the first vocab_size columns; for each
    row the logprob of token_ids[row] and the num_top best (token, logprob), sorted desc.
    Reads the result back (a sync): see LogprobsOnDevice for the step path."""
    return LogprobsOnDevice(logits, token_ids, num_top, vocab_size=vocab_size).to_lists()


class LogprobsOnDevice:
    """compute_logprobs' tensors, left on the device until `to_lists()` (after the step's
    event): chosen (N,), top_lp / top_id (N, num_top)."""

    def __init__(self, logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor,
                 num_top: int, *, vocab_size: int | None = None):
        v = vocab_size or logits.size(1)
        lp = torch.log_softmax(logits[:, :v].float(), dim=-1)                # (N, V)
        ids = token_ids if isinstance(token_ids, torch.Tensor) else \
            to_device(list(token_ids), torch.int64, lp.device)
        self.chosen = lp.gather(1, ids.long()[:, None]).squeeze(1)           # (N,)
        self.num_top = num_top
        self.top_lp = self.top_id = None
        if num_top:
            self.top_lp, self.top_id = lp.topk(min(num_top, v), dim=-1)      # (N, num_top)

    def to_host(self) -> None:
        """Start the copies back (non-blocking where the memory allows)."""
        nb = self.chosen.is_cuda
        self.chosen = self.chosen.to("cpu", non_blocking=nb)
        if self.num_top:
            self.top_lp = self.top_lp.to("cpu", non_blocking=nb)
            self.top_id = self.top_id.to("cpu", non_blocking=nb)

    def to_lists(self) -> list[TokenLogprobs]:
        chosen = self.chosen.tolist()
        if not self.num_top:
            return [(c, []) for c in chosen]
        # a token at -inf (masked by a grammar) is no candidate, and JSON has no -inf
        return [(c, [(t, lp) for t, lp in zip(i, p) if lp != float("-inf")]) for c, i, p in
                zip(chosen, self.top_id.tolist(), self.top_lp.tolist())]


def apply_token_bitmask(logits: torch.Tensor, bitmask: np.ndarray) -> torch.Tensor:
    """Structured outputs: logits (S, V_pad) with the tokens a row may not pick at -inf.
    bitmask (S, W) int32 from the host (core/structured.py): bit t % 32 of word t // 32 of
    row j is set iff row j may pick token t; an unconstrained row is all ones (-1); tokens
    t >= 32 W are left alone (past the vocabulary: the sampler never draws them).
    Returns a new tensor (the logits may be a CUDA graph's output buffer); enqueued only."""
    s, w = bitmask.shape
    assert logits.dim() == 2 and logits.size(0) == s, (logits.shape, bitmask.shape)
    v = min(logits.size(1), 32 * w)
    words = torch.from_numpy(np.ascontiguousarray(bitmask))
    if logits.is_cuda:
        words = words.pin_memory()
    words = words.to(logits.device, non_blocking=True)                       # (S, W)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)       # (32,)
    allowed = ((words[:, :, None] >> shifts) & 1).bool().view(s, 32 * w)     # (S, 32 W)
    out = logits.clone()
    out[:, :v].masked_fill_(~allowed[:, :v], float("-inf"))
    return out


class Sampler:
    def __init__(self, vocab_size: int, eos_token_id: int | None, seed: int = 0):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.seed = seed
        # For unseeded rows: one generator per device, created on first use there.
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def metadata(self, rows: list[SamplingRow], device: torch.device) -> SamplingMetadata:
        return SamplingMetadata(rows, self.vocab_size, device)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits (B, V_pad) with V_pad >= vocab_size, one row per entry of rows. Reads the
        result back (the reference generator's and the tests' entry point)."""
        assert logits.dim() == 2 and logits.size(0) == len(rows), (logits.shape, len(rows))
        assert logits.size(1) >= self.vocab_size, (logits.shape, self.vocab_size)
        meta = self.metadata(rows, logits.device)
        ids = self.sample_ids(logits, meta)
        token_ids = ids.tolist()
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return SamplerOutput(token_ids, None)
        num_top = max(rows[i].params.logprobs for i in want)
        lps = compute_logprobs(logits[want], [token_ids[i] for i in want], num_top,
                               vocab_size=self.vocab_size)
        out: list[TokenLogprobs | None] = [None] * len(rows)
        for i, (chosen, top) in zip(want, lps):
            out[i] = (chosen, top[:rows[i].params.logprobs])
        return SamplerOutput(token_ids, out)

    def sample_ids(self, logits: torch.Tensor, meta: SamplingMetadata,
                   live: Sequence[bool] | None = None) -> torch.Tensor:
        """logits (B, V_pad) -> next token ids (B,) int64 on the logits' device, enqueued
        only. `live` (host, per row): rows that sample in this step; a row that is not live
        draws nothing from its own generator (its id is garbage: the caller drops it)."""
        x = logits[:, :self.vocab_size].float()                              # (B, V)
        if meta.has_processors:
            x = self.process(x, meta.rows)
        # NaN or +inf anywhere in a row makes its draw meaningless (softmax -> NaN, and
        # argmax picks a NaN): such a row gets NONFINITE, never a token. -inf is a mask.
        # A row's max says it: NaN if it holds a NaN (max propagates it), inf if +inf.
        if meta.all_greedy:
            top, tokens = x.max(dim=-1)                                      # (B,), (B,)
        else:
            tokens = self._sample(x, meta, live)
            if meta.any_greedy:
                tokens = torch.where(meta.greedy, x.argmax(dim=-1), tokens)
            top = x.amax(dim=-1)                                             # (B,)
        return torch.where(top < float("inf"), tokens, NONFINITE)

    def process(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """The logit processors before greedy/temperature: logit_bias, min_tokens,
        repetition, presence and frequency penalties. logits (B, V) -> new (B, V) fp32."""
        x = logits[:, :self.vocab_size].float()                              # (B, V)
        if not any(_has_processors(r) for r in rows):
            return x                          # nothing writes to it: no copy
        x = x.clone()
        dev = x.device
        # Logit bias and min_tokens both touch a few (row, token) cells: gather them in Python
        # (they are request metadata) and write them with one indexed op each.
        br, bt, bv = [], [], []
        for i, r in enumerate(rows):
            for tok, bias in r.params.logit_bias:
                br.append(i), bt.append(tok), bv.append(bias)
        if br:
            x.index_put_((to_device(br, torch.long, dev), to_device(bt, torch.long, dev)),
                         to_device(bv, x.dtype, dev), accumulate=True)
        mr, mt = [], []
        for i, r in enumerate(rows):
            if len(r.output_token_ids) < r.params.min_tokens:
                # With ignore_eos, eos does not stop the request, so there is nothing to block.
                stops = list(r.params.stop_token_ids)
                if self.eos_token_id is not None and not r.params.ignore_eos:
                    stops.append(self.eos_token_id)
                mr += [i] * len(stops)
                mt += stops
        if mr:
            x[to_device(mr, torch.long, dev), to_device(mt, torch.long, dev)] = float("-inf")
        self._apply_penalties(x, rows)
        return x

    def _apply_penalties(self, x: torch.Tensor, rows: list[SamplingRow]) -> None:
        """In place on x (B, V). Repetition (HF/vLLM): over prompt + output tokens, positive
        logits divided by the penalty, negative multiplied. Presence/frequency (OpenAI):
        over output tokens, logit -= frequency * count + presence * (count > 0)."""
        dev, v = x.device, x.size(1)
        rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep:
            rr, rt = _flat_tokens(rows, rep, with_prompt=True)
            seen = torch.zeros(len(rep), v, dtype=torch.bool, device=dev)     # (Br, V)
            seen[to_device(rr, torch.long, dev), to_device(rt, torch.long, dev)] = True
            pen = to_device([rows[i].params.repetition_penalty for i in rep], x.dtype,
                            dev)[:, None]                                     # (Br, 1)
            idx = to_device(rep, torch.long, dev)
            xr = x[idx]
            x[idx] = torch.where(seen, torch.where(xr > 0, xr / pen, xr * pen), xr)
        fp = [i for i, r in enumerate(rows)
              if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
        if fp:
            rr, rt = _flat_tokens(rows, fp, with_prompt=False)
            counts = torch.zeros(len(fp), v, dtype=x.dtype, device=dev)       # (Bf, V)
            counts.index_put_((to_device(rr, torch.long, dev), to_device(rt, torch.long, dev)),
                              torch.ones(len(rr), dtype=x.dtype, device=dev), accumulate=True)
            freq = to_device([rows[i].params.frequency_penalty for i in fp], x.dtype,
                             dev)[:, None]                                    # (Bf, 1)
            pres = to_device([rows[i].params.presence_penalty for i in fp], x.dtype,
                             dev)[:, None]
            idx = to_device(fp, torch.long, dev)
            x[idx] -= freq * counts + pres * (counts > 0).to(x.dtype)

    def _sample(self, x: torch.Tensor, meta: SamplingMetadata,
                live: Sequence[bool] | None) -> torch.Tensor:
        """x (B, V) processed logits -> sampled token ids (B,) (greedy rows' are garbage)."""
        dev, (b, v) = x.device, x.shape
        x = x / meta.temperature                                             # (B, V)
        if meta.use_sort:
            # One descending sort serves both: top_k keeps the first k ranks, top_p the
            # smallest prefix whose mass (after top_k, renormalised) reaches p.
            xs, idx = x.sort(dim=-1, descending=True)                        # (B, V)
            rank = torch.arange(v, device=dev)[None, :]                      # (1, V)
            xs = xs.masked_fill(rank >= meta.top_k, float("-inf"))
            ps = xs.softmax(dim=-1)
            mass_before = ps.cumsum(dim=-1) - ps                             # exclusive cumsum
            xs = xs.masked_fill(mass_before >= meta.top_p, float("-inf"))    # rank 0 always kept
            x = torch.empty_like(x).scatter_(1, idx, xs)
        probs = x.softmax(dim=-1)                                            # (B, V)
        if meta.min_p is not None:
            floor = meta.min_p * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        q = self._noise(meta, live, b, v, dev)                               # (B, V)
        return (probs / q).argmax(dim=-1)

    def _noise(self, meta: SamplingMetadata, live: Sequence[bool] | None, b: int, v: int,
               dev: torch.device) -> torch.Tensor:
        """Exp(1) noise (B, V): one draw from the sampler's generator for every row, then the
        seeded live rows' own draws over theirs (the only per-row loop, and unavoidable)."""
        q = torch.empty(b, v, device=dev)
        if len(meta.seeded) < b:
            q.exponential_(generator=self._generator(dev))
        for i, g in meta.seeded:
            if live is None or live[i]:
                q[i].exponential_(generator=g)   # torch rejects a generator on another device
        # q == 0 would turn a zero probability into 0/0 = NaN, which argmax would pick.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


NONFINITE = -1        # the id of a row whose logits were not finite (see sample_ids)


def _has_processors(row: SamplingRow) -> bool:
    p = row.params
    return bool(p.logit_bias or p.min_tokens or p.repetition_penalty != 1.0
                or p.presence_penalty or p.frequency_penalty)


def _flat_tokens(rows: list[SamplingRow], which: list[int],
                 with_prompt: bool) -> tuple[list[int], list[int]]:
    """(local row index, token id) pairs for the rows in `which`, as two flat lists."""
    rr: list[int] = []
    rt: list[int] = []
    for j, i in enumerate(which):
        toks = list(rows[i].output_token_ids)
        if with_prompt:
            toks = list(rows[i].prompt_token_ids) + toks
        rr += [j] * len(toks)
        rt += toks
    return rr, rt
