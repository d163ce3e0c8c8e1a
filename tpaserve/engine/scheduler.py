"""Continuous batching over the paged factor cache. Pure Python.

There is no prefill phase and no decode phase. Every request has `num_computed_tokens`,
which catches up with `num_tokens` (prompt + output so far) under a per-step token budget:
a long prompt is computed in chunks over several steps, a decoding request needs one
token a step, and both kinds share a step. A request samples when a step brings it level.

Each step: running requests first (oldest first), then waiting ones (by priority, then
arrival) while budget, `max_num_seqs` and free blocks last. When a running request cannot
get a block, the newest / lowest-priority running request is preempted: its blocks are
freed and it goes back to the head of the waiting queue with its output tokens kept, to
be recomputed (nothing a client was promised is lost; greedy outputs do not change).

Multi-step decode (config.num_scheduler_steps = k > 1): when nothing waits and every
scheduled request only decodes plainly (one token, no logprobs, no sampler knob that reads
the output history), the step becomes a round of up to k decode steps. Each request gets
slots for min(k, tokens it may still produce) positions up front; the runner feeds each
step's samples to the next on the device and returns them all at once; `update` appends
them one by one and stops at the first stop condition, dropping the rest. Outputs are the
same tokens ordinary steps would give (seeded generators draw the same noise); the host
cost of a round is paid once, and a new request waits at most one round.

Invariant after every public call: each live request is in exactly one of `waiting` and
`running`, holds blocks iff it is running, and `requests` holds exactly the live ones.
"""
from __future__ import annotations

import bisect
import time

from tpaserve.config import SchedulerConfig
from tpaserve.engine.block_manager import BlockManager
from tpaserve.engine.outputs import RunnerOutput, ScheduledRequest, SchedulerOutput
from tpaserve.engine.request import Request, RequestStatus


class RequestRejected(ValueError):
    """A request that can never run (too long for the context or the cache)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue is at --max-queued-requests; try again later."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_model_len: int):
        self.config, self.blocks, self.max_model_len = config, blocks, max_model_len
        self.waiting: list[Request] = []          # sorted by Request.sort_key()
        self.running: list[Request] = []          # in admission order
        self.requests: dict[str, Request] = {}
        self.finished_ids: list[str] = []         # finished since the last schedule()
        self.num_preemptions = 0

    # ---- admission -----------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        n_prompt = req.num_prompt_tokens
        if n_prompt == 0:
            raise RequestRejected("the prompt is empty: give at least one token", "prompt")
        if n_prompt + req.max_tokens > self.max_model_len:
            raise RequestRejected(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"request needs {n_prompt + req.max_tokens} ({n_prompt} in the prompt + "
                f"{req.max_tokens} max_tokens); shorten the prompt or lower max_tokens",
                "max_tokens" if n_prompt < self.max_model_len else "prompt")
        need = self.blocks.blocks_for(n_prompt + req.max_tokens)
        if need > self.blocks.num_blocks:
            raise RequestRejected(
                f"the request needs {need} cache blocks ({n_prompt + req.max_tokens} tokens) but "
                f"the whole factor cache has {self.blocks.num_blocks} blocks "
                f"({self.blocks.num_blocks * self.blocks.block_size} tokens); it could never run",
                "max_tokens")
        cap = self.config.max_queued_requests
        if cap is not None and len(self.waiting) >= cap:
            raise QueueFull(f"the queue is full ({cap} requests waiting); retry later")
        self.requests[req.request_id] = req
        self._enqueue(req)

    def _enqueue(self, req: Request, front: bool = False) -> None:
        keys = [r.sort_key() for r in self.waiting]
        key = req.sort_key()
        i = bisect.bisect_left(keys, key) if front else bisect.bisect_right(keys, key)
        self.waiting.insert(i, req)

    def finish(self, request_id: str, status: RequestStatus) -> None:
        """Finish (abort, stop string, error) a live request now and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.blocks.free_request(request_id)
        self.finished_ids.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}            # request id -> tokens this step
        preempted: list[str] = []

        # 1. running requests, in admission order; preempt from the back of the priority
        #    order (newest, lowest priority) when blocks run out
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:        # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.blocks.allocate(req.request_id, req.token_ids,
                                           req.num_computed_tokens, n):
                victim = max(self.running, key=Request.sort_key)
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = n
                budget -= n

        # 2. waiting requests, while nothing was preempted this step
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            shared, n_computed, looked_up = self._reusable_blocks(req)
            if shared is None:                     # waits for its sibling's prompt
                break
            n = min(req.num_tokens - n_computed, budget)
            if not self.blocks.allocate(req.request_id, req.token_ids, n_computed, n, shared):
                break
            self.waiting.pop(0)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = n_computed
                if looked_up:
                    self.blocks.record_prefix_lookup(req.num_prompt_tokens, n_computed)
            req.num_computed_tokens = n_computed
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            self.running.append(req)
            scheduled[req.request_id] = n
            budget -= n

        steps = self._extend_decode(scheduled) if not preempted and not self.waiting else {}
        out = [self._scheduled(self.requests[rid], n, steps.get(rid, 1))
               for rid, n in scheduled.items()]
        finished, self.finished_ids = self.finished_ids, []
        return SchedulerOutput(requests=out, preempted_ids=preempted, finished_ids=finished)

    def _extend_decode(self, scheduled: dict[str, int]) -> dict[str, int]:
        """Turn a step where every request decodes one token into a multi-step round:
        request id -> tokens to sample (>= 1), with the extra slots allocated. Empty when
        the step does not qualify. A request whose extra blocks do not fit samples once."""
        k = self.config.num_scheduler_steps
        if k == 1 or not scheduled:
            return {}
        reqs = [self.requests[rid] for rid in scheduled]
        for req, n in zip(reqs, scheduled.values()):
            if (n != 1 or req.num_computed_tokens + 1 != req.num_tokens or req.max_tokens == 0
                    or req.wants_prompt_logprobs or req.params.logprobs is not None
                    or _needs_history(req)):
                return {}
        steps = {}
        for req in reqs:
            r = min(k, req.max_tokens - req.num_output_tokens,
                    self.max_model_len - req.num_tokens)
            if r > 1 and not self.blocks.allocate(req.request_id, req.token_ids,
                                                  req.num_tokens, r - 1):
                r = 1
            steps[req.request_id] = max(r, 1)
        return steps

    def _reusable_blocks(self, req: Request) -> tuple[list[int] | None, int, bool]:
        """Blocks a waiting request can adopt instead of computing, the tokens they hold,
        and whether the prefix cache was consulted. At least the last token is always
        computed: its logits give the next token. None: wait for the sibling."""
        bs = self.blocks.block_size
        limit = req.num_tokens - 1
        if req.fork_of is not None:
            sib = self.requests.get(req.fork_of)
            if sib is not None and sib.status == RequestStatus.RUNNING:
                full = min(limit, req.num_prompt_tokens) // bs
                if sib.num_computed_tokens < full * bs:
                    return None, 0, False         # sibling's prompt not computed yet: wait
                blocks = self.blocks.table(sib.request_id)[:full]
                return blocks, full * bs, False
            # Sibling finished or waiting. Do not wait for a waiting one: when both were
            # preempted the fork is queued *ahead* of it (front insertion), and waiting
            # would stall the queue forever. Compute the prompt; the prefix cache may help.
        if req.params.prompt_logprobs is not None and req.wants_prompt_logprobs:
            return [], 0, False                   # every prompt position must be scored
        hits = self.blocks.find_cached(req.request_id, req.token_ids, limit)
        return hits, len(hits) * bs, self.blocks.enable_prefix_caching

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        # num_computed_tokens is still the value before this step: a victim scheduled
        # earlier in this step has blocks hashed for tokens it will now not compute
        self.blocks.free_request(req.request_id, req.num_computed_tokens)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req, front=True)

    def _scheduled(self, req: Request, n: int, num_steps: int = 1) -> ScheduledRequest:
        start = req.num_computed_tokens
        sample = start + n == req.num_tokens and req.max_tokens > 0
        plp = None
        if req.wants_prompt_logprobs and req.num_prompt_logprobs_done <= min(
                start + n, req.num_prompt_tokens - 1):
            plp = req.num_prompt_logprobs_done
        return ScheduledRequest(
            request_id=req.request_id, token_ids=req.token_ids[start:start + n], start_pos=start,
            # the live, append-only table: read-only for the runner, valid for this step
            block_ids=self.blocks.table(req.request_id), sample=sample, params=req.params,
            prompt_token_ids=req.prompt_token_ids,
            output_token_ids=req.output_token_ids if sample and _needs_history(req) else [],
            eos_token_id=req.eos_token_id, prompt_logprobs_from=plp, num_steps=num_steps)

    # ---- results -------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish requests that hit a
        token-level stop. Returns the requests that changed (finished ones included)."""
        changed = []
        for s in sched.requests:
            req = self.requests.get(s.request_id)
            if req is None:                        # aborted while the step ran
                continue
            req.num_computed_tokens = s.start_pos + s.num_tokens
            if s.prompt_logprobs_from is not None:
                got = len(result.prompt_logprobs.get(s.request_id, []))
                req.num_prompt_logprobs_done = s.prompt_logprobs_from + got
            status = None
            got = result.sampled.get(s.request_id) if s.sample else None
            if isinstance(got, list):               # a multi-step round's samples
                # position start_pos + i was computed to sample token i + 1 of the round
                for i, tok in enumerate(got[:s.num_steps]):
                    req.token_ids.append(tok)
                    req.num_computed_tokens = s.start_pos + i + 1
                    status = self._stop_status(req, tok)
                    if status is not None:
                        break
                self.blocks.register(req.request_id, req.token_ids, req.num_computed_tokens)
            elif s.sample:
                tok = got
                req.token_ids.append(tok)
                status = self._stop_status(req, tok)
            elif req.max_tokens == 0 and req.num_computed_tokens >= req.num_prompt_tokens:
                status = RequestStatus.FINISHED_LENGTH
            changed.append(req)
            if status is not None:
                self.finish(req.request_id, status)
        return changed

    def _stop_status(self, req: Request, tok: int) -> RequestStatus | None:
        p = req.params
        n_out = req.num_output_tokens
        if n_out >= p.min_tokens:
            if tok == req.eos_token_id and not p.ignore_eos:
                req.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if tok in p.stop_token_ids:
                req.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if n_out >= req.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


def _needs_history(req: Request) -> bool:
    """Whether sampling this request reads its output tokens (penalties, min_tokens).
    Any min_tokens > 0 needs them for the whole request: the sampler masks eos and the stop
    ids while len(output_token_ids) < min_tokens, so an empty list once min_tokens is
    reached would mask them for good."""
    p = req.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                or p.min_tokens)
