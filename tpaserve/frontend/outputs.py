"""What a client of the engine receives, per client request (the n sequences together):
built by the OutputProcessor from the core's token-level outputs.

    LLM.generate()        -> one final RequestOutput per prompt
    LLMEngine.step()      -> a RequestOutput per request with news
    AsyncLLM.generate()   -> an async stream of RequestOutputs, the last one finished
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tpaserve.engine.contracts import Logprob
from tpaserve.engine.messages import RequestError

__all__ = ["CompletionOutput", "RequestOutput", "Logprob", "RequestError"]


@dataclass
class CompletionOutput:
    """One of a request's n sequences. Cumulative fields plus the delta of this output."""
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None            # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None        # the stop token id or stop string hit
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[Logprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    # entry 0 is None (no context); set on the output where they are complete and the final one
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0
    # the request ended without finishing: rejected at admission, queue full, a failed step
    error: RequestError | None = None
