"""The engine core's side of structured outputs: one llguidance matcher per constrained
sequence, compiled off the step loop, and the token bitmasks of each step's constrained rows.

    admission      Grammars.submit(req)          compile in a thread pool; req.grammar is a
                                                 Grammar whose `ready` the scheduler reads
                                                 (a request is not scheduled before it)
    a step         Grammars.constrained(sched)   whether a sampling row of it is constrained:
                                                 then its forward is launched with sampling
                                                 held back (ModelRunner.execute)
    after the step before it is updated
                   Grammars.accept(requests)     each matcher consumes its sequence's output
                                                 tokens it has not seen
                   Grammars.masks(sched)         StepMasks: the step's (S, W) int32 masks,
                                                 W = ceil(vocab / 32), bit t of row j set iff
                                                 sampling row j may pick token t (-1 rows:
                                                 unconstrained); PendingOutput.sample(masks)

A multi-step round (engine/scheduler.py) may hold constrained rows: the runner asks
StepMasks.first() for step 0's masks and StepMasks.next() for each later step's, handing it
the samples of the step before (on the host: the runner waits for them while the next
forward runs), which the matchers consume there.

Invariant: when a step's masks are filled, each of its constrained requests' matchers has
consumed exactly the request's output tokens before that step's sample: the ones the
scheduler has (Grammar.num_consumed counts them; `accept` feeds the rest after an update)
plus, inside a round, the round's earlier samples. It holds because a step's masks are
filled only after the step before it was updated and accepted (the core: launch N+1's
forward, finish N, then fill N+1's masks and sample; vLLM's order), and a round's update
keeps every sample it consumed unless it ends the request. So nothing ever rolls back: a
stop string aborts the request (the matcher goes with it), a preempted request keeps its
tokens and its matcher (recomputing its prompt and outputs samples nothing new), and each
of n > 1 sequences is a request with its own matcher. A row whose request ended since it
was scheduled (its token in flight was EOS, or it was aborted) is not constrained: what it
samples is dropped by the update.

A matcher that is stopped (its grammar is complete) allows only EOS, so the sequence ends;
llguidance's masks include EOS wherever the grammar may end. A grammar that failed (to
compile, or a token it rejected) allows only EOS too, and `broken` names it: the core ends
that request with an error, never as a normal stop.
"""
from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
import threading

import llguidance
import llguidance.numpy as llnp
import numpy as np

from tpaserve.engine.contracts import SchedulerOutput
from tpaserve.engine.messages import EngineCoreOutput
from tpaserve.engine.request import Request

logger = logging.getLogger("tpaserve.engine")

COMPILE_THREADS = 2
# threads filling one step's masks (llguidance's executor); a row costs tens of µs at an 8K
# vocabulary, more at 50K+, so a batch of 64 constrained rows is worth spreading
MASK_THREADS = min(8, os.cpu_count() or 1)
# How long an idle loop waits for a compile before it looks at its sockets again.
COMPILE_WAIT_S = 0.01


class Grammar:
    """One sequence's constraint: a future LLMatcher, then the matcher."""

    def __init__(self, future: cf.Future):
        self.future = future
        self.matcher: llguidance.LLMatcher | None = None
        self.failed = False
        self.num_consumed = 0          # output tokens the matcher has consumed

    @property
    def ready(self) -> bool:
        if self.matcher is None and not self.failed and self.future.done():
            try:
                self.matcher = self.future.result()
            except Exception:                      # the sequence ends at EOS (see bitmask)
                logger.exception("structured output grammar failed to compile")
                self.failed = True
        return self.matcher is not None or self.failed

    def consume(self, tokens: list[int], request_id: str) -> None:
        """The matcher takes `tokens`, the sequence's next outputs (none after it is done:
        a complete grammar's EOS, or tokens sampled under an EOS-only mask, change nothing)."""
        self.num_consumed += len(tokens)
        if tokens and not self.done and not self.matcher.consume_tokens(tokens):
            logger.warning("request %s: token(s) %s rejected by its grammar: %s",
                           request_id, tokens, self.matcher.get_error())

    @property
    def done(self) -> bool:
        """No token but EOS may follow: the grammar is complete, or broken."""
        m = self.matcher
        return m is None or m.is_error() or m.is_stopped()


class Grammars:
    def __init__(self, tokenizer_path: str | None, vocab_size: int, eos_token_id: int | None):
        self.tokenizer_path, self.vocab_size, self.eos = tokenizer_path, vocab_size, eos_token_id
        self.width = (vocab_size + 31) // 32
        self._pool: cf.ThreadPoolExecutor | None = None
        self._lltok: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._pending: set[cf.Future] = set()
        self._executor: llguidance.LLExecutor | None = None

    def submit(self, req: Request) -> None:
        """Start compiling `req`'s grammar (params.structured_outputs already validated)."""
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(COMPILE_THREADS, "tpaserve-grammar")
        fut = self._pool.submit(self._compile, req.params.structured_outputs)
        self._pending = {f for f in self._pending if not f.done()}
        self._pending.add(fut)
        req.grammar = Grammar(fut)

    def wait(self, timeout: float = COMPILE_WAIT_S) -> None:
        """Block until a compile finishes (or `timeout`): for a loop with nothing else to
        run, instead of spinning while the compile threads work."""
        self._pending = {f for f in self._pending if not f.done()}
        if self._pending:
            cf.wait(self._pending, timeout, return_when=cf.FIRST_COMPLETED)

    def _compile(self, spec) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self._tokenizer(), spec.grammar_text(), log_level=0)
        if m.is_error():          # validated at the edge; a tokenizer-specific failure
            logger.warning("structured output grammar failed to compile: %s", m.get_error())
        return m

    def _tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:                  # built once, by the first compile (~0.1-1 s)
            if self._lltok is None:
                self._lltok = build_lltokenizer(self.tokenizer_path, self.vocab_size,
                                                self.eos)
                self.eos = self._lltok.eos_token      # the tokenizer's, if the config had none
            return self._lltok

    @staticmethod
    def constrained(sched: SchedulerOutput, requests: dict[str, Request]) -> bool:
        """Whether a row of `sched` samples under a grammar (just scheduled: all live)."""
        return any(s.sample and requests[s.request_id].grammar is not None
                   for s in sched.requests)

    def masks(self, sched: SchedulerOutput, requests: dict[str, Request]) -> StepMasks:
        """The masks of `sched`'s sampling rows (in order), filled when the runner asks."""
        if self._executor is None:
            self._executor = llguidance.LLExecutor(MASK_THREADS)
        rows = [_live(s, requests) for s in sched.requests if s.sample]
        return StepMasks([r.grammar if r is not None else None for r in rows], self.width,
                         self.eos, self._executor)

    @staticmethod
    def of(sched: SchedulerOutput, requests: dict[str, Request]) -> dict[str, Grammar]:
        """The grammars of `sched`'s constrained requests (taken before the update, which
        forgets the requests it finishes)."""
        return {s.request_id: r.grammar for s in sched.requests
                if (r := _live(s, requests)) is not None and r.grammar is not None}

    @staticmethod
    def broken(grammars: dict[str, Grammar]) -> dict[str, str]:
        """request id -> why, for grammars that failed to compile or rejected a token: their
        requests end with an error, never as if the output were complete."""
        out = {}
        for rid, g in grammars.items():
            if g.failed:
                out[rid] = "the structured-output grammar failed to compile on this engine"
            elif g.matcher is not None and g.matcher.is_error():
                out[rid] = f"the structured-output grammar failed: {g.matcher.get_error()}"
        return out

    def accept(self, outs: list[EngineCoreOutput], requests: dict[str, Request]) -> None:
        """Feed each live constrained sequence's output tokens that its matcher has not
        consumed (a round consumed all but its last) to the matcher."""
        for o in outs:
            req = requests.get(o.request_id)
            if req is None or req.grammar is None or not o.new_token_ids:
                continue                   # finished (its matcher went with it), or free
            g = req.grammar
            new = req.output_token_ids[g.num_consumed:]
            g.consume(new, o.request_id)


class StepMasks:
    """One launched step's (or round's) masks, for ModelRunner: first() for step 0, then
    next(ids, live) for each later step of a round. Rows are the step's sampling rows."""

    def __init__(self, grammars: list[Grammar | None], width: int, eos: int | None,
                 executor: llguidance.LLExecutor):
        self.grammars, self.width, self.eos, self._executor = grammars, width, eos, executor
        self.mask = np.full((len(grammars), width), -1, np.int32)            # (S, W)

    def first(self) -> np.ndarray:
        return self._fill(range(len(self.grammars)))

    def next(self, ids: np.ndarray, live: np.ndarray) -> np.ndarray:
        """Rows with live[j] sample again: their matchers consume ids[j] (the step before's
        sample), and their masks are refilled; the others' rows are left as they were
        (their samples are not drawn). ids (S,) int64, live (S,) bool, host."""
        rows = np.flatnonzero(live).tolist()
        for j in rows:
            g = self.grammars[j]
            if g is not None and ids[j] >= 0:            # NONFINITE: the row ends with an error
                g.consume([int(ids[j])], "")
        return self._fill(rows)

    def _fill(self, rows) -> np.ndarray:
        mask, live = self.mask, []
        for j in rows:
            g = self.grammars[j]
            if g is None:
                mask[j] = -1
                continue
            assert g.ready, "a request was scheduled before its grammar compiled"
            if g.done:
                mask[j] = 0
                if self.eos is not None:
                    mask.view(np.uint32)[j, self.eos // 32] = 1 << (self.eos % 32)
            else:
                live.append((g.matcher, j))
        if len(live) == 1:
            llnp.fill_next_token_bitmask(live[0][0], mask, live[0][1])
        elif live:                        # llguidance's threads, without the GIL
            llnp.fill_next_token_bitmask_par(self._executor, live, mask)
        return mask


def _live(s, requests: dict[str, Request]) -> Request | None:
    """The live request a scheduled row belongs to, or None: it ended since (a step in
    flight), possibly with its id admitted again."""
    r = requests.get(s.request_id)
    return r if r is not None and r.serial == s.serial else None


def build_lltokenizer(path: str | None, vocab_size: int,
                      eos_token_id: int | None) -> llguidance.LLTokenizer:
    """An llguidance tokenizer from ours (any format: the raw bytes of every token id).
    Special tokens are marked with a 0xFF prefix (llguidance's convention), so no grammar
    matches their text; ids past the tokenizer's vocabulary (a padded embedding) are empty."""
    from tpaserve.models.tokenizer import load_tokenizer
    if path is None:
        raise RuntimeError("structured outputs need the tokenizer's path in the engine config")
    tok = load_tokenizer(path)
    special = tok.all_special_ids
    eos = eos_token_id if eos_token_id is not None else tok.eos_token_id
    if eos is None:
        raise RuntimeError("structured outputs need an EOS token (the tokenizer has none)")

    raw = [tok.token_bytes(i) for i in range(min(tok.vocab_size, vocab_size))]
    by_bytes: dict[bytes, int] = {}
    for i, b in enumerate(raw):
        if i not in special and b:
            by_bytes.setdefault(b, i)
    longest = max(map(len, by_bytes))

    @functools.lru_cache(maxsize=1 << 16)
    def encode(data: bytes) -> tuple[int, ...]:
        """Token ids whose bytes are exactly `data` (llguidance tokenizes the literals a
        grammar forces with it, while it fills masks: the same few strings again and
        again, hence the cache): the tokenizer's own encoding when it is exact, else
        greedy longest match (sentencepiece's dummy prefix would add a space)."""
        ids = tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        if b"".join(raw[i] for i in ids if i < len(raw)) == data:
            return tuple(ids)
        out, i = [], 0
        while i < len(data):
            n = next(n for n in range(min(longest, len(data) - i), 0, -1)
                     if data[i:i + n] in by_bytes or n == 1)
            if data[i:i + n] not in by_bytes:
                raise ValueError(f"byte {data[i:i + 1]!r} has no token")
            out.append(by_bytes[data[i:i + n]])
            i += n
        return tuple(out)

    class _Wrapped:                       # what llguidance.TokenizerWrapper reads
        def __init__(self) -> None:
            self.eos_token_id, self.bos_token_id = eos, tok.bos_token_id
            self.special_token_ids = sorted(special)
            self.tokens = [b"\xff" + b if i in special else b for i, b in enumerate(raw)]
            self.tokens += [b""] * (vocab_size - len(self.tokens))

        def __call__(self, text: str | bytes) -> list[int]:
            return list(encode(text.encode() if isinstance(text, str) else text))

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), n_vocab=vocab_size,
                                  eos_token=eos)
