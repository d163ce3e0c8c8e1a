"""A request as the engine core sees it: one sequence's tokens, how many of them have been
computed into the factor cache, and a status. Owned and mutated by the scheduler only.

Positions and tokens, with async scheduling (one step in flight while the next is planned):

    token_ids                  known tokens: prompt + outputs received from finished steps
    num_placeholders           tokens the step in flight will sample (not known yet)
    num_tokens_with_placeholders = len(token_ids) + num_placeholders
    num_computed_tokens        positions whose factors are in the cache once every scheduled
                               step has run (advanced when a step is *scheduled*)

so a decoding request always has exactly one uncomputed position, its last token, whether
that token is known or still a placeholder on the device.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from tpaserve.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered: every finished state sorts after every live one."""
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2          # waiting again, its blocks freed, to be recomputed
    FINISHED_STOPPED = 3   # eos, a stop token id or a stop string
    FINISHED_LENGTH = 4    # max_tokens or the context length
    FINISHED_ABORTED = 5   # client went away or asked to stop
    FINISHED_ERROR = 6     # a step failed while it was in flight

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """One sequence to generate (a client request with n > 1 is n of these, made by the
    frontend; the siblings after the first fork its prompt blocks, see `fork_of`)."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                      # resolved: params.max_tokens or what the context allows
    eos_token_id: int | None = None
    priority: int = 0                    # lower runs first (vLLM's convention)
    arrival_time: float = field(default_factory=time.monotonic)
    fork_of: str | None = None           # sibling whose computed prompt blocks this one shares
    client_index: int = 0                # which frontend sent it (outputs go back there)

    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(init=False)          # prompt + output, append-only
    num_placeholders: int = 0                          # sampled by the step in flight
    num_computed_tokens: int = 0                       # see the module docstring
    num_cached_tokens: int = 0                         # of the prompt, served by the prefix cache
    num_prompt_logprobs_done: int = 1                  # next prompt position to score (0 has none)
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    first_scheduled_time: float | None = None
    # which admission of this id (a client may reuse an id once the old request ended,
    # while a step that scheduled the old one is still in flight)
    serial: int = 0
    # positions a *finished* step computed (num_computed_tokens counts scheduled ones)
    num_confirmed_tokens: int = 0
    # sha256 chain of every full block of token_ids (BlockManager.hash_blocks extends it as
    # tokens append); a block enters the prefix cache once its tokens are computed
    block_hashes: list[bytes] = field(default_factory=list)
    # a constrained request's grammar state (core/structured.py, opaque here: the scheduler
    # reads only `.ready`, and schedules the request once it is true); None: unconstrained
    grammar: Any = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.token_ids) + self.num_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None
                and self.num_prompt_logprobs_done < self.num_prompt_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def sort_key(self) -> tuple[int, float]:
        return (self.priority, self.arrival_time)
