"""Reference generation: the oracle the paged engine is tested against.

Deliberately naive: every step recomputes the whole sequence with FullSequenceAttention
(no cache), then samples the last position through the same Sampler the engine uses, with
one row. Whatever the engine does (paging, chunked prefill, batching, preemption), its
tokens for a request must equal these.
"""
from __future__ import annotations

import torch

from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.decoder import DecoderLM
from tpaserve.runner.sampler import Sampler, SamplingRow, TokenLogprobs, compute_logprobs
from tpaserve.sampling_params import SamplingParams


def _device(model: DecoderLM) -> torch.device:
    return model.lm_head.weight.device


def _hidden(model: DecoderLM, ids: list[int]) -> torch.Tensor:
    """Whole-sequence forward: ids (L,) -> hidden (L, d_model)."""
    dev = _device(model)
    input_ids = torch.tensor(ids, dtype=torch.long, device=dev)              # (L,)
    positions = torch.arange(len(ids), device=dev)                           # (L,)
    return model(input_ids, positions, FullSequenceAttention([0, len(ids)]))


@torch.no_grad()
def reference_generate(model: DecoderLM, prompt_ids: list[int], params: SamplingParams,
                       eos_token_id: int | None, vocab_size: int | None = None) -> list[int]:
    """Generated token ids for one request.

    Stops, in this order of checking after each token:
    - at a token in params.stop_token_ids: the stop token is included in the output;
    - at eos_token_id unless params.ignore_eos: eos is included too (vLLM keeps both in
      token_ids and drops them from the text); min_tokens is enforced by the sampler
      masking eos and stop_token_ids, so neither can end the request earlier;
    - after params.max_tokens tokens (None: until the context limit), or when the sequence
      reaches the model's max_position.
    Stop strings (params.stop) are not handled: they need a tokenizer and are the
    detokenizer's business. vocab_size is the tokenizer's (default: the model's).
    """
    sampler = Sampler(vocab_size or model.cfg.vocab_size, eos_token_id)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=_device(model)).manual_seed(params.seed)
    room = model.cfg.max_position - len(prompt_ids)
    max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
    stops = set(params.stop_token_ids)
    ids, out = list(prompt_ids), []
    while len(out) < max_tokens:
        logits = model.compute_logits(_hidden(model, ids)[-1:])              # (1, V_pad)
        row = SamplingRow(params, prompt_ids, out, generator)
        tok = sampler(logits, [row]).token_ids[0]
        out.append(tok)
        ids.append(tok)
        if tok in stops or (tok == eos_token_id and not params.ignore_eos):
            break
    return out


@torch.no_grad()
def reference_prompt_logprobs(model: DecoderLM, prompt_ids: list[int], num_top: int,
                              vocab_size: int | None = None) -> list[TokenLogprobs | None]:
    """Per prompt token: (logprob given its prefix, top num_top [(id, logprob)] at that
    position), from the raw distribution; None for the first token (no prefix)."""
    if len(prompt_ids) < 2:
        return [None] * len(prompt_ids)
    logits = model.compute_logits(_hidden(model, prompt_ids)[:-1])           # (L-1, V_pad)
    lps = compute_logprobs(logits, prompt_ids[1:], num_top,
                           vocab_size=vocab_size or model.cfg.vocab_size)
    return [None, *lps]
