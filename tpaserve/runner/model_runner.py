"""Executes one scheduled step on the model. The only place where the scheduler's lists
become device tensors:

    SchedulerOutput -> host arrays (numpy): token ids (T,), positions (T,), slot mapping (T,),
    query start locations (B+1,), sequence lengths (B,), block tables (B, W), sample rows
    -> the step's static buffers (one pinned, non-blocking copy each; runner/graphs.py)
    -> a CUDA graph replay (decode or mixed bucket) or an eager forward over the buffers
    -> logits of the rows that sample (and that score prompt tokens) -> Sampler
    -> PendingOutput: the samples copied back without waiting; result() waits and returns
       the RunnerOutput (plain lists)

`execute` never waits for the device, so the engine core can plan the next step while this
one runs (async scheduling). With `defer_sampling` (a step with rows under a grammar) it
enqueues only the forward: the core fills the grammar's token masks while the forward runs
(they need the step before's samples on the host) and then `PendingOutput.sample(masks)`
enqueues the sampling. In a round with such rows, sample() runs the round's later steps
too: each step's forward is enqueued before the host waits for the step before's samples
and fills its masks (core/structured.StepMasks), so the device computes meanwhile. An input token the scheduler does not know yet (PLACEHOLDER: the
step in flight samples it) is taken on the device from `last_sampled`, which every step
updates with each request's last sample, indexed by the request's table row.

A multi-step round (num_steps K > 1, see Scheduler): step 0 is any step in which every
request samples; steps 1..K-1 are decode steps over the same requests, each fed the previous
step's samples on the device. Request i samples n_i <= K tokens; in steps t >= n_i its row
is padding (no cache slot, position repeated) and draws nothing from its generator, so seeded
requests sample exactly what single steps would.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from tpaserve.engine.contracts import RunnerOutput, ScheduledRequest, SchedulerOutput
from tpaserve.kernels.prefill import work_list
from tpaserve.models.decoder import DecoderLM
from tpaserve.runner.attention import PagedAttention, StepMetadata, select_ops
from tpaserve.runner.factor_cache import FactorCache
from tpaserve.runner.graphs import StepBuffers, StepGraphs
from tpaserve.runner.request_states import RequestStates
from tpaserve.runner.sampler import (
    LogprobsOnDevice,
    Sampler,
    SamplingRow,
    apply_token_bitmask,
    to_device,
)


@dataclass
class PendingOutput:
    """A step enqueued on the device. `result()` waits for it and reads it back."""
    request_ids: list[str] = field(default_factory=list)      # the rows that sampled (S)
    num_steps: list[int] = field(default_factory=list)        # samples of each of them
    samples: torch.Tensor | None = None                       # (K, S) int64, host
    logprobs: list[tuple[str, int, int]] = field(default_factory=list)  # (rid, row, top)
    logprob_rows: LogprobsOnDevice | None = None
    prompt_logprobs: list[tuple[str, LogprobsOnDevice]] = field(default_factory=list)
    event: torch.cuda.Event | None = None
    # a forward whose sampling waits for sample(mask) (execute(..., defer_sampling=True))
    deferred: tuple[_Step, torch.Tensor] | None = None

    def sample(self, masks) -> None:
        """Enqueue the held-back sampling of this step's logits under masks.first(), an
        (S, W) int32 bitmask (core/structured.StepMasks). A single step never waits for
        the device; a round waits for each step's samples to fill the next step's masks."""
        step, logits = self.deferred
        self.deferred = None
        step.finish(self, logits, masks)

    def result(self) -> RunnerOutput:
        assert self.deferred is None, "a deferred step was never sampled"
        if self.event is not None:
            self.event.synchronize()                 # waits without holding the GIL
        out = RunnerOutput(sampled={})
        if self.samples is not None:
            toks = self.samples.tolist()
            for j, (rid, k) in enumerate(zip(self.request_ids, self.num_steps)):
                out.sampled[rid] = [toks[t][j] for t in range(k)]
            if bool((self.samples < 0).any()):        # Sampler.NONFINITE: rare, so scan then
                for rid, ids in out.sampled.items():
                    if any(t < 0 for t in ids):
                        out.sampled[rid] = ids[:next(i for i, t in enumerate(ids) if t < 0)]
                        out.nonfinite.append(rid)
        if self.logprob_rows is not None:
            entries = self.logprob_rows.to_lists()
            for (rid, row, top), (chosen, best) in zip(self.logprobs, entries):
                out.logprobs[rid] = [(chosen, best[:top])]
        for rid, lp in self.prompt_logprobs:
            out.prompt_logprobs[rid] = lp.to_lists()
        return out


def _to_host(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of x on the host, enqueued; wait for the event (None: already there)."""
    if not x.is_cuda:
        return x.clone(), None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _h2d(dst: torch.Tensor, src: np.ndarray) -> None:
    """Host array -> device buffer slice, without waiting (pinned staging on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(src))
    if dst.is_cuda:
        t = t.pin_memory()
    dst.copy_(t, non_blocking=True)


class ModelRunner:
    def __init__(self, model: DecoderLM, cache: FactorCache, sampler: Sampler, device: torch.device,
                 *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 work_items: int = 0):
        self.model, self.cache, self.sampler, self.device = model, cache, sampler, device
        spec = cache.spec
        self.block_size, self.max_model_len = spec.block_size, max_model_len
        self.ops = select_ops(device)
        self.workspace = self.ops.make_workspace(max(max_num_seqs, 1), spec.n_head,
                                                 spec.out_dim, device=device)
        max_blocks = -(-max_model_len // spec.block_size)
        self.buf = StepBuffers(max(max_num_batched_tokens, max_num_seqs), max_num_seqs,
                               max_blocks, model.cfg.vocab_size, work_items, device)
        self.graphs: StepGraphs | None = None
        self.states = RequestStates(max_num_seqs, max_blocks, device)
        # each table row's last sampled token (the input of a PLACEHOLDER)
        self.last_sampled = torch.zeros(self.states.num_rows, dtype=torch.int64, device=device)

    # ---- the step --------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, defer_sampling: bool = False) -> PendingOutput:
        st = self.states
        for rid in sched.finished_ids:
            st.finish(rid)
        for rid in sched.preempted_ids:
            st.preempt(rid)
        for new in sched.new_requests:
            st.add(new)
        reqs = sched.requests
        if not reqs:
            return PendingOutput()
        states = [st.apply(r) for r in reqs]
        if st.num_rows > self.last_sampled.numel():
            grown = torch.zeros(st.num_rows, dtype=torch.int64, device=self.device)
            grown[:self.last_sampled.numel()] = self.last_sampled
            self.last_sampled = grown
        return _Step(self, sched, reqs, states).run(defer_sampling)


class _Step:
    """One execute(): host arrays, buffers, forwards and sampling of one SchedulerOutput."""

    def __init__(self, runner: ModelRunner, sched: SchedulerOutput,
                 reqs: list[ScheduledRequest], states):
        self.r, self.reqs, self.states = runner, reqs, states
        bs = runner.block_size
        B = self.B = len(reqs)
        self.K = sched.num_steps
        self.q_lens = np.fromiter((x.num_tokens for x in reqs), np.int64, B)
        self.starts = np.fromiter((x.start_pos for x in reqs), np.int64, B)
        self.steps = np.fromiter((x.num_steps for x in reqs), np.int64, B)
        self.rows = np.fromiter((s.row for s in states), np.int64, B)
        T = self.T = int(self.q_lens.sum())
        self.qsl = np.zeros(B + 1, np.int64)
        np.cumsum(self.q_lens, out=self.qsl[1:])
        self.tok_req = np.repeat(np.arange(B), self.q_lens)                  # (T,)
        self.positions = self.starts[self.tok_req] + np.arange(T) - self.qsl[self.tok_req]
        self.ids = np.fromiter(itertools.chain.from_iterable(x.token_ids for x in reqs),
                               np.int64, T)
        self.seq_lens = self.starts + self.q_lens                            # (B,)
        self.max_len = int((self.seq_lens + self.steps - 1).max())
        self.W = -(-self.max_len // bs)
        self.tables = runner.states.tables[self.rows, :self.W]              # (B, W) copy
        self.slots = (self.tables[self.tok_req, self.positions // bs].astype(np.int64) * bs
                      + self.positions % bs)                                 # (T,)
        self.sampling = [i for i, x in enumerate(reqs) if x.sample]
        self.sample_rows = self.qsl[1:][self.sampling] - 1                   # (S,)

    # ---- the forwards ----------------------------------------------------------------------
    def run(self, defer_sampling: bool) -> PendingOutput:
        r, reqs, g = self.r, self.reqs, self.r.graphs
        plp = [i for i, x in enumerate(reqs) if x.prompt_logprobs_from is not None]
        S = len(self.sampling)
        hidden = None
        if g is not None and not plp and self.T == self.B and self.B <= g.max_decode:
            b = g.decode_bucket(self.B)
            self._load_decode(b)
            logits = g.decode(b, g.context_class(int(self.seq_lens.max())))[:self.B]
            if S < self.B:
                logits = logits[to_device(self.sampling, torch.int64, r.device)]
        elif g is not None and not plp and (bucket := g.mixed_bucket(self.T, self.B)):
            t, b = bucket
            self._load_mixed(t, b, g.block_m[t], g.work_size[(t, b)])
            logits = g.mixed(t, b)[:S]
        else:
            self._load_eager()
            buf = r.buf
            meta = StepMetadata(buf.slot_mapping[:self.T], buf.query_start_loc[:self.B + 1],
                                buf.seq_lens[:self.B], buf.block_tables[:self.B, :self.W],
                                int(self.q_lens.max()), int(self.seq_lens.max()))
            # eager steps: torch ops for the elementwise tails (see T6.forward's `kernels`)
            hidden = r.model(buf.input_ids[:self.T], buf.positions[:self.T],
                             PagedAttention(r.cache, meta, r.ops, r.workspace),
                             kernels=False)                                  # (T, d)
            logits = r.model.compute_logits(hidden[buf.sample_rows[:S]]) if S else None
        pending = PendingOutput()
        for i in plp:
            pending.prompt_logprobs.append(self._prompt_logprobs(i, hidden))
        if defer_sampling and S:
            # held until the mask is ready: a graph's logits stay valid, nothing else is
            # enqueued before sample() (the core's next launch comes after it)
            pending.deferred = (self, logits)
        else:
            self.finish(pending, logits if S else None, None)
        return pending

    def finish(self, pending: PendingOutput, logits: torch.Tensor | None, masks) -> None:
        """Sampling (under `masks`, if any) and the event the host's read waits for."""
        if logits is not None:
            self._sample(logits, pending, masks)
        if self.r.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()

    def _sample(self, logits: torch.Tensor, pending: PendingOutput, masks) -> None:
        r, reqs = self.r, self.reqs
        rows = [SamplingRow(params=r.states.states[reqs[i].request_id].params,
                            prompt_token_ids=r.states.states[reqs[i].request_id].prompt_token_ids,
                            output_token_ids=reqs[i].output_token_ids or (),
                            generator=r.states.states[reqs[i].request_id].generator)
                for i in self.sampling]
        meta = r.sampler.metadata(rows, r.device)
        if masks is not None:
            # before sampling and logprobs: a constrained row's logprobs are those of the
            # masked distribution (as vLLM reports them)
            logits = apply_token_bitmask(logits, masks.first())
        samples = [r.sampler.sample_ids(logits, meta)]                       # [(S,)]
        want = [j for j, row in enumerate(rows) if row.params.logprobs is not None]
        if want:                                   # single steps only (no round has them)
            top = max(rows[j].params.logprobs for j in want)
            idx = to_device(want, torch.int64, r.device)
            chosen = samples[0][idx].clamp_min(0)                           # NONFINITE -> 0
            pending.logprob_rows = LogprobsOnDevice(logits[idx], chosen, top,
                                                    vocab_size=r.sampler.vocab_size)
            pending.logprob_rows.to_host()
            pending.logprobs = [(reqs[self.sampling[j]].request_id, j, rows[j].params.logprobs)
                                for j in want]
        if self.K > 1:
            samples += self._round(meta, samples[0], masks)
        toks = torch.stack(samples) if len(samples) > 1 else samples[0][None]  # (K, S)
        last_t = self.steps[self.sampling] - 1
        rows_dev = to_device(self.rows[self.sampling], torch.int64, r.device)
        # a NONFINITE row's next input is a valid id (its request is ended when the host
        # reads this step; a step already planned may still run it)
        if (last_t == 0).all():
            r.last_sampled[rows_dev] = toks[0].clamp_min(0)
        else:
            r.last_sampled[rows_dev] = toks[to_device(last_t, torch.int64, r.device),
                                            torch.arange(len(rows), device=r.device)
                                            ].clamp_min(0)
        host = torch.empty(toks.shape, dtype=torch.int64, pin_memory=toks.is_cuda)
        host.copy_(toks, non_blocking=True)
        pending.samples = host
        pending.request_ids = [reqs[i].request_id for i in self.sampling]
        pending.num_steps = [int(k) for k in self.steps[self.sampling]]

    def _round(self, meta, ids: torch.Tensor, masks) -> list[torch.Tensor]:
        """Steps 1..K-1 of a round: every request decodes from its previous sample. With
        `masks`, step s's samples are copied to the host before step s+1's forward is
        enqueued; then the host waits for them and fills step s+1's masks while that
        forward runs."""
        r, g, B, K, bs = self.r, self.r.graphs, self.B, self.K, self.r.block_size
        buf = r.buf
        b = g.decode_bucket(B) if g is not None and B <= g.max_decode else None
        width = b or B
        base = self.seq_lens - 1                                             # (B,) step 0's last
        t = np.arange(1, K)[:, None]                                         # (K-1, 1)
        live = t < self.steps[None, :]                                       # (K-1, B)
        pos = np.zeros((K - 1, width), np.int64)
        pos[:, :B] = base[None, :] + np.minimum(t, self.steps[None, :] - 1)
        slots = np.full((K - 1, width), -1, np.int64)
        blk = self.tables[np.arange(B)[None, :], pos[:, :B] // bs].astype(np.int64)
        slots[:, :B] = np.where(live, blk * bs + pos[:, :B] % bs, -1)
        lens = np.ones((K - 1, width), np.int32)
        lens[:, :B] = pos[:, :B] + 1
        dev = torch.from_numpy(np.stack([pos, slots, lens.astype(np.int64)]))  # (3, K-1, w)
        dev = dev.pin_memory().to(r.device, non_blocking=True) if r.device.type == "cuda" \
            else dev
        ctx = g.context_class(int(lens.max())) if b is not None else None
        out = []
        for s in range(K - 1):
            if masks is not None:
                prev, ready = _to_host(ids)
            buf.input_ids[:B].copy_(ids.clamp_min(0))         # NONFINITE: see _sample
            buf.positions[:width].copy_(dev[0, s])
            buf.slot_mapping[:width].copy_(dev[1, s])
            buf.seq_lens[:width].copy_(dev[2, s])
            if b is not None:
                logits = g.decode(b, ctx)[:B]
            else:
                step = StepMetadata(buf.slot_mapping[:B], buf.arange[:B + 1], buf.seq_lens[:B],
                                    buf.block_tables[:B, :self.W], 1, int(lens[s].max()))
                hidden = r.model(buf.input_ids[:B], buf.positions[:B],
                                 PagedAttention(r.cache, step, r.ops, r.workspace), kernels=False)
                logits = r.model.compute_logits(hidden)                     # (B, V)
            if masks is not None:                 # every row of a round samples: S == B
                if ready is not None:
                    ready.synchronize()
                logits = apply_token_bitmask(logits, masks.next(prev.numpy(), live[s]))
            ids = r.sampler.sample_ids(logits, meta, live=live[s].tolist())
            out.append(ids)
        return out

    def _prompt_logprobs(self, i: int, hidden: torch.Tensor) -> tuple[str, LogprobsOnDevice]:
        x, r = self.reqs[i], self.r
        st = r.states.states[x.request_id]
        s, n, prompt = x.start_pos, x.num_tokens, st.prompt_token_ids
        ps = range(x.prompt_logprobs_from, min(s + n, len(prompt) - 1) + 1)
        rows = [int(self.qsl[i]) + p - 1 - s for p in ps]
        logits = r.model.compute_logits(hidden[to_device(rows, torch.int64, r.device)])
        lp = LogprobsOnDevice(logits, prompt[ps.start:ps.stop], st.params.prompt_logprobs,
                              vocab_size=r.sampler.vocab_size)
        lp.to_host()
        return x.request_id, lp

    # ---- inputs into the buffers -----------------------------------------------------------
    def _fix_placeholders(self) -> None:
        """Input ids the host does not know: each request's last sample, on the device."""
        ph = np.flatnonzero(self.ids < 0)
        if len(ph):
            r = self.r
            rows = to_device(self.rows[self.tok_req[ph]], torch.int64, r.device)
            r.buf.input_ids[to_device(ph, torch.int64, r.device)] = r.last_sampled[rows]

    def _tables(self, n: int) -> None:
        _h2d(self.r.buf.block_tables[:self.B, :self.W], self.tables)

    def _load_decode(self, b: int) -> None:
        """Decode bucket b: rows B..b-1 are padding (no slot, length 1)."""
        B, buf = self.B, self.r.buf
        pad = b - B
        _h2d(buf.input_ids[:B], np.where(self.ids < 0, 0, self.ids))
        _h2d(buf.positions[:b], np.concatenate([self.positions, np.zeros(pad, np.int64)]))
        _h2d(buf.slot_mapping[:b], np.concatenate([self.slots, np.full(pad, -1, np.int64)]))
        _h2d(buf.seq_lens[:b], np.concatenate([self.seq_lens, np.ones(pad, np.int64)])
             .astype(np.int32))
        self._tables(b)
        self._fix_placeholders()

    def _load_mixed(self, t: int, b: int, block_m: int, n_work: int) -> None:
        """Mixed bucket (t, b): tokens T..t-1 and sequences B..b-1 are padding."""
        T, B, S, buf = self.T, self.B, len(self.sampling), self.r.buf
        _h2d(buf.input_ids[:T], np.where(self.ids < 0, 0, self.ids))
        _h2d(buf.positions[:t], np.concatenate([self.positions, np.zeros(t - T, np.int64)]))
        _h2d(buf.slot_mapping[:t], np.concatenate([self.slots, np.full(t - T, -1, np.int64)]))
        _h2d(buf.query_start_loc[:b + 1],
             np.concatenate([self.qsl, np.full(b - B, T, np.int64)]).astype(np.int32))
        _h2d(buf.seq_lens[:b], np.concatenate([self.seq_lens, np.ones(b - B, np.int64)])
             .astype(np.int32))
        _h2d(buf.sample_rows[:b], np.concatenate([self.sample_rows, np.zeros(b - S, np.int64)]))
        _h2d(buf.work[:2 * n_work], np.asarray(
            work_list(self.q_lens.tolist(), block_m, n_work), np.int32))
        self._tables(b)
        self._fix_placeholders()

    def _load_eager(self) -> None:
        T, B, buf = self.T, self.B, self.r.buf
        _h2d(buf.input_ids[:T], np.where(self.ids < 0, 0, self.ids))
        _h2d(buf.positions[:T], self.positions)
        _h2d(buf.slot_mapping[:T], self.slots)
        _h2d(buf.query_start_loc[:B + 1], self.qsl.astype(np.int32))
        _h2d(buf.seq_lens[:B], self.seq_lens.astype(np.int32))
        _h2d(buf.sample_rows[:len(self.sampling)], self.sample_rows)
        self._tables(B)
        self._fix_placeholders()
