"""Logits -> next tokens (+ logprobs), batched over rows, reproducible per request.

Invariants:
- Only the real vocabulary is ever sampled or reported: columns >= vocab_size (the model's
  padded vocab, e.g. 50304 vs the tokenizer's 50257) are sliced off first.
- Logprobs, sampled and prompt, are log_softmax of the RAW logits (vLLM's default): they
  describe the model, not the knobs.
- A seeded row's randomness comes only from its own generator, which draws exactly
  vocab_size exponentials in each step where the row samples (not when greedy). So the
  same seed gives the same tokens whatever else is in the batch and in whatever order.
  Generators must live on the logits' device: torch.Generator(device=logits.device).

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

import torch

from tpaserve.sampling_params import SamplingParams

# One row's logprobs: (logprob of the chosen token, top-N [(token_id, logprob)] sorted desc).
TokenLogprobs = tuple[float, list[tuple[int, float]]]


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


def compute_logprobs(logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor,
                     num_top: int, *, vocab_size: int | None = None) -> list[TokenLogprobs]:
    """log_softmax of the raw logits (N, V_pad) over the first vocab_size columns; for each
    row the logprob of token_ids[row] and the num_top best (token, logprob), sorted desc.
    Used for sampled-token logprobs and for prompt logprobs (echo)."""
    v = vocab_size or logits.size(1)
    lp = torch.log_softmax(logits[:, :v].float(), dim=-1)                    # (N, V)
    ids = torch.as_tensor(token_ids, dtype=torch.long, device=lp.device)     # (N,)
    chosen = lp.gather(1, ids[:, None]).squeeze(1).tolist()
    if num_top == 0:
        return [(c, []) for c in chosen]
    top_lp, top_id = lp.topk(min(num_top, v), dim=-1)                       # (N, num_top)
    return [(c, list(zip(i, p))) for c, i, p in zip(chosen, top_id.tolist(), top_lp.tolist())]


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

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits (B, V_pad) with V_pad >= vocab_size, one row per entry of rows."""
        assert logits.dim() == 2 and logits.size(0) == len(rows), (logits.shape, len(rows))
        assert logits.size(1) >= self.vocab_size, (logits.shape, self.vocab_size)
        raw = logits[:, :self.vocab_size]                                    # (B, V) view
        token_ids = self.sample_ids(raw, rows).cpu().tolist()   # .cpu() waits without the GIL

        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not want:
            return SamplerOutput(token_ids, None)
        num_top = max(rows[i].params.logprobs for i in want)
        lps = compute_logprobs(raw[want], [token_ids[i] for i in want], num_top)
        out: list[TokenLogprobs | None] = [None] * len(rows)
        for i, (chosen, top) in zip(want, lps):
            out[i] = (chosen, top[:rows[i].params.logprobs])
        return SamplerOutput(token_ids, out)

    def sample_ids(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """logits (B, V_pad) -> next token ids (B,) int64 on the logits' device, without
        waiting for the device (multi-step decode feeds them to the next step as they are)."""
        x = self.process(logits[:, :self.vocab_size], rows)                 # (B, V) fp32
        sample_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sample_idx) == len(rows):
            return self._sample(x, rows)
        tokens = x.argmax(dim=-1)                                            # (B,)
        if sample_idx:
            tokens[sample_idx] = self._sample(x[sample_idx], [rows[i] for i in sample_idx])
        return tokens

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
            x.index_put_((_long(br, dev), _long(bt, dev)),
                         torch.tensor(bv, device=dev, dtype=x.dtype), accumulate=True)
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
            x[_long(mr, dev), _long(mt, dev)] = float("-inf")
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
            seen[_long(rr, dev), _long(rt, dev)] = True
            pen = torch.tensor([rows[i].params.repetition_penalty for i in rep],
                               device=dev, dtype=x.dtype)[:, None]           # (Br, 1)
            xr = x[rep]
            x[rep] = torch.where(seen, torch.where(xr > 0, xr / pen, xr * pen), xr)
        fp = [i for i, r in enumerate(rows)
              if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
        if fp:
            rr, rt = _flat_tokens(rows, fp, with_prompt=False)
            counts = torch.zeros(len(fp), v, dtype=x.dtype, device=dev)       # (Bf, V)
            counts.index_put_((_long(rr, dev), _long(rt, dev)),
                              torch.ones(len(rr), dtype=x.dtype, device=dev), accumulate=True)
            freq = torch.tensor([rows[i].params.frequency_penalty for i in fp],
                                device=dev, dtype=x.dtype)[:, None]          # (Bf, 1)
            pres = torch.tensor([rows[i].params.presence_penalty for i in fp],
                                device=dev, dtype=x.dtype)[:, None]
            x[fp] -= freq * counts + pres * (counts > 0).to(x.dtype)

    def _sample(self, x: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """x (S, V) processed logits of non-greedy rows -> sampled token ids (S,)."""
        dev, (s, v) = x.device, x.shape
        temp = torch.tensor([r.params.temperature for r in rows], device=dev)[:, None]
        x = x / temp                                                         # (S, V)
        top_k = [r.params.top_k if r.params.top_k > 0 else v for r in rows]
        top_p = [r.params.top_p for r in rows]
        if any(k < v for k in top_k) or any(p < 1.0 for p in top_p):
            # One descending sort serves both: top_k keeps the first k ranks, top_p the
            # smallest prefix whose mass (after top_k, renormalised) reaches p.
            xs, idx = x.sort(dim=-1, descending=True)                        # (S, V)
            rank = torch.arange(v, device=dev)[None, :]                      # (1, V)
            xs = xs.masked_fill(rank >= torch.tensor(top_k, device=dev)[:, None], float("-inf"))
            ps = xs.softmax(dim=-1)
            mass_before = ps.cumsum(dim=-1) - ps                             # exclusive cumsum
            # p == 1 means off: float cumsums may reach 1.0 early and must not cut the tail.
            p = torch.tensor([pp if pp < 1.0 else float("inf") for pp in top_p], device=dev)
            xs = xs.masked_fill(mass_before >= p[:, None], float("-inf"))    # rank 0 always kept
            x = torch.empty_like(x).scatter_(1, idx, xs)
        probs = x.softmax(dim=-1)                                            # (S, V)
        min_p = [r.params.min_p for r in rows]
        if any(m > 0 for m in min_p):
            floor = torch.tensor(min_p, device=dev)[:, None] * probs.amax(dim=-1, keepdim=True)
            probs = probs.masked_fill(probs < floor, 0.0)
        q = self._noise(rows, v, dev)                                        # (S, V)
        return (probs / q).argmax(dim=-1)

    def _noise(self, rows: list[SamplingRow], v: int, dev: torch.device) -> torch.Tensor:
        """Exp(1) noise (S, V): seeded rows from their own generator, one row each (the only
        per-row loop, and unavoidable); the others in one draw from the sampler's."""
        q = torch.empty(len(rows), v, device=dev)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if len(unseeded) == len(rows):              # the common case: one draw, no indexing
            return q.exponential_(generator=self._generator(dev)).clamp_min_(
                torch.finfo(q.dtype).tiny)
        for i, r in enumerate(rows):
            if r.generator is not None:      # torch itself rejects a generator on another device
                q[i].exponential_(generator=r.generator)
        if unseeded:
            q[unseeded] = torch.empty(len(unseeded), v, device=dev).exponential_(
                generator=self._generator(dev))
        # q == 0 would turn a zero probability into 0/0 = NaN, which argmax would pick.
        return q.clamp_min_(torch.finfo(q.dtype).tiny)


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


def _long(values: list[int], dev: torch.device) -> torch.Tensor:
    # dtype spelled out: torch.tensor([]) would be float and fail as an index.
    return torch.tensor(values, dtype=torch.long, device=dev)
