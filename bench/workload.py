"""What a load run sends, and when: request specs and arrival times, both from a seed.

Prompts are either token ids (the completions API's list-of-ids prompt form: exact prompt
lengths, no tokenizer needed on either side) or random words (any endpoint, chat included;
a word is about one token for BPE tokenizers, so lengths are approximate). With a shared
prefix, request i starts with prefix i % num_prefixes (shared_prefix_len units) followed by
its own random input_len units, so a prefix cache can reuse the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Common English words, all single GPT-2 tokens with a leading space.
WORDS = tuple("""the of and to in is was for on that with as by at from his it an were are
which this be or has had first one their its new after but who not they have her she two
been other when there all during into school time may years more most only over city some
world would where later up such used many can state about national out known university
united then made""".split())


@dataclass(frozen=True)
class RequestSpec:
    prompt: str | list[int]     # text, or token ids (completions endpoint only)
    prompt_len: int             # tokens (ids) or words (text): what the workload asked for
    output_len: int             # max_tokens, sent with ignore_eos so it is exact
    extra: dict | None = None   # fields of this request's body (e.g. structured_outputs)


def make_requests(num: int, input_len: int, output_len: int, *, seed: int = 0,
                  token_ids: bool = False, vocab_size: int = 50257,
                  shared_prefix_len: int = 0, num_prefixes: int = 1) -> list[RequestSpec]:
    """`num` requests of shared_prefix_len + input_len prompt units and output_len tokens."""
    if num < 0 or input_len < 0 or output_len < 1:
        raise ValueError(f"need num >= 0, input_len >= 0, output_len >= 1; got {num}, "
                         f"{input_len}, {output_len}")
    if input_len + shared_prefix_len < 1:
        raise ValueError("a prompt needs at least one unit: input_len + shared_prefix_len >= 1")
    if shared_prefix_len and num_prefixes < 1:
        raise ValueError(f"num_prefixes must be >= 1, got {num_prefixes}")
    rng = np.random.default_rng(seed)
    high = vocab_size if token_ids else len(WORDS)

    def draw(n: int) -> list[int]:
        return rng.integers(0, high, size=n).tolist()

    prefixes = [draw(shared_prefix_len) for _ in range(num_prefixes)] if shared_prefix_len else [[]]
    specs = []
    for i in range(num):
        units = prefixes[i % len(prefixes)] + draw(input_len)
        prompt = units if token_ids else " ".join(WORDS[u] for u in units)
        specs.append(RequestSpec(prompt, len(units), output_len))
    return specs


def poisson_arrivals(num: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times (s, from 0) of `num` requests: a Poisson process of `rate` requests/s
    (exponential gaps of mean 1/rate, the first request at its first gap). rate=inf sends
    everything at 0."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (inf: all at once), got {rate}")
    if np.isinf(rate):
        return np.zeros(num)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num)   # (num,)
    return np.cumsum(gaps)
