"""The plain values of one engine step, between the scheduler and the model runner:

    Scheduler.schedule()              -> SchedulerOutput
    ModelRunner.execute(out).result() -> RunnerOutput
    Scheduler.update(out, result)     -> [EngineCoreOutput] (engine/messages.py)

Lists, ints and SamplingParams, no tensors and no live scheduler state: a SchedulerOutput is
a snapshot, so the runner may read it while the scheduler plans the next step (async
scheduling), and a test can build any of them by hand. The runner keeps what lasts across
steps (each request's block table, its parameters and generator); a SchedulerOutput says
what changed: the requests it sees for the first time, the blocks appended to a table, the
requests that left.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from tpaserve.sampling_params import SamplingParams

# One logprob entry: (logprob of the chosen/actual token, [(token_id, logprob)] top-N, best first)
Logprob = tuple[float, list[tuple[int, float]]]

# An input token id the runner takes from the step in flight: that step's last sample for
# the same request (async scheduling; the scheduler has not seen the token yet).
PLACEHOLDER = -1


@dataclass(frozen=True)
class NewRequest:
    """What the runner keeps about a request for as long as it lives (sent once)."""
    request_id: str
    prompt_token_ids: list[int]        # for repetition penalties
    params: SamplingParams


@dataclass(frozen=True)
class ScheduledRequest:
    """What the runner computes for one request this step: `token_ids` at positions
    start_pos .. start_pos + len(token_ids) - 1, written into the request's block table."""
    request_id: str
    token_ids: list[int]               # PLACEHOLDER entries: see above (only the last one)
    start_pos: int
    # blocks appended to the request's table since the runner last saw it; with
    # reset_blocks the table restarts with them (first schedule, or resumed after preemption)
    new_block_ids: list[int]
    reset_blocks: bool
    sample: bool                       # the last row's logits produce the next token
    # multi-step round: tokens to sample back to back (each step's input is the previous
    # step's sample, fed on the device); the table covers them all. 1 = an ordinary step.
    num_steps: int = 1
    # score prompt positions p = prompt_logprobs_from .. min(start_pos + n, n_prompt - 1),
    # each from the row of position p - 1 (in this chunk); None: no prompt logprobs
    prompt_logprobs_from: int | None = None
    # a copy of the outputs so far, for penalties and min_tokens; None when no knob needs it
    output_token_ids: list[int] | None = None
    # the scheduler's admission number of this request id (update() ignores results for an
    # id that was finished and admitted again while the step ran)
    serial: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    requests: list[ScheduledRequest]
    new_requests: list[NewRequest] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)   # runner drops their tables
    finished_ids: list[str] = field(default_factory=list)    # runner drops all their state

    @property
    def num_tokens(self) -> int:
        """Positions computed: a multi-step request computes num_steps of them."""
        return sum(r.num_tokens + r.num_steps - 1 for r in self.requests)

    @property
    def num_steps(self) -> int:
        """Model steps this output runs: > 1 for a multi-step round (see Scheduler)."""
        return max((r.num_steps for r in self.requests), default=1)


@dataclass(frozen=True)
class RunnerOutput:
    # request id -> the ids it sampled, num_steps of them (one for an ordinary step)
    sampled: dict[str, list[int]]
    # request id -> one entry per sampled id, for requests that asked for logprobs
    logprobs: dict[str, list[Logprob]] = field(default_factory=dict)
    # request id -> logprob entries of prompt tokens at consecutive positions, starting at
    # ScheduledRequest.prompt_logprobs_from (entry for position p scores token p given < p)
    prompt_logprobs: dict[str, list[Logprob]] = field(default_factory=dict)
    # requests whose logits were not finite (NaN, +inf) at some sample: `sampled` holds
    # only what came before it, and the request must end with an error
    nonfinite: list[str] = field(default_factory=list)
