"""The engine core's side of structured outputs: one llguidance matcher per constrained
sequence, compiled off the step loop, and the token bitmask of each step's constrained rows.

    admission      Grammars.submit(req)          compile in a thread pool; req.grammar is a
                                                 Grammar whose `ready` the scheduler reads
                                                 (a request is not scheduled before it)
    a step         Grammars.constrained(sched)   whether a sampling row of it is constrained:
                                                 then its forward is launched with sampling
                                                 held back (ModelRunner.execute)
    after the step before it is updated
                   Grammars.accept(outs)         each matcher consumes its sequence's new tokens
                   Grammars.bitmask(sched)       (S, W) int32, W = ceil(vocab / 32): bit t of
                                                 row j set iff sampling row j may pick token t
                                                 (-1 rows: unconstrained), filled while the
                                                 forward runs; PendingOutput.sample(mask)

Invariant: when a step's mask is filled, each of its constrained requests' matchers has
consumed exactly the request's output tokens before that step's sample. It holds because a
step's mask is filled only after the step before it was updated and accepted (the core:
launch N+1's forward, finish N, then fill N+1's mask and sample; vLLM's order), and a
constrained request never joins a multi-step round (its next mask needs its last token on
the host). So nothing ever rolls back: a stop string aborts the request (the matcher goes
with it), a preempted request keeps its tokens and its matcher (recomputing its prompt and
outputs samples nothing new), and each of n > 1 sequences is a request with its own matcher.
A row whose request ended at the step before (its token in flight was EOS, or it was
aborted) is not constrained: what it samples is dropped by the update.

A matcher that is stopped (its grammar is complete) allows only EOS, so the sequence ends;
llguidance's masks include EOS wherever the grammar may end. A grammar that failed (to
compile, or a token it rejected) allows only EOS too, and `broken` names it: the core ends
that request with an error, never as a normal stop.
"""
from __future__ import annotations

import concurrent.futures as cf
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

    @property
    def ready(self) -> bool:
        if self.matcher is None and not self.failed and self.future.done():
            try:
                self.matcher = self.future.result()
            except Exception:                      # the sequence ends at EOS (see bitmask)
                logger.exception("structured output grammar failed to compile")
                self.failed = True
        return self.matcher is not None or self.failed

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

    def bitmask(self, sched: SchedulerOutput, requests: dict[str, Request]) -> np.ndarray:
        """The allowed tokens of each sampling row of `sched` (in order): (S, W)."""
        rows = [_live(s, requests) for s in sched.requests if s.sample]
        mask = np.full((len(rows), self.width), -1, np.int32)               # (S, W)
        live = []
        for j, r in enumerate(rows):
            if r is not None and r.grammar is not None:
                assert r.grammar.ready, f"{r.request_id} scheduled before its grammar compiled"
                if r.grammar.done:
                    mask[j] = 0
                    if self.eos is not None:
                        mask.view(np.uint32)[j, self.eos // 32] = 1 << (self.eos % 32)
                else:
                    live.append((r.grammar.matcher, j))
        if len(live) == 1:
            llnp.fill_next_token_bitmask(live[0][0], mask, live[0][1])
        elif live:                        # llguidance's threads, without the GIL
            if self._executor is None:
                self._executor = llguidance.LLExecutor(MASK_THREADS)
            llnp.fill_next_token_bitmask_par(self._executor, live, mask)
        return mask

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
        """Feed each live constrained sequence's new tokens to its matcher."""
        for o in outs:
            req = requests.get(o.request_id)
            if req is None or req.grammar is None or not o.new_token_ids:
                continue                   # finished (its matcher went with it), or free
            m = req.grammar.matcher
            if not req.grammar.done and not m.consume_tokens(o.new_token_ids):
                logger.warning("request %s: token(s) %s rejected by its grammar: %s",
                               o.request_id, o.new_token_ids, m.get_error())


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

    def encode(text: str | bytes) -> list[int]:
        """Token ids whose bytes are exactly `text`'s (llguidance tokenizes the literals a
        grammar forces with it): the tokenizer's own encoding when it is exact, else
        greedy longest match (sentencepiece's dummy prefix would add a space)."""
        data = text.encode() if isinstance(text, str) else text
        ids = tok.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)
        if b"".join(raw[i] for i in ids if i < len(raw)) == data:
            return ids
        out, i = [], 0
        while i < len(data):
            n = next(n for n in range(min(longest, len(data) - i), 0, -1)
                     if data[i:i + n] in by_bytes or n == 1)
            if data[i:i + n] not in by_bytes:
                raise ValueError(f"byte {data[i:i + 1]!r} has no token")
            out.append(by_bytes[data[i:i + n]])
            i += n
        return out

    class _Wrapped:                       # what llguidance.TokenizerWrapper reads
        def __init__(self) -> None:
            self.eos_token_id, self.bos_token_id = eos, tok.bos_token_id
            self.special_token_ids = sorted(special)
            self.tokens = [b"\xff" + b if i in special else b for i, b in enumerate(raw)]
            self.tokens += [b""] * (vocab_size - len(self.tokens))

        def __call__(self, text: str | bytes) -> list[int]:
            return encode(text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped()), n_vocab=vocab_size,
                                  eos_token=eos)
