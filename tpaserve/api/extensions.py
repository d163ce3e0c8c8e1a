"""vLLM's request extensions that both endpoints share, as vLLM serves them:
truncate_prompt_tokens, prompt_logprobs, return_tokens_as_token_ids, and
stream_options.continuous_usage_stats. (The sampling ones - min_tokens, ignore_eos, ... -
are SamplingParams fields.)"""
from __future__ import annotations

from tpaserve.api.errors import bad_request
from tpaserve.api.protocol import PromptLogprob, PromptLogprobs, SamplingRequest, StreamOptions
from tpaserve.frontend.outputs import Logprob


def truncate_prompt(ids: list[int], body: SamplingRequest, max_model_len: int) -> list[int]:
    """The last truncate_prompt_tokens ids of the prompt (-1: the context length)."""
    k = body.truncate_prompt_tokens
    if k is None:
        return ids
    if k == 0 or k < -1 or k > max_model_len:
        raise bad_request(f"truncate_prompt_tokens: must be -1 (the context length) or in "
                          f"[1, {max_model_len}] (the context length), got {k}",
                          "truncate_prompt_tokens")
    k = max_model_len if k == -1 else k
    return ids[-k:]


def check_prompt_logprobs(body: SamplingRequest) -> None:
    # vLLM refuses them in streams too: they would have to come before the first token
    if body.prompt_logprobs is not None and body.stream:
        raise bad_request("prompt_logprobs: not available when stream is true",
                          "prompt_logprobs")


def token_names(tokenizer, ids: list[int], as_ids: bool) -> list[str]:
    """Printable token strings, or "token_id:<id>" (return_tokens_as_token_ids, and always
    without a tokenizer)."""
    if as_ids or tokenizer is None:
        return [f"token_id:{i}" for i in ids]
    return tokenizer.convert_ids_to_tokens(ids)


def render_prompt_logprobs(tokenizer, ids: list[int], entries: list[Logprob | None] | None,
                           k: int, as_ids: bool) -> PromptLogprobs:
    """vLLM's prompt_logprobs: for each prompt position, its token and the k most likely
    ones (the engine may have computed more; they are sorted, most likely first)."""
    out: PromptLogprobs = []
    for tid, entry in zip(ids, entries or [None] * len(ids)):
        if entry is None:
            out.append(None)
            continue
        lp, top = entry
        top = top[:k]
        names = token_names(tokenizer, [tid, *(t for t, _ in top)], as_ids)
        ranks = {t: r for r, (t, _) in enumerate(top, 1)}
        row = {str(t): PromptLogprob(logprob=v, rank=r, decoded_token=name)
               for r, ((t, v), name) in enumerate(zip(top, names[1:]), 1)}
        row.setdefault(str(tid), PromptLogprob(logprob=lp, rank=ranks.get(tid),
                                                decoded_token=names[0]))
        out.append(row)
    return out


def usage_flags(options: StreamOptions | None) -> tuple[bool, bool]:
    """(a last chunk with the usage, the usage so far in every chunk). OpenAI's default is
    no usage; vLLM's continuous_usage_stats implies include_usage unless it is false."""
    if options is None:
        return False, False
    continuous = bool(options.continuous_usage_stats) and options.include_usage is not False
    return bool(options.include_usage) or continuous, continuous
