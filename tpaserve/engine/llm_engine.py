"""The engine: one step = schedule -> execute -> update, and the offline `LLM` API on top.

    sched = scheduler.schedule()            which requests, how many tokens each
    result = runner.execute(sched)          sampled tokens and logprobs (plain lists)
    scheduler.update(sched, result)         append tokens, token-level stops, free finished
    -> RequestOutput per request touched    text deltas, stop strings, finish reasons

A client request with n > 1 becomes n scheduler requests "<id>#<i>"; the siblings fork
the first one's prompt blocks instead of computing the prompt again.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from tpaserve.config import ConfigError, EngineConfig
from tpaserve.engine.block_manager import BlockManager
from tpaserve.engine.cuda_graphs import DecodeGraphs, default_buckets
from tpaserve.engine.factor_cache import FactorCache, FactorCacheSpec
from tpaserve.engine.mixed_graphs import MixedGraphs, default_seq_buckets, default_token_buckets
from tpaserve.engine.model_runner import ModelRunner
from tpaserve.engine.output_processor import SequenceState, StopStringMatcher
from tpaserve.engine.outputs import CompletionOutput, RequestOutput, RunnerOutput
from tpaserve.engine.request import Request, RequestStatus
from tpaserve.engine.sampler import Sampler
from tpaserve.engine.scheduler import RequestRejected, Scheduler
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams

logger = logging.getLogger("tpaserve.engine")

MAX_CONSECUTIVE_FAILURES = 3


class EngineDeadError(RuntimeError):
    """The engine cannot continue; every request in flight fails with this."""


@dataclass
class _Group:
    """A client request: its n sequences and what is shared between them."""
    request_id: str
    prompt_token_ids: list[int]
    seq_ids: list[str]
    arrival_time: float
    prompt_logprobs: list | None = None
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0        # kept here: the scheduler forgets finished requests
    first_token_time: float | None = None
    finished_at: float | None = None
    seqs: dict[str, SequenceState] = field(default_factory=dict)
    first_scheduled_time: float | None = None
    last_token_time: dict[str, float] = field(default_factory=dict)   # per sequence
    emitted: bool = False             # an output was returned (its prompt is counted)


@dataclass
class FinishedRequestStats:
    """A client request that ended (all n sequences), for the per-request metrics."""
    finish_reasons: list[str]         # one per sequence: stop, length, abort, error
    num_prompt_tokens: int
    num_generation_tokens: int        # all n sequences together
    e2e_latency: float                # arrival -> end of the step that finished it (or abort)


@dataclass
class EngineStats:
    """What the engine did since the last `take_stats()`, timed where it happened: in the
    step thread, with time.monotonic(). engine/metrics.py turns it into samples.

    A token's time is the end of the step's update, when its RequestOutput exists (the runner
    returns host lists, so the device work is done by then). Queue time: arrival ->
    first scheduled; time to first token: arrival -> the first token of any of the n
    sequences; inter-token latency: between two tokens of one sequence (a step samples at
    most one token per sequence, so a gap after a preemption shows as one long latency)."""
    step_durations: list[float] = field(default_factory=list)   # schedule + execute + update
    step_tokens: list[int] = field(default_factory=list)        # tokens computed per step
    step_seqs: list[int] = field(default_factory=list)          # sequences per step
    num_preemptions: int = 0
    prompt_tokens: int = 0            # prompts of requests that returned their first output
    generation_tokens: int = 0
    queue_times: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    itls: list[float] = field(default_factory=list)
    finished: list[FinishedRequestStats] = field(default_factory=list)


class LLMEngine:
    def __init__(self, model: T6, config: EngineConfig, tokenizer=None, num_blocks: int | None = None):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        mcfg = model.cfg
        if config.max_model_len > mcfg.max_position:
            raise ConfigError(f"--max-model-len {config.max_model_len} exceeds the model's trained "
                              f"context ({mcfg.max_position} tokens, config.json block_size)")
        self.max_model_len = config.max_model_len
        self.spec = FactorCacheSpec.from_model(mcfg, self.dtype, config.cache.block_size)
        self.vocab_size = tokenizer.vocab_size if tokenizer is not None else mcfg.vocab_size
        self.vocab_size = min(self.vocab_size, mcfg.vocab_size)
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
        # before sizing: the CUDA memory profile runs a real step, sampler included
        self.sampler = Sampler(self.vocab_size, self.eos_token_id, seed=config.seed)
        num_blocks = num_blocks or self._num_blocks()
        self.cache = FactorCache(self.spec, num_blocks, self.device)
        self.blocks = BlockManager(num_blocks, config.cache.block_size,
                                   config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks, self.max_model_len)
        self.runner = ModelRunner(model, self.cache, self.sampler, self.device,
                                  max_num_seqs=config.scheduler.max_num_seqs)
        if self.device.type == "cuda" and not config.enforce_eager:
            graphs = DecodeGraphs(model, self.cache, self.runner.ops,
                                  default_buckets(config.scheduler.max_num_seqs),
                                  self.max_model_len, self.device,
                                  workspace=self.runner.workspace)
            graphs.capture_all()
            self.runner.graphs = graphs
            sc = config.scheduler
            mixed = MixedGraphs(model, self.cache, self.runner.ops,
                                default_token_buckets(sc.max_num_batched_tokens),
                                default_seq_buckets(sc.max_num_seqs), self.max_model_len,
                                self.device, workspace=self.runner.workspace)
            mixed.capture_all(pool=graphs.pool)
            self.runner.mixed_graphs = mixed
        self.consecutive_failures = 0
        self.groups: dict[str, _Group] = {}
        self.seq_to_group: dict[str, _Group] = {}
        self.collect_stats = False          # set by whoever calls take_stats() (metrics)
        self._stats = EngineStats()
        logger.info(self.spec.summary(num_blocks))

    # ---- sizing ----------------------------------------------------------------------------
    def _num_blocks(self) -> int:
        c = self.config.cache
        if c.num_blocks is not None:
            return c.num_blocks
        if c.cache_memory is not None:
            n = self.spec.num_blocks_for(c.cache_memory)
        elif self.device.type == "cuda":
            n = self._profile_cuda_blocks()
        else:
            n = self.spec.num_blocks_for(c.cpu_default_memory)
        if n < 1:
            raise ConfigError(f"the factor cache gets no block: one block needs "
                              f"{self.spec.bytes_per_block} bytes; give more --cache-memory or "
                              f"--gpu-memory-utilization")
        return n

    def _profile_cuda_blocks(self) -> int:
        """Blocks that fit in utilization * device memory after the weights, the activation
        peak of a full-budget step (measured by running one) and a reserve for the decode
        CUDA graphs' pool (the activations of the largest bucket, scaled from that peak)."""
        from tpaserve.engine.outputs import ScheduledRequest, SchedulerOutput
        dev = self.device
        torch.cuda.synchronize(dev)
        weights = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        n_tok = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        probe = FactorCache(self.spec, -(-n_tok // self.spec.block_size), dev)
        runner = ModelRunner(self.model, probe, self.sampler, dev,  # its workspace counts in the peak
                             max_num_seqs=self.config.scheduler.max_num_seqs)
        sr = ScheduledRequest("profile", [0] * n_tok, 0, list(range(probe.num_blocks)), True,
                              SamplingParams(max_tokens=1), [0] * n_tok, [])
        runner.execute(SchedulerOutput([sr]))
        torch.cuda.synchronize(dev)
        activations = torch.cuda.max_memory_allocated(dev) - probe.nbytes - weights
        del probe, runner
        torch.cuda.empty_cache()
        graph_reserve = 0
        if not self.config.enforce_eager:
            # the shared pool holds one step's activations at a time (the largest mixed-step
            # graph is a full-budget step: the peak just measured); plus the decode and the
            # mixed graphs' fp32 logits buffers and cuBLAS's workspace
            vocab = self.model.cfg.vocab_size
            logits = 2 * self.config.scheduler.max_num_seqs * vocab * 4
            graph_reserve = activations + logits + 96 * 2**20
        total = torch.cuda.get_device_properties(dev).total_memory
        budget = int(total * self.config.cache.gpu_memory_utilization) - weights - activations - graph_reserve
        logger.info("memory profile: weights %.2f GiB, activation peak %.2f GiB, graph reserve "
                    "%.2f GiB, device %.2f GiB -> cache budget %.2f GiB", weights / 2**30,
                    activations / 2**30, graph_reserve / 2**30, total / 2**30, budget / 2**30)
        return self.spec.num_blocks_for(max(budget, 0))

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    params: SamplingParams | None = None, priority: int = 0,
                    arrival_time: float | None = None) -> None:
        """Validate and queue. Raises RequestRejected (never fits / bad tokens) or
        QueueFull; on error nothing is queued."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise RequestRejected(f"request id {request_id!r} is already in flight", "request_id")
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestRejected(f"prompt token id {bad[0]} is outside the vocabulary "
                                  f"[0, {self.vocab_size})", "prompt")
        params.verify_vocab(self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise RequestRejected("stop strings need a tokenizer; this engine has none", "stop")
        n_prompt = len(prompt_token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None \
            else max(self.max_model_len - n_prompt, 0)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        group = _Group(request_id, list(prompt_token_ids), [], arrival)
        reqs = []
        for i in range(params.n):
            p = params
            if i > 0:   # siblings: their own seed stream, prompt logprobs come once
                p = dataclasses.replace(params, prompt_logprobs=None,
                                        seed=None if params.seed is None else (params.seed + i) % 2**63)
            sid = f"{request_id}#{i}"
            reqs.append(Request(sid, list(prompt_token_ids), p, max_tokens, self.eos_token_id,
                                priority, arrival, fork_of=f"{request_id}#0" if i else None))
            group.seq_ids.append(sid)
            group.seqs[sid] = SequenceState(i, p, self._detokenizer(prompt_token_ids, p),
                                            StopStringMatcher(tuple(p.stop), p.include_stop_str_in_output))
        added = []
        try:
            for r in reqs:
                self.scheduler.add_request(r)
                added.append(r)
        except Exception:
            for r in added:
                self.scheduler.finish(r.request_id, RequestStatus.FINISHED_ABORTED)
            raise
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        self.groups[request_id] = group
        for sid in group.seq_ids:
            self.seq_to_group[sid] = group

    def _detokenizer(self, prompt_ids, params: SamplingParams):
        if self.tokenizer is None:
            return None
        from tpaserve.models.detokenizer import IncrementalDetokenizer
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)

    def abort_request(self, request_id: str) -> None:
        """Stop a request now; its blocks are free when this returns."""
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for sid in group.seq_ids:
            self.scheduler.finish(sid, RequestStatus.FINISHED_ABORTED)
            self.seq_to_group.pop(sid, None)
        outs = [group.seqs[sid].out for sid in group.seq_ids]
        self._stats.finished.append(FinishedRequestStats(
            [o.finish_reason or "abort" for o in outs], len(group.prompt_token_ids),
            sum(len(o.token_ids) for o in outs), time.monotonic() - group.arrival_time))

    def take_stats(self) -> EngineStats:
        """The stats gathered since the last call (see EngineStats), and start anew."""
        stats, self._stats = self._stats, EngineStats()
        return stats

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.monotonic()
        if not self.collect_stats:
            self._stats = EngineStats()        # nobody reads them: keep one step's worth
        st = self._stats
        sched = self.scheduler.schedule()
        st.num_preemptions += len(sched.preempted_ids)
        for s in sched.requests:
            group = self.seq_to_group.get(s.request_id)
            if group is not None and group.first_scheduled_time is None:
                t = self.scheduler.requests[s.request_id].first_scheduled_time
                group.first_scheduled_time = t
                st.queue_times.append(t - group.arrival_time)
        if not sched.requests:
            if sched.finished_ids:
                self.runner.execute(sched)           # lets the runner drop finished state
            return []
        try:
            result: RunnerOutput = self.runner.execute(sched)
        except Exception as exc:                       # noqa: BLE001 - reported per request
            return self._fail_step(sched, exc)
        self.consecutive_failures = 0
        changed = self.scheduler.update(sched, result)
        now = time.monotonic()
        touched: dict[str, _Group] = {}
        for req in changed:
            group = self.seq_to_group.get(req.request_id)
            if group is None:
                continue
            if group.request_id not in touched:
                touched[group.request_id] = group
                _clear_deltas(group)
            if req.request_id == group.seq_ids[0]:
                group.num_cached_tokens = req.num_cached_tokens
            seq = group.seqs[req.request_id]
            if req.request_id in result.prompt_logprobs and group.prompt_logprobs is not None:
                group.prompt_logprobs.extend(result.prompt_logprobs[req.request_id])
            lp = result.logprobs.get(req.request_id)
            has_new = req.num_output_tokens > seq.num_tokens_seen
            hit = seq.advance(req.output_token_ids, [lp] if lp is not None and has_new else [],
                              req.status.finish_reason, req.stop_reason)
            if hit is not None and not req.is_finished:
                self.scheduler.finish(req.request_id, RequestStatus.FINISHED_STOPPED)
            n_new = len(seq.out.token_ids_delta)       # after a stop string cut a round short
            if n_new:
                st.generation_tokens += n_new
                if group.first_token_time is None:
                    group.first_token_time = now
                    st.ttfts.append(now - group.arrival_time)
                last = group.last_token_time.get(req.request_id)
                if last is not None:
                    # a multi-step round delivers n_new tokens at once: spread the gap
                    st.itls.extend([(now - last) / n_new] * n_new)
                group.last_token_time[req.request_id] = now
        outs = [self._output(g, now) for g in touched.values()]
        st.step_durations.append(time.monotonic() - t0)
        st.step_tokens.append(sched.num_tokens)
        st.step_seqs.append(len(sched.requests))
        return outs

    def _fail_step(self, sched, exc: Exception) -> list[RequestOutput]:
        """A step raised: the requests in it fail (their clients get an error), the rest of
        the engine goes on. Half-written blocks may be hashed, so the prefix cache is
        dropped. After MAX_CONSECUTIVE_FAILURES failed steps in a row the engine is dead."""
        self.consecutive_failures += 1
        logger.exception("engine step failed (%d in a row)", self.consecutive_failures,
                         exc_info=exc)
        message = f"the engine step failed: {type(exc).__name__}: {exc}"
        outs = []
        for s in sched.requests:
            group = self.seq_to_group.get(s.request_id)
            if group is None or group.request_id not in self.groups:
                continue
            _clear_deltas(group)
            for sid in group.seq_ids:
                self.scheduler.finish(sid, RequestStatus.FINISHED_ERROR)
                group.seqs[sid].out.finish_reason = "error"
            out = self._output(group, time.monotonic())
            out.error = message
            outs.append(out)
        self.blocks.reset_prefix_cache()
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise EngineDeadError(message) from exc
        return outs

    def _output(self, group: _Group, now: float) -> RequestOutput:
        outs = [group.seqs[sid].out for sid in group.seq_ids]
        finished = all(o.finished for o in outs)
        if not group.emitted:
            group.emitted = True
            self._stats.prompt_tokens += len(group.prompt_token_ids)
        if finished:
            group.finished_at = now
            self._stats.finished.append(FinishedRequestStats(
                [o.finish_reason for o in outs], len(group.prompt_token_ids),
                sum(len(o.token_ids) for o in outs), now - group.arrival_time))
            del self.groups[group.request_id]
            for sid in group.seq_ids:
                self.seq_to_group.pop(sid, None)
        # prompt logprobs go out once complete (a stream echoes them before the first token)
        # and again on the final output (for whoever only reads that one)
        plp = group.prompt_logprobs
        complete = plp is not None and len(plp) >= len(group.prompt_token_ids)
        send_plp = complete and (finished or not group.prompt_logprobs_sent)
        group.prompt_logprobs_sent |= send_plp
        return RequestOutput(
            request_id=group.request_id, prompt_token_ids=group.prompt_token_ids,
            outputs=[_snapshot(o, finished) for o in outs], finished=finished,
            prompt_logprobs=list(plp) if send_plp else None,
            num_cached_tokens=group.num_cached_tokens)


def _clear_deltas(group: _Group) -> None:
    """Deltas are per step. An output carries all n sequences, and a sibling that did not
    advance this step would otherwise repeat its previous delta (streams got it twice)."""
    for seq in group.seqs.values():
        seq.out.token_ids_delta, seq.out.logprobs_delta, seq.out.text_delta = [], [], ""


def _snapshot(o: CompletionOutput, full: bool) -> CompletionOutput:
    """A copy the consumer may keep while the engine moves on. Cumulative lists are
    copied on the final output only (copying them every step would cost O(n^2))."""
    return dataclasses.replace(
        o, token_ids=list(o.token_ids) if full else [],
        logprobs=(list(o.logprobs) if full else []) if o.logprobs is not None else None,
        token_ids_delta=list(o.token_ids_delta), logprobs_delta=list(o.logprobs_delta))


class LLM:
    """Offline generation: LLM(model).generate(prompts, params) -> one RequestOutput each."""

    def __init__(self, model, tokenizer=None, **engine_args):
        from tpaserve.engine.factory import build_engine
        self.engine = build_engine(model, tokenizer=tokenizer, **engine_args)
        self._ids = itertools.count()

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        prompts = _as_prompt_list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        order = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                ids = self._encode(prompt)
                self.engine.add_request(rid, ids, p)
                order.append(rid)
        except Exception:
            # all or nothing: the prompts added before the bad one would otherwise stay
            # queued and run (unreturned) inside the next generate() call
            for rid in order:
                self.engine.abort_request(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in order]

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.engine.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids or a tokenizer")
            return self.engine.tokenizer.encode(prompt)
        return list(prompt)


def _as_prompt_list(prompts) -> list:
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)
