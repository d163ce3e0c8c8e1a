"""Turns the core's token-level outputs into what clients see, and times them.

A client request with n > 1 becomes n core sequences "<id>#<i>" (the siblings fork the first
one's prompt blocks instead of computing the prompt again: fork_of); the processor groups
their outputs back into one RequestOutput, with each sequence's text (incremental
detokenizer), stop strings (frontend/sequence.py), logprobs and finish reason. A stop string
finishes a sequence here; `process` returns its id for the caller to abort in the core.

Timing, for the metrics (IterationStats, all time.monotonic(), the frontend's clock): a
token's time is when its output is processed here, i.e. when a client could have it.
Arrival is taken when the request is added; time to first token: arrival -> the first
token of any of the n sequences; inter-token latency: between two outputs of one sequence,
spread evenly over the tokens of the later one (a multi-step round delivers several).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from tpaserve.engine.contracts import Logprob
from tpaserve.engine.messages import EngineCoreOutput, EngineCoreRequest
from tpaserve.exceptions import RequestRejected
from tpaserve.frontend.outputs import CompletionOutput, RequestOutput
from tpaserve.frontend.sequence import SequenceState, StopStringMatcher
from tpaserve.sampling_params import SamplingParams


@dataclass
class FinishedRequestStats:
    """A client request that ended (all n sequences), for the per-request metrics."""
    finish_reasons: list[str]         # one per sequence: stop, length, abort, error
    num_prompt_tokens: int
    num_generation_tokens: int        # all n sequences together
    e2e_latency: float                # arrival -> its last output (or the abort)


@dataclass
class IterationStats:
    """What processing outputs measured since the stats were last taken."""
    prompt_tokens: int = 0            # prompts of requests that returned their first output
    generation_tokens: int = 0
    ttfts: list[float] = field(default_factory=list)
    itls: list[tuple[float, int]] = field(default_factory=list)   # (gap, tokens it spans)
    finished: list[FinishedRequestStats] = field(default_factory=list)


@dataclass
class RequestState:
    """A client request: its n sequences and what they share."""
    request_id: str
    prompt_token_ids: list[int]
    seq_ids: list[str]
    arrival_time: float
    seqs: dict[str, SequenceState] = field(default_factory=dict)
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_logprobs_sent: bool = False
    num_cached_tokens: int = 0
    first_token_time: float | None = None
    last_token_time: dict[str, float] = field(default_factory=dict)   # per sequence
    emitted: bool = False             # an output was returned (its prompt is counted)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    aborts: list[str]                 # sequence ids to abort in the core (stop strings)


class OutputProcessor:
    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.seq_to_request: dict[str, RequestState] = {}
        self.stats = IterationStats()

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def take_stats(self) -> IterationStats:
        stats, self.stats = self.stats, IterationStats()
        return stats

    # ---- requests ------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, priority: int = 0,
                    client_index: int = 0) -> list[EngineCoreRequest]:
        """Track a client request; returns its core sequences (to send as one AddRequests)."""
        if params.stop and self.tokenizer is None:
            raise RequestRejected("stop strings need a tokenizer; this engine has none", "stop")
        arrival = time.monotonic() if arrival_time is None else arrival_time
        state = RequestState(request_id, list(prompt_token_ids), [], arrival)
        reqs = []
        for i in range(params.n):
            p = params
            if i > 0:   # siblings: their own seed stream, prompt logprobs come once
                p = dataclasses.replace(params, prompt_logprobs=None, seed=None if params.seed
                                        is None else (params.seed + i) % 2**63)
            sid = f"{request_id}#{i}"
            reqs.append(EngineCoreRequest(sid, state.prompt_token_ids, p, arrival, priority,
                                          f"{request_id}#0" if i else None, client_index))
            state.seq_ids.append(sid)
            state.seqs[sid] = SequenceState(i, p, self._detokenizer(prompt_token_ids, p),
                                            StopStringMatcher(p.stop, p.include_stop_str_in_output))
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self.requests[request_id] = state
        for sid in state.seq_ids:
            self.seq_to_request[sid] = state
        return reqs

    def _detokenizer(self, prompt_ids: list[int], params: SamplingParams):
        if self.tokenizer is None:
            return None
        from tpaserve.models.detokenizer import IncrementalDetokenizer
        return IncrementalDetokenizer(self.tokenizer, prompt_ids, params.skip_special_tokens)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request (the client went away); returns its sequences to abort in the
        core. Counted as finished with reason abort for the sequences still running."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return []
        for sid in state.seq_ids:
            self.seq_to_request.pop(sid, None)
        outs = [state.seqs[sid].out for sid in state.seq_ids]
        self.stats.finished.append(FinishedRequestStats(
            [o.finish_reason or "abort" for o in outs], len(state.prompt_token_ids),
            sum(len(o.token_ids) for o in outs), time.monotonic() - state.arrival_time))
        return [sid for sid in state.seq_ids if not state.seqs[sid].finished]

    def fail_request(self, request_id: str) -> None:
        """Forget a request the core refused (nothing ran; not counted)."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            for sid in state.seq_ids:
                self.seq_to_request.pop(sid, None)

    # ---- outputs -------------------------------------------------------------------------
    def process(self, outs: list[EngineCoreOutput]) -> ProcessedOutputs:
        now = time.monotonic()
        st = self.stats
        touched: dict[str, RequestState] = {}
        aborts: list[str] = []
        errors: dict[str, EngineCoreOutput] = {}
        for co in outs:
            state = self.seq_to_request.get(co.request_id)
            if state is None:
                continue                      # aborted, or finished by a stop string here
            seq = state.seqs[co.request_id]
            if seq.finished:
                continue
            if state.request_id not in touched:
                touched[state.request_id] = state
                for s in state.seqs.values():
                    s.clear_delta()
            if co.error is not None:
                errors.setdefault(state.request_id, co)
            if co.request_id == state.seq_ids[0]:
                state.num_cached_tokens = co.num_cached_tokens
                if co.prompt_logprobs and state.prompt_logprobs is not None:
                    state.prompt_logprobs.extend(co.prompt_logprobs)
            hit = seq.advance(co.new_token_ids, co.new_logprobs, co.finish_reason,
                              co.stop_reason)
            if hit is not None and co.finish_reason is None:
                aborts.append(co.request_id)
            n_new = len(seq.out.token_ids_delta)       # after a stop string cut a round short
            if n_new:
                st.generation_tokens += n_new
                if state.first_token_time is None:
                    state.first_token_time = now
                    st.ttfts.append(now - state.arrival_time)
                last = state.last_token_time.get(co.request_id)
                if last is not None:
                    st.itls.append(((now - last) / n_new, n_new))
                state.last_token_time[co.request_id] = now
        results = []
        for rid, state in touched.items():
            err = errors.get(rid)
            if err is not None:
                # the core ended every sequence of it (a refused group, or a failed step)
                for sid in state.seq_ids:
                    seq = state.seqs[sid]
                    if not seq.finished:
                        seq.out.finish_reason = "error"
                        aborts.append(sid)
            results.append(self._output(state, now, err))
        return ProcessedOutputs(results, aborts)

    def _output(self, state: RequestState, now: float,
                err: EngineCoreOutput | None) -> RequestOutput:
        outs = [state.seqs[sid].out for sid in state.seq_ids]
        finished = all(o.finished for o in outs)
        refused = err is not None and err.error.kind != "step_failed"
        if not state.emitted and not refused:
            state.emitted = True
            self.stats.prompt_tokens += len(state.prompt_token_ids)
        if finished:
            del self.requests[state.request_id]
            for sid in state.seq_ids:
                self.seq_to_request.pop(sid, None)
            if not refused:
                self.stats.finished.append(FinishedRequestStats(
                    [o.finish_reason for o in outs], len(state.prompt_token_ids),
                    sum(len(o.token_ids) for o in outs), now - state.arrival_time))
        # prompt logprobs go out once complete (a stream echoes them before the first token)
        # and again on the final output (for whoever only reads that one)
        plp = state.prompt_logprobs
        complete = plp is not None and len(plp) >= len(state.prompt_token_ids)
        send_plp = complete and (finished or not state.prompt_logprobs_sent)
        state.prompt_logprobs_sent |= send_plp
        return RequestOutput(
            request_id=state.request_id, prompt_token_ids=state.prompt_token_ids,
            outputs=[_snapshot(o, finished) for o in outs], finished=finished,
            prompt_logprobs=list(plp) if send_plp else None,
            num_cached_tokens=state.num_cached_tokens,
            error=err.error if err is not None else None)


def _snapshot(o: CompletionOutput, full: bool) -> CompletionOutput:
    """A copy the consumer may keep while the engine moves on. Cumulative lists are
    copied on the final output only (copying them every step would cost O(n^2)); the
    deltas are fresh lists every output (SequenceState.clear_delta), so they are shared."""
    return CompletionOutput(
        o.index, o.text, list(o.token_ids) if full else [],
        (list(o.logprobs) if full else []) if o.logprobs is not None else None,
        o.cumulative_logprob, o.finish_reason, o.stop_reason, o.text_delta,
        o.token_ids_delta, o.logprobs_delta)
