"""The engine core: the scheduler, the block manager and the model runner of one engine, and
its step. It speaks only in messages of plain values (engine/messages.py): requests in,
EngineCoreOutputs out. The same class runs in the engine core process (core/process.py,
behind ZMQ) and in-process (the offline LLM and the engine tests).

    schedule() -> SchedulerOutput          which requests, how many tokens each
    runner.execute(out) -> PendingOutput   enqueued on the device, not waited for
    pending.result() -> RunnerOutput       sampled ids as lists (waits for the device)
    scheduler.update(out, result)          appended tokens, stops -> EngineCoreOutputs

Async scheduling (config.async_scheduling, on by default): at most one step is in flight.
`step()` schedules and launches step N+1 first, then waits for step N and updates from it,
so the host's work for N+1 (scheduling, block tables, input buffers) and for N's outputs
runs while the device computes. The scheduler plans N+1 without N's samples (placeholders;
engine/scheduler.py) and the runner feeds them on the device. While a live request samples
from its output history (penalties, min_tokens) the core steps synchronously.

Structured outputs (core/structured.py): a step with rows under a grammar needs, for its
token masks, the samples of the step before on the host. So its forward is launched with
sampling held back; step N is finished (its tokens go to the matchers) and its outputs
returned; the next call fills N+1's masks while N+1's forward runs and enqueues its
sampling, then goes on as usual (a round with constrained rows runs its later steps in that
sampling: runner/model_runner.py):

    call k    | schedule N+1 | fwd N+1 launched | wait N, update N, accept | outputs of N
    call k+1  | masks N+1, sample N+1 | schedule N+2 | fwd N+2 launched | wait N+1 ...
    device    ... sample N | fwd N+1 ........................ | sample N+1 | fwd N+2 ...

KV-cache events (--kv-events-endpoint): the block manager records its prefix cache's
changes; after each step (and a reset) the core hands them, as one batch, to the publisher
(core/kv_events.py), which sends them from its own thread.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time

import msgspec
import torch

from tpaserve.config import EngineConfig
from tpaserve.core.kv_events import KVEventPublisher
from tpaserve.core.structured import Grammars
from tpaserve.engine.block_manager import BlockManager
from tpaserve.engine.contracts import SchedulerOutput
from tpaserve.engine.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineInfo,
    RequestError,
    SchedulerStats,
)
from tpaserve.engine.request import Request, RequestStatus
from tpaserve.engine.scheduler import Scheduler, check_request
from tpaserve.exceptions import (
    ConfigError,
    EngineDeadError,
    QueueFull,
    RequestRejected,
    SamplingParamsError,
)
from tpaserve.models.decoder import DecoderLM
from tpaserve.runner.factor_cache import CACHE_DTYPE_NAMES, FactorCache, FactorCacheSpec
from tpaserve.runner.graphs import StepGraphs, decode_buckets, seq_buckets, token_buckets
from tpaserve.runner.memory import num_blocks_for, profile_cuda_budget
from tpaserve.runner.model_runner import ModelRunner, PendingOutput
from tpaserve.runner.sampler import Sampler

logger = logging.getLogger("tpaserve.engine")

MAX_CONSECUTIVE_FAILURES = 3
# Decode steps per scheduling round on CUDA (see Scheduler): the host work of a step is
# paid once per round instead of once per token; a new request waits at most one round.
# Measured with async scheduling on the H200 (docs/benchmarks.md, served, 2026-12-03):
# T6-medium at c=256 makes 53.6K tok/s with rounds of 4 (TTFT p50 179 ms) and 50.9K with
# rounds of 8 (232 ms), but a host-bound small model loses a third with 4 (t6-demo at c=256:
# 93K vs 129K) and a single stream's TPOT goes from 0.99 to 1.01 ms. 8 by default;
# --num-scheduler-steps 4 for a large model at high concurrency that wants its TTFT low.
DEFAULT_CUDA_SCHEDULER_STEPS = 8


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible to torch")
    return torch.device(device)


_CACHE_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp8": torch.float8_e4m3fn}


def resolve_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """--cache-dtype -> the factor cache's dtype (auto: the model's). On CUDA the kernels read
    a cache of the model's dtype or fp8, and fp8 needs sm_89+ (Ada, Hopper: e4m3
    conversions). On the CPU the torch reference ops read any of them (fp8 through torch's
    e4m3 casts, with the store kernel's quantisation: kernels/reference.py)."""
    if name == "auto":
        return model_dtype
    dtype = _CACHE_DTYPES[name]            # the name was checked by CacheConfig
    if device.type != "cuda":
        return dtype
    if dtype == torch.float8_e4m3fn:
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise ConfigError(
                f"--cache-dtype fp8 needs a GPU with e4m3 conversions (compute capability "
                f"8.9+: Ada, Hopper); {torch.cuda.get_device_name(device)} is "
                f"{cap[0]}.{cap[1]}: use --cache-dtype auto")
    elif dtype != model_dtype:
        model = str(model_dtype).removeprefix("torch.")
        raise ConfigError(f"--cache-dtype {name} differs from the model's dtype {model}: on "
                          f"CUDA the cache holds the model's dtype or fp8 (use --dtype {name} "
                          f"or --cache-dtype auto)")
    return dtype


NONFINITE_MESSAGE = ("the model's logits for this request were not finite (NaN or "
                     "infinity); it was stopped")


class EngineCore:
    def __init__(self, config: EngineConfig, model: DecoderLM | None = None):
        """Load the checkpoint (or take `model`, already built), size the cache, capture the
        CUDA graphs. Raises ConfigError / CheckpointError on what the user gave."""
        if model is None:
            from tpaserve.models.loader import load
            model = load(config.model, dtype=config.dtype,
                         device=str(resolve_device(config.device)),
                         rope_tables=config.rope_tables)
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        on_cuda = device.type == "cuda"
        if on_cuda:
            # one GEMM per layer for the factor projections and one for the MLP's c_fc1/c_fc2
            # (weights become views of the fused ones; state_dict unchanged; idempotent). Not
            # on the CPU, where a fused model's shared weights would trip safetensors' save.
            model.fuse_projections()
        mcfg = model.cfg
        sc = config.scheduler
        max_model_len = sc.max_model_len or mcfg.max_position
        if max_model_len > mcfg.max_position:
            raise ConfigError(f"--max-model-len {max_model_len} exceeds the model's trained "
                              f"context ({mcfg.max_position} tokens, config.json block_size)")
        steps = sc.num_scheduler_steps or (DEFAULT_CUDA_SCHEDULER_STEPS if on_cuda else 1)
        sc = dataclasses.replace(sc, num_scheduler_steps=steps, max_model_len=max_model_len)
        self.config = dataclasses.replace(config, scheduler=sc, device=str(device),
                                          dtype=str(dtype).removeprefix("torch."))
        self.model, self.device, self.max_model_len = model, device, max_model_len
        self.vocab_size = min(config.vocab_size or mcfg.vocab_size, mcfg.vocab_size)
        self.eos_token_id = config.eos_token_id
        self.sampler = Sampler(self.vocab_size, config.eos_token_id, seed=config.seed)
        cache_dtype = resolve_cache_dtype(config.cache.cache_dtype, dtype, device)
        spec = self.spec = FactorCacheSpec.from_model(mcfg, cache_dtype,
                                                      config.cache.block_size)
        graphs = on_cuda and not config.enforce_eager
        num_blocks = num_blocks_for(config.cache, spec, device, lambda: profile_cuda_budget(
            model, spec, self.sampler, device,
            utilization=config.cache.gpu_memory_utilization,
            max_num_batched_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            max_model_len=max_model_len, graphs=graphs))
        self.cache = FactorCache(spec, num_blocks, device)
        tokens, seqs = token_buckets(sc.max_num_batched_tokens), seq_buckets(sc.max_num_seqs)
        self.runner = ModelRunner(model, self.cache, self.sampler, device,
                                  max_num_seqs=sc.max_num_seqs,
                                  max_num_batched_tokens=sc.max_num_batched_tokens,
                                  max_model_len=max_model_len,
                                  work_items=StepGraphs.work_items(tokens, seqs))
        if graphs:
            g = StepGraphs(model, self.cache, self.runner.ops, self.runner.buf,
                           self.runner.workspace, decode_buckets(sc.max_num_seqs), tokens,
                           seqs, max_model_len, device)
            g.capture_all()
            self.runner.graphs = g
        kv = config.kv_events
        self.blocks = BlockManager(num_blocks, config.cache.block_size,
                                   config.cache.enable_prefix_caching,
                                   events=[] if kv.endpoint is not None else None)
        self.scheduler = Scheduler(sc, self.blocks, max_model_len)
        self.grammars = Grammars(config.tokenizer, self.vocab_size, config.eos_token_id)
        self.async_scheduling = config.async_scheduling
        self.in_flight: tuple[SchedulerOutput, PendingOutput, float] | None = None
        self.consecutive_failures = 0
        self.client_of: dict[str, int] = {}       # live request -> the frontend it answers
        self._steps: tuple[list[float], list[int], list[int]] = ([], [], [])
        self._last_step_end = 0.0
        # where the loop's time goes: host work (schedule, launch, update) vs waiting for
        # the device; cumulative seconds, sent with the stats
        self._host = self._wait = 0.0
        # last: it opens sockets, which nothing above may leave behind by failing
        self.kv_events = (KVEventPublisher(kv, config.cache.block_size)
                          if kv.endpoint is not None else None)
        logger.info(spec.summary(num_blocks))

    @property
    def info(self) -> EngineInfo:
        s, c = self.spec, self.config
        return EngineInfo(
            max_model_len=self.max_model_len, vocab_size=self.vocab_size,
            num_blocks=self.blocks.num_blocks, block_size=s.block_size, device=c.device,
            dtype=c.dtype, num_scheduler_steps=c.scheduler.num_scheduler_steps,
            async_scheduling=self.async_scheduling,
            enable_prefix_caching=c.cache.enable_prefix_caching,
            bytes_per_token=s.bytes_per_token, mha_bytes_per_token=s.mha_bytes_per_token,
            cache_dtype=CACHE_DTYPE_NAMES.get(s.dtype, str(s.dtype)),
            bytes_per_token_by_dtype=s.bytes_per_token_by_dtype,
            n_layer=s.n_layer, n_head=s.n_head, head_dim=s.head_dim, k_rank=s.k_rank,
            v_rank=s.v_rank, mha_heads=s.mha_heads,
            cache_summary=s.summary(self.blocks.num_blocks), pid=os.getpid(),
            scheduling_policy=c.scheduler.scheduling_policy,
            max_queued_requests=c.scheduler.max_queued_requests)

    # ---- requests --------------------------------------------------------------------------
    def add_requests(self, reqs: list[EngineCoreRequest]) -> list[EngineCoreOutput]:
        """Admit one client request's sequences, all or none. Returns nothing, or one error
        output per sequence saying why none was admitted."""
        try:
            admitted = [self._request(r) for r in reqs]
            self.scheduler.add_requests(admitted)
        except (RequestRejected, SamplingParamsError, QueueFull) as exc:
            kind = "queue_full" if isinstance(exc, QueueFull) else "rejected"
            err = RequestError(kind, str(exc), getattr(exc, "param", None))
            return [EngineCoreOutput(r.request_id, finish_reason="error", error=err)
                    for r in reqs]
        for r, req in zip(reqs, admitted):
            self.client_of[r.request_id] = r.client_index
            if req.params.structured_outputs is not None:
                self.grammars.submit(req)
        return []

    def _request(self, r: EngineCoreRequest) -> Request:
        max_tokens = check_request(r.prompt_token_ids, r.params, vocab_size=self.vocab_size,
                                   max_model_len=self.max_model_len,
                                   num_blocks=self.blocks.num_blocks,
                                   block_size=self.blocks.block_size)
        if r.params.structured_outputs is not None and self.config.tokenizer is None:
            raise RequestRejected("structured outputs need the model's tokenizer, and this "
                                  "engine was built without one", "structured_outputs")
        return Request(r.request_id, r.prompt_token_ids, r.params, max_tokens,
                       self.eos_token_id, r.priority, r.arrival_time, r.fork_of, r.client_index)

    def abort(self, request_ids: list[str]) -> None:
        """Finish these now; their blocks are free when this returns."""
        for rid in request_ids:
            self.scheduler.finish(rid, RequestStatus.FINISHED_ABORTED)
            self.client_of.pop(rid, None)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished() or self.in_flight is not None

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """One step's worth of outputs (possibly none while the first step is in flight).
        Raises EngineDeadError after MAX_CONSECUTIVE_FAILURES failed steps in a row."""
        try:
            return self._step()
        finally:
            self.publish_kv_events()

    def publish_kv_events(self) -> None:
        """Hand the block manager's events so far, as one batch, to the publisher."""
        if self.kv_events is not None and self.blocks.events:
            events, self.blocks.events = self.blocks.events, []
            self.kv_events.publish(events)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (subscribers get AllBlocksCleared at once)."""
        self.blocks.reset_prefix_cache()
        self.publish_kv_events()

    def close(self) -> None:
        """Release what outlives a step: the KV-event publisher (flushed first)."""
        if self.kv_events is not None:
            self.kv_events.close()

    def _step(self) -> list[EngineCoreOutput]:
        outs: list[EngineCoreOutput] = []
        if self.in_flight is not None:
            # the step launched by the last call, its sampling held back for its masks: the
            # step before it was finished then, so its masks can be filled now
            failed = self._sample_masked(self.in_flight)
            if failed is not None:
                outs, self.in_flight = failed, None
        if not self.async_scheduling or self.scheduler.needs_history:
            if self.in_flight is not None:
                return outs + self._finish(self.in_flight)
            launched = self._launch()
            if isinstance(launched, list):
                return outs + launched
            failed = self._sample_masked(launched)
            return outs + (failed if failed is not None else self._finish(launched))
        launched = self._launch()
        if isinstance(launched, list):
            outs += launched
        if self.in_flight is not None:
            outs = self._finish(self.in_flight) + outs
        self.in_flight = launched if isinstance(launched, tuple) else None
        return outs

    def _launch(self):
        """Schedule and enqueue a step: (sched, pending, t0), or a list of outputs when the
        step failed at once or there was nothing to run. A step with constrained rows is
        enqueued without its sampling (see _sample_masked)."""
        t0 = time.monotonic()
        if not self.scheduler.has_unfinished():
            return []
        sched = self.scheduler.schedule()
        try:
            # the fast path never looks further than the count
            masked = bool(self.scheduler.num_constrained) and self.grammars.constrained(
                sched, self.scheduler.requests)
            pending = self.runner.execute(sched, defer_sampling=masked)
        except Exception as exc:                       # noqa: BLE001 - reported per request
            return self._fail_step(sched, exc)
        finally:
            self._host += time.monotonic() - t0
        if not sched.requests:
            self.grammars.wait()           # nothing runs: maybe every request's grammar compiles
            return []
        return sched, pending, t0

    def _sample_masked(self, launched: tuple[SchedulerOutput, PendingOutput, float]
                       ) -> list[EngineCoreOutput] | None:
        """Fill a launched step's grammar masks (its forward runs meanwhile) and enqueue its
        held-back sampling. None, or the failed step's outputs."""
        sched, pending, _ = launched
        if pending.deferred is None:
            return None
        t0 = time.monotonic()
        try:
            pending.sample(self.grammars.masks(sched, self.scheduler.requests))
        except Exception as exc:                       # noqa: BLE001 - reported per request
            return self._fail_step(sched, exc)
        finally:
            self._host += time.monotonic() - t0
        return None

    def _finish(self, launched: tuple[SchedulerOutput, PendingOutput, float]
                ) -> list[EngineCoreOutput]:
        sched, pending, t0 = launched
        if launched is self.in_flight:
            self.in_flight = None
        t1 = time.monotonic()
        try:
            result = pending.result()
        except Exception as exc:                       # noqa: BLE001 - reported per request
            return self._fail_step(sched, exc)
        t2 = time.monotonic()
        self._wait += t2 - t1
        self.consecutive_failures = 0
        grammars = self.grammars.of(sched, self.scheduler.requests) \
            if self.scheduler.num_constrained else {}
        outs = self.scheduler.update(sched, result)
        # a row that ended in this step before its non-finite sample (EOS) ended well
        errors = {rid: NONFINITE_MESSAGE for rid in result.nonfinite
                  if rid in self.scheduler.requests}
        if grammars:
            self.grammars.accept(outs, self.scheduler.requests)
            errors.update(self.grammars.broken(grammars))
        if errors:
            outs = self._end_with_errors(outs, errors)
        durations, tokens, seqs = self._steps
        # a step's time: from its schedule, or from the end of the step before when they
        # overlapped (async scheduling), to the end of its update; so the steps' times add
        # up to the engine's busy time, never more
        now = time.monotonic()
        durations.append(now - max(t0, self._last_step_end))
        self._last_step_end = now
        self._host += now - t2
        tokens.append(sched.num_tokens)
        seqs.append(len(sched.requests))
        return outs

    def _end_with_errors(self, outs: list[EngineCoreOutput], errors: dict[str, str]
                         ) -> list[EngineCoreOutput]:
        """End these requests with an error, keeping the tokens this step gave them: logits
        that were NaN or +inf (the sampler marks such rows, runner/sampler.NONFINITE, and
        the runner cuts them there), a grammar that failed. Their outputs of this step carry
        the error, also when the step itself finished them (a broken grammar allows only
        EOS): a client never takes such an end for a normal stop."""
        logger.error("ending %d request(s) with an error: %s", len(errors),
                     "; ".join(sorted(set(errors.values()))))
        for rid in errors:
            self.scheduler.finish(rid, RequestStatus.FINISHED_ERROR)
        out = [msgspec.structs.replace(o, finish_reason="error",
                                       error=RequestError("step_failed", errors[o.request_id]))
               if o.request_id in errors else o for o in outs]
        seen = {o.request_id for o in outs}
        out += [EngineCoreOutput(rid, finish_reason="error",
                                 error=RequestError("step_failed", message))
                for rid, message in errors.items() if rid not in seen]
        return out

    def _fail_step(self, sched: SchedulerOutput, exc: Exception) -> list[EngineCoreOutput]:
        """A step raised: the requests in it fail (their clients get an error), the rest of
        the engine goes on. After MAX_CONSECUTIVE_FAILURES failed steps in a row the engine
        is dead."""
        self.consecutive_failures += 1
        logger.error("engine step failed (%d in a row)", self.consecutive_failures,
                     exc_info=exc)
        message = f"the engine step failed: {type(exc).__name__}: {exc}"
        err = RequestError("step_failed", message)
        outs = [EngineCoreOutput(s.request_id, finish_reason="error", error=err)
                for s in sched.requests
                if self.scheduler.finish(s.request_id, RequestStatus.FINISHED_ERROR)]
        # a half-run step may have written slots anywhere its requests' tables point
        self.reset_prefix_cache()
        if self.consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            raise EngineDeadError(message) from exc
        return outs

    def route(self, outs: list[EngineCoreOutput]) -> dict[int, list[EngineCoreOutput]]:
        """Outputs grouped by the frontend that sent each request; forgets finished ones."""
        by: dict[int, list[EngineCoreOutput]] = {}
        for o in outs:
            client = self.client_of.get(o.request_id, 0)
            if o.finish_reason is not None:
                self.client_of.pop(o.request_id, None)
            by.setdefault(client, []).append(o)
        return by

    def take_stats(self) -> SchedulerStats:
        """The state now, and the step timings since the last call."""
        s, b = self.scheduler, self.blocks
        durations, tokens, seqs = self._steps
        self._steps = ([], [], [])
        queue, s.queue_times = s.queue_times, []
        return SchedulerStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_blocks_used=b.num_used,
            num_preemptions=s.num_preemptions, prefix_queries=b.prefix_queries,
            prefix_hits=b.prefix_hits, step_durations=durations, step_tokens=tokens,
            step_seqs=seqs, queue_times=queue, host_seconds=self._host,
            wait_seconds=self._wait)
