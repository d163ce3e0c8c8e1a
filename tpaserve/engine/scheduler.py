"""Continuous batching over the paged factor cache. Pure Python.

There is no prefill phase and no decode phase. Every request has `num_computed_tokens`,
which catches up with its tokens under a per-step token budget: a long prompt is computed
in chunks over several steps, a decoding request needs one position a step, and both kinds
share a step. A request samples when a step brings it level.

Each step: running requests first (oldest first), then waiting ones (by priority, then
arrival) while budget, `max_num_seqs` and free blocks last. When a running request cannot
get a block, the newest / lowest-priority running request is preempted: its blocks are
freed and it goes back to the head of the waiting queue with its output tokens kept, to
be recomputed (nothing a client was promised is lost; greedy outputs do not change).

Async scheduling: `schedule()` may run while the previous step is still on the device. What
that step will sample is not known yet, so a request carries it as placeholders
(Request.num_placeholders): a decoding request's next input is then PLACEHOLDER, which the
runner takes from the step in flight on the device. Bookkeeping of what is *scheduled*
(computed positions, prompt logprobs) happens in schedule(); `update()` only appends what
was sampled and applies the stop conditions. A request never gets more samples in flight
than max_tokens and the context allow; one whose sampling reads its output history
(penalties, min_tokens) waits until it has no placeholder and never joins a multi-step
round, and the core steps synchronously while such a request lives. One whose next token a
grammar constrains (structured outputs) is scheduled like any other: the core fills its
masks once the samples they depend on are on the host (core/engine_core.py, runner's
rounds). A constrained request whose grammar is still compiling (Request.grammar.ready) is
passed over in the waiting queue.

Multi-step rounds (config.num_scheduler_steps = k > 1): when every scheduled request only
decodes plainly (samples, no logprobs, no knob that reads the output history) and no prompt
work is held back by the token budget, the step becomes a round: each request gets slots
for min(k, tokens it may still produce) positions up front; the runner feeds each step's
samples to the next on the device and returns them all at once; `update` appends them one
by one and stops at the first stop condition, dropping the rest. Outputs are the tokens
ordinary steps would give (seeded generators draw the same noise); the host cost of a round
is paid once, and a new request waits at most one round.

Invariant after every public call: each live request is in exactly one of `waiting` and
`running`, holds blocks iff it is running, and `requests` holds exactly the live ones.
"""
from __future__ import annotations

import bisect
import time

from tpaserve.config import SchedulerConfig
from tpaserve.engine.block_manager import BlockManager
from tpaserve.engine.contracts import (
    PLACEHOLDER,
    NewRequest,
    RunnerOutput,
    ScheduledRequest,
    SchedulerOutput,
)
from tpaserve.engine.messages import EngineCoreOutput
from tpaserve.engine.request import Request, RequestStatus
from tpaserve.exceptions import QueueFull, RequestRejected

__all__ = ["Scheduler", "check_admissible", "check_request", "RequestRejected", "QueueFull"]


def check_admissible(num_prompt: int, max_tokens: int, max_model_len: int, num_blocks: int,
                     block_size: int) -> None:
    """Raise RequestRejected if a sequence can never run: an empty prompt, one longer than
    the context, or more tokens than the whole cache holds. The frontend checks this before
    sending a request; the core again when it admits one."""
    if num_prompt == 0:
        raise RequestRejected("the prompt is empty: give at least one token", "prompt")
    need = num_prompt + max_tokens
    if need > max_model_len:
        raise RequestRejected(
            f"this model's maximum context length is {max_model_len} tokens, but the "
            f"request needs {need} ({num_prompt} in the prompt + {max_tokens} max_tokens); "
            f"shorten the prompt or lower max_tokens",
            "max_tokens" if num_prompt < max_model_len else "prompt")
    blocks = -(-need // block_size)
    if blocks > num_blocks:
        raise RequestRejected(
            f"the request needs {blocks} cache blocks ({need} tokens) but the whole factor "
            f"cache has {num_blocks} blocks ({num_blocks * block_size} tokens); it could "
            f"never run", "max_tokens")


def check_request(prompt_token_ids: list[int], params, *, vocab_size: int, max_model_len: int,
                  num_blocks: int, block_size: int) -> int:
    """Everything about one sequence that can be checked without the engine's state: token
    ids in the vocabulary, the ids its params name, and check_admissible. Returns its
    max_tokens (params.max_tokens, or None resolved to what the context allows)."""
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestRejected(f"prompt token id {bad} is outside the vocabulary "
                              f"[0, {vocab_size})", "prompt")
    params.verify_vocab(vocab_size)
    n = len(prompt_token_ids)
    max_tokens = params.max_tokens if params.max_tokens is not None else max(max_model_len - n, 0)
    check_admissible(n, max_tokens, max_model_len, num_blocks, block_size)
    return max_tokens


PRIORITY_RANGE = (-2**31, 2**31 - 1)


def check_priority(priority: int, policy: str) -> None:
    """A request's priority under the server's --scheduling-policy."""
    if policy == "fcfs" and priority != 0:
        raise RequestRejected(f"priority {priority} is not accepted: this server schedules "
                              f"first come first served (--scheduling-policy fcfs); send 0 "
                              f"or leave it out", "priority")
    if not PRIORITY_RANGE[0] <= priority <= PRIORITY_RANGE[1]:
        raise RequestRejected(f"priority must be in [{PRIORITY_RANGE[0]}, "
                              f"{PRIORITY_RANGE[1]}], got {priority}", "priority")


def check_sequences(count: int, max_queued_requests: int | None,
                    param: str = "n") -> None:
    """A request of `count` sequences (prompts x n) against the queue's bound: more than
    the bound could never be admitted (all of a request's sequences queue together), so it
    is a 400, not a 503 to retry forever."""
    if max_queued_requests is not None and count > max_queued_requests:
        raise RequestRejected(
            f"the request has {count} sequences but this server queues at most "
            f"{max_queued_requests} (--max-queued-requests); it could never be admitted",
            param)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_model_len: int):
        self.config, self.blocks, self.max_model_len = config, blocks, max_model_len
        self.round_steps = config.num_scheduler_steps or 1
        self.waiting: list[Request] = []          # sorted by Request.sort_key()
        self.running: list[Request] = []          # in admission order
        self.requests: dict[str, Request] = {}
        self.finished_ids: list[str] = []         # finished since the last schedule()
        self.num_preemptions = 0
        self.num_constrained = 0                  # live requests with structured outputs
        self.queue_times: list[float] = []        # taken by the core's stats
        # what the runner holds: requests it has seen, and how many blocks of each table
        self._runner_knows: set[str] = set()
        self._blocks_sent: dict[str, int] = {}
        self._serial = 0

    # ---- admission -----------------------------------------------------------------------
    def add_requests(self, reqs: list[Request]) -> None:
        """Admit one client request's sequences, all or none. Raises RequestRejected (never
        fits, duplicate id) or QueueFull (the waiting queue is at its bound)."""
        for req in reqs:
            check_priority(req.priority, self.config.scheduling_policy)
            if req.request_id in self.requests:
                raise RequestRejected(f"request id {req.request_id!r} is already in flight",
                                      "request_id")
            check_admissible(req.num_prompt_tokens, req.max_tokens, self.max_model_len,
                             self.blocks.num_blocks, self.blocks.block_size)
        cap = self.config.max_queued_requests
        check_sequences(len(reqs), cap)
        if cap is not None:
            if len(self.waiting) + len(reqs) > cap:
                raise QueueFull(f"the queue is full ({len(self.waiting)} sequences waiting, "
                                f"bound {cap}); retry later")
        for req in reqs:
            self._serial += 1
            req.serial = self._serial
            self.blocks.hash_blocks(req)
            self.requests[req.request_id] = req
            self.num_constrained += req.params.structured_outputs is not None
            self._enqueue(req)

    def add_request(self, req: Request) -> None:
        self.add_requests([req])

    def _enqueue(self, req: Request, front: bool = False) -> None:
        keys = [r.sort_key() for r in self.waiting]
        key = req.sort_key()
        i = bisect.bisect_left(keys, key) if front else bisect.bisect_right(keys, key)
        self.waiting.insert(i, req)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish (abort, stop string, error) a live request now and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        self.num_constrained -= req.params.structured_outputs is not None
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = status
        self.blocks.free_request(request_id)
        self._blocks_sent.pop(request_id, None)
        if request_id in self._runner_knows:
            self._runner_knows.discard(request_id)
            self.finished_ids.append(request_id)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def needs_history(self) -> bool:
        """Some live request samples from its output history: the core steps without a step
        in flight while it lives, so that history is always whole on the host."""
        return any(_needs_history(r) for r in self.requests.values())

    # ---- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, int] = {}            # request id -> tokens this step
        preempted: list[Request] = []

        # 1. running requests, in admission order; preempt from the back of the priority
        #    order (newest, lowest priority) when blocks run out
        for req in list(self.running):
            if budget == 0:
                break
            if req.status != RequestStatus.RUNNING:        # preempted earlier in this loop
                continue
            n = min(self._tokens_to_compute(req), budget)
            if n == 0:
                continue
            while not self.blocks.allocate(req.request_id, req.num_computed_tokens + n):
                victim = max(self.running, key=Request.sort_key)
                budget += scheduled.pop(victim.request_id, 0)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled[req.request_id] = n
                budget -= n

        # 2. waiting requests, while nothing was preempted this step
        held_by_budget = False
        i = 0                                      # waiting[:i]: grammars still compiling
        while (i < len(self.waiting) and not preempted
               and len(self.running) < self.config.max_num_seqs):
            if budget == 0:
                held_by_budget = True
                break
            req = self.waiting[i]
            assert req.num_placeholders == 0, "a waiting request has samples in flight"
            if req.grammar is not None and not req.grammar.ready:
                i += 1
                continue
            shared, n_computed, looked_up = self._reusable_blocks(req)
            if shared is None:                     # waits for its sibling's prompt
                break
            n = min(req.num_tokens - n_computed, budget)
            if not self.blocks.allocate(req.request_id, n_computed + n, shared):
                break
            self.waiting.pop(i)
            if req.status == RequestStatus.WAITING:
                req.num_cached_tokens = n_computed
                if looked_up:
                    self.blocks.record_prefix_lookup(req.num_prompt_tokens, n_computed)
            req.num_computed_tokens = req.num_confirmed_tokens = n_computed
            req.status = RequestStatus.RUNNING
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                if req.fork_of is None:
                    self.queue_times.append(req.first_scheduled_time - req.arrival_time)
            self.running.append(req)
            scheduled[req.request_id] = n
            budget -= n

        steps = self._round_steps(scheduled) if not preempted and not held_by_budget else {}
        new: list[NewRequest] = []
        out = [self._schedule_one(self.requests[rid], n, steps.get(rid, 1), new)
               for rid, n in scheduled.items()]
        finished, self.finished_ids = self.finished_ids, []
        return SchedulerOutput(requests=out, new_requests=new,
                               preempted_ids=[r.request_id for r in preempted],
                               finished_ids=finished)

    def _tokens_to_compute(self, req: Request) -> int:
        """Positions a running request could compute now (before the budget): 0 while its
        sampling needs history it does not have yet, or when every token it may still
        produce is already in flight."""
        if req.num_placeholders and _needs_history(req):
            return 0
        total = req.num_tokens_with_placeholders
        n = total - req.num_computed_tokens
        if req.max_tokens > 0 and not self._room(req):
            return 0                   # the chunk would sample, but its last token is in flight
        return n

    def _room(self, req: Request) -> int:
        """Tokens the request may still sample beyond those known or in flight."""
        total = req.num_tokens_with_placeholders
        return min(req.max_tokens - (total - req.num_prompt_tokens), self.max_model_len - total)

    def _round_steps(self, scheduled: dict[str, int]) -> dict[str, int]:
        """Turn a step where every request samples plainly into a multi-step round: request
        id -> tokens to sample (>= 1), with the extra slots allocated. Empty when the step
        does not qualify. A request whose extra blocks do not fit samples once."""
        k = self.round_steps
        if k == 1 or not scheduled:
            return {}
        reqs = [self.requests[rid] for rid in scheduled]
        for req, n in zip(reqs, scheduled.values()):
            if (req.num_computed_tokens + n != req.num_tokens_with_placeholders
                    or req.max_tokens == 0 or req.wants_prompt_logprobs
                    or req.params.logprobs is not None or _needs_history(req)):
                return {}
        steps = {}
        for req, n in zip(reqs, scheduled.values()):
            r = min(k, self._room(req))
            if r > 1 and not self.blocks.allocate(req.request_id,
                                                  req.num_computed_tokens + n + r - 1):
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
                if sib.num_confirmed_tokens < full * bs:
                    return None, 0, False         # sibling's prompt not computed yet: wait
                # computed by a finished step: a failed step in flight cannot have left them
                # half-written
                blocks = self.blocks.table(sib.request_id)[:full]
                return blocks, full * bs, False
            # Sibling finished or waiting. Do not wait for a waiting one: when both were
            # preempted the fork is queued *ahead* of it (front insertion), and waiting
            # would stall the queue forever. Compute the prompt; the prefix cache may help.
        if req.params.prompt_logprobs is not None and req.wants_prompt_logprobs:
            return [], 0, False                   # every prompt position must be scored
        hits = self.blocks.find_cached(req.block_hashes, limit)
        return hits, len(hits) * bs, self.blocks.enable_prefix_caching

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free_request(req.request_id)
        self._blocks_sent.pop(req.request_id, None)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = req.num_confirmed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(req, front=True)

    def _schedule_one(self, req: Request, n: int, num_steps: int,
                      new: list[NewRequest]) -> ScheduledRequest:
        """The step's view of one request, and the bookkeeping of scheduling it."""
        rid, start = req.request_id, req.num_computed_tokens
        end = start + n
        known = req.num_tokens
        tokens = req.token_ids[start:end]
        if end > known:            # a decoding request whose last token is still in flight
            assert n == 1 and end == req.num_tokens_with_placeholders, (rid, start, n, known)
            tokens = [PLACEHOLDER]
        sample = end == req.num_tokens_with_placeholders and req.max_tokens > 0
        plp = None
        if req.wants_prompt_logprobs and req.num_prompt_logprobs_done <= min(
                end, req.num_prompt_tokens - 1):
            plp = req.num_prompt_logprobs_done
            req.num_prompt_logprobs_done = min(end, req.num_prompt_tokens - 1) + 1
        if rid not in self._runner_knows:
            self._runner_knows.add(rid)
            new.append(NewRequest(rid, req.prompt_token_ids, req.params))
        table = self.blocks.table(rid)
        sent = self._blocks_sent.get(rid)
        self._blocks_sent[rid] = len(table)
        req.num_computed_tokens = end + num_steps - 1
        if sample:
            req.num_placeholders += num_steps
        return ScheduledRequest(
            request_id=rid, token_ids=tokens, start_pos=start,
            new_block_ids=list(table) if sent is None else table[sent:],
            reset_blocks=sent is None, sample=sample, num_steps=num_steps,
            prompt_logprobs_from=plp,
            output_token_ids=req.output_token_ids if sample and _needs_history(req) else None,
            serial=req.serial)

    # ---- results -------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Append what a finished step sampled, finish requests that hit a token-level stop,
        register the blocks it computed. One output per request with news."""
        outs = []
        for s in sched.requests:
            rid = s.request_id
            req = self.requests.get(rid)
            if req is None or req.serial != s.serial:     # finished while the step ran
                continue
            new: list[int] = []
            status = None
            if s.sample:
                req.num_placeholders -= s.num_steps
                new, status = self._accept(req, result.sampled[rid][:s.num_steps])
                req.token_ids += new
                self.blocks.hash_blocks(req)
            elif req.max_tokens == 0 and s.start_pos + s.num_tokens >= req.num_prompt_tokens:
                status = RequestStatus.FINISHED_LENGTH
            if req.status == RequestStatus.RUNNING:
                req.num_confirmed_tokens = min(s.start_pos + s.num_tokens + s.num_steps - 1,
                                               req.num_tokens)
                self.blocks.register(rid, req.block_hashes, req.num_confirmed_tokens,
                                     req.token_ids)
            plp = result.prompt_logprobs.get(rid)
            if not new and plp is None and status is None:
                continue
            lps = result.logprobs.get(rid)
            out = EngineCoreOutput(rid, new, new_logprobs=lps[:len(new)] if lps else None,
                                   prompt_logprobs=plp, num_cached_tokens=req.num_cached_tokens)
            if status is not None:
                self.finish(rid, status)
                out.finish_reason, out.stop_reason = status.finish_reason, req.stop_reason
            outs.append(out)
        return outs

    def _accept(self, req: Request, toks: list[int]) -> tuple[list[int], RequestStatus | None]:
        """The sampled tokens a request keeps, in order, up to the first stop condition, and
        that condition. The k-th token (from 1) ends it at eos (unless ignore_eos) or a stop
        token id once it has min_tokens outputs, else at max_tokens or the context length
        (a stop token that also reaches the length counts as a stop)."""
        p = req.params
        n_out, n_tok = req.num_output_tokens, req.num_tokens
        cut, status = len(toks), None
        room = max(min(req.max_tokens - n_out, self.max_model_len - n_tok), 1)
        if room <= cut:
            cut, status = room, RequestStatus.FINISHED_LENGTH
        eos = None if p.ignore_eos else req.eos_token_id
        stops = p.stop_token_ids
        if eos is not None or stops:
            for i in range(max(p.min_tokens - n_out - 1, 0), cut):
                tok = toks[i]
                if tok == eos or tok in stops:
                    req.stop_reason = None if tok == eos else tok
                    return toks[:i + 1], RequestStatus.FINISHED_STOPPED
        return toks[:cut] if cut < len(toks) else toks, status


def _needs_history(req: Request) -> bool:
    """Whether sampling this request reads its output tokens (penalties, min_tokens).
    Any min_tokens > 0 needs them for the whole request: the sampler masks eos and the stop
    ids while len(output_token_ids) < min_tokens, so an empty list once min_tokens is
    reached would mask them for good."""
    p = req.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0
                or p.min_tokens)
