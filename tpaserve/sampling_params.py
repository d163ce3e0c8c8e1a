"""SamplingParams: the one place a request's generation knobs live.

Field names and meanings follow the OpenAI API as vLLM implements it. Every value is
checked here, once, at the edge: an invalid one raises `SamplingParamsError`, whose `.param`
is the OpenAI field name (the HTTP layer turns it into a 400 with `param` set). The engine
and the sampler trust what they get.

The dataclass is frozen and hashable: lists are normalised to tuples and `logit_bias` to a
tuple of (token_id, bias) pairs sorted by token id.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tpaserve.exceptions import SamplingParamsError
from tpaserve.structured_outputs import StructuredOutputsParams

__all__ = ["SamplingParams", "SamplingParamsError", "StructuredOutputsParams"]

MAX_N = 128
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MAX_PENALTY = 2.0          # presence / frequency penalty range is [-2, 2] (OpenAI)
SEED_RANGE = (-2**63, 2**64 - 1)   # what torch.Generator.manual_seed accepts

# Temperatures below this are treated as greedy: dividing fp32 logits by a smaller number
# can overflow to inf and turn the softmax into NaN. vLLM uses the same threshold.
GREEDY_TEMPERATURE = 1e-5
# Ranges where the sampler's fp32 math stays finite. A repetition penalty of 1e-300 is 0 in
# fp32 (logit / 0 = inf, then NaN); a temperature of 1e300 is inf (-inf / inf = NaN for a
# masked logit). These bounds are far outside any useful setting.
MAX_TEMPERATURE = 100.0
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def _check_int(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise SamplingParamsError(name, v, "must be an integer")
    if lo is not None and hi is not None and not lo <= v <= hi:
        raise SamplingParamsError(name, v, f"must be in [{lo}, {hi}]")
    if lo is not None and v < lo:
        raise SamplingParamsError(name, v, f"must be >= {lo}")
    return v


def _check_float(name: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise SamplingParamsError(name, v, "must be a number")
    if not math.isfinite(v):
        raise SamplingParamsError(name, v, "must be finite")
    return float(v)


def _check_bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise SamplingParamsError(name, v, "must be a boolean")
    return v


def _normalise_logit_bias(v: Any) -> tuple[tuple[int, float], ...]:
    # JSON object keys are strings, so "50256" is accepted as token 50256.
    pairs = v.items() if isinstance(v, Mapping) else v
    out: dict[int, float] = {}
    shape_error = SamplingParamsError("logit_bias", v, "must be a mapping of token id to bias")
    try:
        items = list(pairs)
    except TypeError:
        raise shape_error from None
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise shape_error
        tok, bias = item
        if isinstance(tok, str) and tok.strip().lstrip("-").isdigit():
            tok = int(tok)
        tok = _check_int("logit_bias", tok, lo=0)
        bias = _check_float("logit_bias", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            bound = f"{MAX_LOGIT_BIAS:g}"
            raise SamplingParamsError("logit_bias", {tok: bias},
                                      f"values must be in [-{bound}, {bound}]")
        out[tok] = bias
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16           # None: until the context limit; 0: prompt only (echo)
    temperature: float = 1.0              # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                        # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # given as {token_id: bias}; stored sorted
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # constrain the output to a JSON schema, regex, choice or grammar (structured_outputs.py)
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:   # frozen: normalise through object.__setattr__
            object.__setattr__(self, name, value)

        _check_int("n", self.n, 1, MAX_N)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=0)

        put("temperature", _check_float("temperature", self.temperature))
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise SamplingParamsError("temperature", self.temperature,
                                      f"must be in [0, {MAX_TEMPERATURE:g}]")
        put("top_p", _check_float("top_p", self.top_p))
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingParamsError("top_p", self.top_p, "must be in (0, 1]")
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise SamplingParamsError("top_k", self.top_k, "must be -1 or 0 (off) or >= 1")
        put("min_p", _check_float("min_p", self.min_p))
        if not 0.0 <= self.min_p <= 1.0:
            raise SamplingParamsError("min_p", self.min_p, "must be in [0, 1]")

        if self.seed is not None:
            _check_int("seed", self.seed, *SEED_RANGE)

        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (list, tuple)):
            raise SamplingParamsError("stop", self.stop, "must be a string or a list of strings")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", self.stop, "must contain only non-empty strings")
        put("stop", tuple(stop))
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise SamplingParamsError("stop_token_ids", self.stop_token_ids, "must be a list")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, lo=0)
        put("stop_token_ids", tuple(self.stop_token_ids))

        _check_bool("ignore_eos", self.ignore_eos)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError(
                "min_tokens", self.min_tokens, f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, MAX_LOGPROBS)

        for name in ("presence_penalty", "frequency_penalty"):
            v = _check_float(name, getattr(self, name))
            if not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise SamplingParamsError(name, v,
                                          f"must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
            put(name, v)
        put("repetition_penalty", _check_float("repetition_penalty", self.repetition_penalty))
        lo, hi = REPETITION_PENALTY_RANGE
        if not lo <= self.repetition_penalty <= hi:
            raise SamplingParamsError("repetition_penalty", self.repetition_penalty,
                                      f"must be in [{lo:g}, {hi:g}]")
        put("logit_bias", _normalise_logit_bias(self.logit_bias))

        _check_bool("skip_special_tokens", self.skip_special_tokens)
        _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs", so,
                                      "must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: temperature 0 (below GREEDY_TEMPERATURE) or top_k == 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    def verify_vocab(self, vocab_size: int) -> None:
        """Token ids named by the request must exist; the engine calls this on admission
        (the params alone do not know the tokenizer)."""
        for tok, _ in self.logit_bias:
            if tok >= vocab_size:
                raise SamplingParamsError(
                    "logit_bias", tok, f"token id must be < vocab size {vocab_size}")
        for tok in self.stop_token_ids:
            if tok >= vocab_size:
                raise SamplingParamsError(
                    "stop_token_ids", tok, f"token id must be < vocab size {vocab_size}")
