"""What a structured-output step costs the host: llguidance filling the token masks of S
constrained rows (core/structured.py's calls, its thread count), and consuming one token
each, at t6-demo's 8192-token vocabulary and at a 50K one.

    python -m bench.mask_cost --rows 1,16,64 --steps 200 --json out.json

The 50K vocabulary is t6-demo's 8192 tokens plus concatenations of two of them (how BPE
merges grow a vocabulary), made here: no download. Each of S matchers runs the JSON schema
of bench/structured.py (an unbounded array of records) and walks it by sampling uniformly
among its allowed tokens, so rows sit in different states (inside strings, numbers,
between keys), as a batch does. Prints one line per (vocabulary, S): mean and p90 µs per
step of the mask fill and of the consume, and µs per row.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import llguidance
import llguidance.numpy as llnp
import numpy as np

from bench.structured import RECORDS
from tpaserve.args import DEMO_DIR
from tpaserve.core.structured import MASK_THREADS, build_lltokenizer
from tpaserve.models.tokenizer import load_tokenizer
from tpaserve.structured_outputs import StructuredOutputsParams


def demo_tokenizer() -> llguidance.LLTokenizer:
    tok = load_tokenizer(DEMO_DIR)
    return build_lltokenizer(str(DEMO_DIR), tok.vocab_size, tok.eos_token_id)


def merged_tokenizer(size: int, seed: int = 0) -> llguidance.LLTokenizer:
    """t6-demo's tokens + random pairs of them, `size` tokens in all (distinct bytes)."""
    tok = load_tokenizer(DEMO_DIR)
    special = set(tok.all_special_ids)
    base = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    words = [b for i, b in enumerate(base) if i not in special and b]
    rng, seen = random.Random(seed), set(base)
    tokens = list(base)
    while len(tokens) < size:
        b = rng.choice(words) + rng.choice(words)
        if b not in seen:
            seen.add(b)
            tokens.append(b)
    eos = tok.eos_token_id
    by_bytes = {b: i for i, b in enumerate(tokens) if i not in special}
    longest = max(map(len, by_bytes))

    def encode(text: str | bytes) -> list[int]:          # greedy longest match
        data = text.encode() if isinstance(text, str) else text
        out, i = [], 0
        while i < len(data):
            n = next(n for n in range(min(longest, len(data) - i), 0, -1)
                     if data[i:i + n] in by_bytes or n == 1)
            out.append(by_bytes.get(data[i:i + n], 0))
            i += n
        return out

    class Wrapped:
        eos_token_id, bos_token_id = eos, tok.bos_token_id
        special_token_ids = sorted(special)

        def __init__(self):
            self.tokens = [b"\xff" + b if i in special else b for i, b in enumerate(tokens)]

        def __call__(self, text):
            return encode(text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapped()), n_vocab=size,
                                  eos_token=eos)


def walk(lltok: llguidance.LLTokenizer, rows: int, steps: int, seed: int) -> dict:
    """S matchers on RECORDS, `steps` steps: per-step fill and consume times (µs)."""
    grammar = StructuredOutputsParams(json=RECORDS).grammar_text()
    matchers = [llguidance.LLMatcher(lltok, grammar, log_level=0) for _ in range(rows)]
    width = (lltok.vocab_size + 31) // 32
    mask = np.full((rows, width), -1, np.int32)
    executor = llguidance.LLExecutor(MASK_THREADS)
    rng = np.random.default_rng(seed)
    fill, consume = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        if rows == 1:
            llnp.fill_next_token_bitmask(matchers[0], mask, 0)
        else:
            llnp.fill_next_token_bitmask_par(executor, list(zip(matchers, range(rows))), mask)
        t1 = time.perf_counter()
        bits = np.unpackbits(mask.view(np.uint8), axis=1, bitorder="little")  # (S, 32 W)
        picks = []
        for j in range(rows):
            allowed = np.flatnonzero(bits[j, :lltok.vocab_size])
            allowed = allowed[allowed != lltok.eos_token] if len(allowed) > 1 else allowed
            picks.append(int(rng.choice(allowed)))
        t2 = time.perf_counter()
        for m, t in zip(matchers, picks):
            if not m.consume_token(t):
                raise RuntimeError(f"token {t} rejected: {m.get_error()}")
        consume.append(1e6 * (time.perf_counter() - t2))
        fill.append(1e6 * (t1 - t0))
    return dict(rows=rows, fill_us=statistics.mean(fill),
                fill_p90_us=float(np.percentile(fill, 90)),
                consume_us=statistics.mean(consume), fill_us_per_row=statistics.mean(fill) / rows)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.mask_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--vocab", default="8192,50304", help="8192 is t6-demo's own")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = []
    for v in (int(x) for x in args.vocab.split(",")):
        lltok = demo_tokenizer() if v == 8192 else merged_tokenizer(v)
        for s in (int(x) for x in args.rows.split(",")):
            row = dict(vocab=v, threads=MASK_THREADS, **walk(lltok, s, args.steps, seed=s))
            print(f"vocab {v:>6} rows {s:>3}: fill {row['fill_us']:8.0f} µs/step "
                  f"(p90 {row['fill_p90_us']:.0f}, {row['fill_us_per_row']:.0f} per row), "
                  f"consume {row['consume_us']:6.0f} µs/step  [{MASK_THREADS} threads]",
                  flush=True)
            out.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
