"""Offline throughput: `tpaserve.LLM.generate` on token-id prompts, the workload bench.serve
sends (random ids below --vocab-size, ignore_eos, one temperature), timed end to end.

    python -m bench.offline --model ckpt/ --num-prompts 1024 --input-len 512 --output-len 256 \
        --temperature 1.0 -- --max-num-seqs 512 --cache-memory 24GiB

Everything after `--` is a `tpaserve` engine flag (tpaserve.args.EngineArgs), so the offline
engine is configured exactly as the server it is compared with. Prints one JSON line:
{"output_throughput": tok/s, "duration_s", "total_output_tokens", "num_prompts", ...}.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from bench.workload import make_requests


def engine_kwargs(flags: Sequence[str]) -> dict:
    """`tpaserve` flags -> EngineArgs keyword arguments (the CLI's own parser; the server's
    flags, such as --api-server-count, are accepted and left out)."""
    import dataclasses

    from tpaserve.api.cli import build_parser
    from tpaserve.args import EngineArgs
    ns = build_parser().parse_args(list(flags))
    defaults = EngineArgs()
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(EngineArgs)
            if f.name not in ("model", "tokenizer")
            and getattr(ns, f.name) != getattr(defaults, f.name)}


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.offline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--num-prompts", type=int, default=1024)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=16, help="unmeasured prompts first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("engine_flags", nargs=argparse.REMAINDER,
                    help="after --: tpaserve engine flags")
    args = ap.parse_args(argv)
    flags = [f for f in args.engine_flags if f != "--"]

    from tpaserve import LLM, SamplingParams
    llm = LLM(args.model, **engine_kwargs(flags))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len,
                            ignore_eos=True)
    warm = make_requests(args.warmup, args.input_len, 16, seed=args.seed + 1, token_ids=True,
                         vocab_size=args.vocab_size)
    llm.generate([s.prompt for s in warm], SamplingParams(max_tokens=16, ignore_eos=True))
    specs = make_requests(args.num_prompts, args.input_len, args.output_len, seed=args.seed,
                          token_ids=True, vocab_size=args.vocab_size)
    start = time.perf_counter()
    outs = llm.generate([s.prompt for s in specs], params)
    duration = time.perf_counter() - start
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    row = dict(mode="offline", num_prompts=args.num_prompts, input_len=args.input_len,
               output_len=args.output_len, temperature=args.temperature, engine_flags=flags,
               duration_s=duration, total_output_tokens=n_out,
               output_throughput=n_out / duration,
               total_token_throughput=(n_out + args.num_prompts * args.input_len) / duration)
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
