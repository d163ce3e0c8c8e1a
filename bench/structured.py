"""What structured outputs cost: served throughput with 0%, 50% and 100% of the requests
constrained by a JSON schema, one server, one workload (issue #15, item 6).

    python -m bench.structured --model /tmp/ck --name t6-medium --input-len 512 \
        --output-len 256 --concurrency 64 --num-prompts 512 --json out.json \
        -- --max-num-seqs 256 --cache-memory 24GiB

Everything after `--` is a `tpaserve` flag. Requests are token-id completions with
ignore_eos, so every request makes exactly --output-len tokens, constrained or not: a
constrained request's grammar stays active throughout (the default schema is an unbounded
array of records; a grammar that has ended allows only EOS, which ignore_eos then repeats).
Request i is constrained when the fraction's running count steps up at i, so a 50% point
interleaves them. Each row is bench/offline_vs_served.py's served row plus `fraction` and
`relative` (its output throughput over the 0% point's); the target is relative >= 0.90 at
100%. Last, --check requests (bounded schema, no ignore_eos) show the outputs parse.

The masks are as wide as the tokenizer's vocabulary (make_random_checkpoint's is ~1000
tokens, t6-demo's 8192): a 50K-token vocabulary costs llguidance more per mask.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench.metrics import summarize
from bench.offline_vs_served import _mean, run_point, scrape, start_server, stop_server
from bench.workload import RequestSpec, make_requests

RECORDS = {"type": "array", "items": {
    "type": "object",
    "properties": {"id": {"type": "integer"},
                   "name": {"type": "string", "maxLength": 24},
                   "tags": {"type": "array", "items": {"enum": ["new", "old", "hot"]},
                            "maxItems": 4},
                   "score": {"type": "number"}},
    "required": ["id", "name", "tags", "score"], "additionalProperties": False}}
PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def constrain(specs: list[RequestSpec], fraction: float, schema: dict) -> list[RequestSpec]:
    """Request i gets the schema iff floor((i + 1) f) > floor(i f): evenly interleaved."""
    extra = {"structured_outputs": {"json": schema}}
    return [RequestSpec(s.prompt, s.prompt_len, s.output_len,
                        extra if math.floor((i + 1) * fraction) > math.floor(i * fraction)
                        else None) for i, s in enumerate(specs)]


def check_outputs(url: str, name: str, n: int, vocab_size: int) -> dict:
    """n constrained requests without ignore_eos: how many end with "stop" and parse."""
    specs = make_requests(n, 32, 256, seed=5, token_ids=True, vocab_size=vocab_size)
    stopped = parsed = 0
    with httpx.Client(timeout=600) as client:
        for s in specs:
            r = client.post(f"{url}/v1/completions", json=dict(
                model=name, prompt=s.prompt, max_tokens=256, temperature=1.0,
                structured_outputs={"json": PERSON})).json()
            c = r["choices"][0]
            stopped += c["finish_reason"] == "stop"
            try:
                parsed += isinstance(json.loads(c["text"]), dict)
            except json.JSONDecodeError:
                pass
    return dict(checked=n, stopped=stopped, parsed=parsed)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.structured", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--name", required=True, help="served model name / row label")
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=1000, help="prompt ids are below it")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--fractions", default="0,0.5,1", help="constrained shares, one row each")
    ap.add_argument("--schema", help="a JSON schema file (default: an array of records)")
    ap.add_argument("--client-procs", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=32)
    ap.add_argument("--check", type=int, default=16, help="constrained outputs to parse")
    ap.add_argument("--startup-timeout", type=float, default=300)
    ap.add_argument("--out-dir", default="/tmp")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("engine_flags", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    args.fake_core = False                           # what start_server reads
    flags = [f for f in args.engine_flags if f != "--"]
    schema = json.loads(Path(args.schema).read_text()) if args.schema else RECORDS
    fractions = [float(f) for f in args.fractions.split(",")]
    log = Path(args.out_dir) / f"server-structured-{args.name}.log"
    proc, url, _ = start_server(args, flags, log)
    rows: list[dict] = []
    try:
        warm = constrain(make_requests(args.warmup, args.input_len, 16, seed=99,
                                       token_ids=True, vocab_size=args.vocab_size), 0.5, schema)
        run_point(url, args.name, warm, len(warm), 1, args.temperature)
        base = make_requests(args.num_prompts, args.input_len, args.output_len, seed=7919,
                             token_ids=True, vocab_size=args.vocab_size)
        for f in fractions:
            m0 = scrape(url)
            procs = 1 if args.concurrency <= 16 else args.client_procs
            results, duration = run_point(url, args.name, constrain(base, f, schema),
                                          args.concurrency, procs, args.temperature)
            d = {k: v - m0.get(k, 0.0) for k, v in scrape(url).items()}
            row = summarize(results, duration, label=args.name, fraction=f,
                            concurrency=args.concurrency, num_prompts=args.num_prompts,
                            input_len=args.input_len, output_len=args.output_len)
            steps = d.get("tpaserve:engine_step_duration_seconds_count", 0.0) or math.nan
            row.update(step_ms=1e3 * d.get("tpaserve:engine_step_duration_seconds_sum", 0)
                       / steps,
                       seqs_per_step=d.get("tpaserve:engine_step_batch_size_sum", 0) / steps,
                       host_frac=d.get("tpaserve:engine_host_seconds_total", 0) / duration,
                       wait_frac=d.get("tpaserve:engine_device_wait_seconds_total", 0)
                       / duration,
                       server_ttft_ms=1e3 * _mean(d, "tpaserve:time_to_first_token_seconds"))
            row["relative"] = row["output_throughput"] / rows[0]["output_throughput"] \
                if rows and rows[0]["output_throughput"] else 1.0
            print(f"{args.name} c={args.concurrency} constrained {f:4.0%}: "
                  f"{row['output_throughput']:>9,.0f} out tok/s ({row['relative']:.1%})  "
                  f"TPOT p50 {row['median_tpot_ms'] or 0:.2f} ms  step {row['step_ms']:.2f} ms"
                  f" x {row['seqs_per_step']:.0f} seqs  host {row['host_frac']:.2f} wait "
                  f"{row['wait_frac']:.2f}  failed {row['failed']} {row['first_error'][:200]}",
                  flush=True)
            rows.append(row)
        if args.check:
            checked = check_outputs(url, args.name, args.check, args.vocab_size)
            print(f"{args.name} check: {checked}", flush=True)
            rows.append(dict(label=args.name, **checked))
    finally:
        stop_server(proc)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(engine_flags=flags, schema=schema,
                                                   rows=rows), indent=1))
    return rows


if __name__ == "__main__":
    main()
