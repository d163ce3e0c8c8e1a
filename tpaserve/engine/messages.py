"""The messages between a frontend (API process, or the offline LLM) and the engine core.
Everything that crosses the process boundary is here, as msgspec Structs of plain values,
encoded with msgpack:

  frontend -> core (input socket)   AddRequests (one client request's n sequences, admitted
                                    all or none), Abort, Shutdown
  core -> frontend (output socket)  EngineCoreOutputs: per step, for each request with news,
                                    its new token ids, logprobs and finish reason, plus the
                                    scheduler's stats; CoreDead when the core cannot go on
  core -> parent (start-up pipe)    CoreReady (what the frontend must know: EngineInfo) or
                                    CoreFailed (one line, and whether it is the user's fault)

Token text, stop strings, n > 1 groups and logprob rendering never cross: they are the
frontend's (frontend/output_processor.py).
"""
from __future__ import annotations

import msgspec

from tpaserve.engine.contracts import Logprob
from tpaserve.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence (the frontend expands n > 1 into n of these, ids "<id>#<i>")."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float                    # time.monotonic() of the frontend (same clock)
    priority: int = 0
    fork_of: str | None = None             # sibling whose prompt blocks it may share
    client_index: int = 0                  # the frontend its outputs go to


class AddRequests(msgspec.Struct, tag=True, array_like=True):
    requests: list[EngineCoreRequest]


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    pass


CoreInput = AddRequests | Abort | Shutdown


class RequestError(msgspec.Struct, array_like=True, omit_defaults=True):
    """Why a request ended without finishing: kind "rejected" (never admissible; `param`
    names the field), "queue_full" (retry later), "step_failed" (the step it was in raised)."""
    kind: str
    message: str
    param: str | None = None


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int] = []
    new_logprobs: list[Logprob] | None = None        # one per new token, if asked for
    prompt_logprobs: list[Logprob] | None = None     # new entries, consecutive positions
    finish_reason: str | None = None                 # stop | length | abort | error
    stop_reason: int | str | None = None             # the stop token id hit
    num_cached_tokens: int = 0                       # prompt tokens from the prefix cache
    error: RequestError | None = None


class SchedulerStats(msgspec.Struct, array_like=True, omit_defaults=True):
    """The core's state after a step (gauges, cumulative counters) and what it timed since
    the last stats (time.monotonic() in the core; the frontend turns them into metrics)."""
    num_running: int = 0
    num_waiting: int = 0
    num_blocks_used: int = 0
    num_preemptions: int = 0              # cumulative
    prefix_queries: int = 0               # cumulative, tokens looked up
    prefix_hits: int = 0                  # cumulative, tokens found
    step_durations: list[float] = []      # schedule + execute + update of each step
    step_tokens: list[int] = []           # positions computed per step
    step_seqs: list[int] = []             # sequences per step
    queue_times: list[float] = []         # arrival -> first scheduled, per request
    host_seconds: float = 0.0             # cumulative: scheduling, launching, updating
    wait_seconds: float = 0.0             # cumulative: waiting for the device's results


class EngineCoreOutputs(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStats | None = None


class CoreDead(msgspec.Struct, tag=True, array_like=True):
    """The core cannot go on (failed steps in a row, an internal error); it exits next."""
    message: str


CoreOutput = EngineCoreOutputs | CoreDead


class EngineInfo(msgspec.Struct, omit_defaults=True):
    """What a frontend must know about the engine it serves, resolved by the core."""
    max_model_len: int
    vocab_size: int                       # ids a prompt may hold and a request may sample
    num_blocks: int
    block_size: int
    device: str
    dtype: str
    num_scheduler_steps: int
    async_scheduling: bool
    enable_prefix_caching: bool
    # the factor cache, for the metrics and the start-up log (runner/factor_cache.py)
    bytes_per_token: int
    mha_bytes_per_token: int
    n_layer: int
    n_head: int
    head_dim: int
    k_rank: int
    v_rank: int
    mha_heads: int
    cache_summary: str
    pid: int = 0
    cache_dtype: str = ""                 # bfloat16, float16, float32 or fp8 (e4m3)
    # bytes_per_token for each cache dtype this model can use, for /metrics
    bytes_per_token_by_dtype: dict[str, int] = {}
    # admission, checked in the frontend before a request is sent
    scheduling_policy: str = "fcfs"
    max_queued_requests: int | None = None

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size


class CoreReady(msgspec.Struct, tag=True):
    info: EngineInfo


class CoreFailed(msgspec.Struct, tag=True):
    """Start-up failed. user_error: a bad flag, checkpoint or size (the CLI exits 2)."""
    message: str
    user_error: bool


CoreHandshake = CoreReady | CoreFailed
