"""Plain values that cross the layer boundaries of one engine step:

    Scheduler.schedule()           -> SchedulerOutput
    ModelRunner.execute(sched_out) -> RunnerOutput
    LLMEngine.step()               -> list[RequestOutput]

Lists and ints, no tensors, so a test can build any of them by hand."""
from __future__ import annotations

from dataclasses import dataclass, field

from tpaserve.sampling_params import SamplingParams

# One logprob entry: (logprob of the chosen/actual token, [(token_id, logprob)] top-N, best first)
Logprob = tuple[float, list[tuple[int, float]]]


@dataclass(frozen=True)
class ScheduledRequest:
    """What the runner computes for one request this step: `token_ids` at positions
    start_pos .. start_pos + len(token_ids) - 1, written into the slots of `block_ids`."""
    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool                       # the last row's logits produce the next token
    params: SamplingParams
    prompt_token_ids: list[int]        # read-only, for repetition penalties
    output_token_ids: list[int]        # read-only snapshot, for penalties and min_tokens
    eos_token_id: int | None = None
    # score prompt positions p = prompt_logprobs_from .. min(start_pos + n, n_prompt - 1),
    # each from the row of position p - 1 (in this chunk); None: no prompt logprobs
    prompt_logprobs_from: int | None = None
    # multi-step decode: tokens to sample back to back (each step's input is the previous
    # step's sample, fed on the device); block_ids cover them all. 1 = an ordinary step.
    num_steps: int = 1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    requests: list[ScheduledRequest]
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)   # runner drops their state

    @property
    def num_tokens(self) -> int:
        """Tokens computed: a multi-step request computes num_steps positions."""
        return sum(r.num_tokens + r.num_steps - 1 for r in self.requests)

    @property
    def num_steps(self) -> int:
        """Model steps this output runs: > 1 only for a multi-step decode (see Scheduler)."""
        return max((r.num_steps for r in self.requests), default=1)


@dataclass(frozen=True)
class RunnerOutput:
    # request id -> new token id; a list of num_steps ids for a multi-step request
    sampled: dict[str, int | list[int]]
    logprobs: dict[str, Logprob] = field(default_factory=dict)
    # request id -> logprob entries of prompt tokens at consecutive positions, starting at
    # ScheduledRequest.prompt_logprobs_from (entry for position p scores token p given < p)
    prompt_logprobs: dict[str, list[Logprob]] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    """One of a request's n sequences. Cumulative fields plus the delta of this step."""
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
    error: str | None = None
