"""Where a structured-output step's host time goes, in the engine core alone (no HTTP, no
output processing): steady-state decode of --batch requests, every one constrained by
bench/structured.py's JSON schema or none, stepped by EngineCore.step().

    PYTHONPATH=. python3 bench/structured_steps.py --model /tmp/ck --batch 64 \
        [--rows plain8,plain1,json1] [--profile json1] [--json out.json]

Rows: plainK (unconstrained) and jsonK (all constrained), with multi-step rounds of K.
Each row: ms per core step (a round is one) and per generated token (steady state, after
warm-up), the core's host and device-wait seconds per step;
--profile ROW then prints a cProfile of as many more steps (top functions by own time);
--trace ROW the device's idle gaps over --trace-steps more (CUDA only).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import time
from pathlib import Path

from bench.structured import RECORDS
from tpaserve.args import parse_size
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.sampling_params import SamplingParams, StructuredOutputsParams


def gaps(core, steps: int, top: int = 12) -> None:
    """Device idle time over `steps` core steps (torch.profiler's CUDA kernel and memcpy
    events, merged): busy share, and the longest gaps with the kernel before each."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                key=lambda e: e.time_range.start)
    if not ev:
        print("no device events")
        return
    busy, holes = 0.0, []
    end, prev = ev[0].time_range.start, ev[0].name
    for e in ev:
        s, t = e.time_range.start, e.time_range.end
        if s > end:
            holes.append((s - end, prev))
        busy += max(0, t - max(s, end))
        if t > end:
            end, prev = t, e.name
    span = end - ev[0].time_range.start
    print(f"device busy {busy / span:.1%} of {span / 1e3:.1f} ms over {steps} core steps; "
          f"{len(holes)} gaps, {sum(h for h, _ in holes) / 1e3:.2f} ms idle")
    by: dict[str, list[float]] = {}
    for h, name in holes:
        by.setdefault(name[:60], []).append(h)
    for name, hs in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"  after {name:<60} {len(hs):>5} gaps, {sum(hs) / 1e3:8.2f} ms, "
              f"max {max(hs):8.1f} us")


def run_row(args, row: str, profile: bool, trace: bool = False) -> dict:
    constrained, k = row.startswith("json"), int(row.lstrip("plainjson"))
    eng = build_engine(args.model, max_num_seqs=max(args.batch, 1),
                       num_scheduler_steps=k, max_model_len=args.max_model_len,
                       cache_memory=parse_size(args.cache_memory))
    core, rng = eng.core, random.Random(0)
    so = StructuredOutputsParams(json=RECORDS) if constrained else None
    for i in range(args.batch):
        eng.add_request(f"r{i}", [rng.randrange(args.vocab_size) for _ in range(args.input_len)],
                        SamplingParams(max_tokens=args.max_model_len - args.input_len - 8,
                                       temperature=1.0, ignore_eos=True,
                                       structured_outputs=so))
    while len(core.scheduler.running) < args.batch or core.scheduler.waiting:
        core.step()
    for _ in range(args.warmup):
        core.step()
    host0, wait0 = core._host, core._wait
    toks0 = sum(r.num_output_tokens for r in core.scheduler.requests.values())
    t0 = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    wall = time.perf_counter() - t0
    toks = sum(r.num_output_tokens for r in core.scheduler.requests.values()) - toks0
    out = dict(row=row, batch=args.batch, steps=args.steps, ms_per_step=1e3 * wall / args.steps,
               ms_per_token_step=1e3 * wall * args.batch / max(toks, 1),
               tokens_per_s=toks / wall,
               host_ms_per_step=1e3 * (core._host - host0) / args.steps,
               wait_ms_per_step=1e3 * (core._wait - wait0) / args.steps)
    print(f"{row:>7} batch {args.batch}: {out['ms_per_step']:.2f} ms/step, "
          f"{out['ms_per_token_step']:.3f} ms per token-step, {out['tokens_per_s']:,.0f} tok/s;"
          f" host {out['host_ms_per_step']:.2f} ms, wait {out['wait_ms_per_step']:.2f} ms"
          f" per step", flush=True)
    if profile:                        # more steps, under the profiler (not timed above)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.steps):
            core.step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    if trace:
        gaps(core, args.trace_steps)
    for rid in list(core.scheduler.requests):
        eng.abort_request(rid)
    core.close()
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="bench/structured_steps.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--cache-memory", default="8GiB")
    ap.add_argument("--rows", default="plain8,plain1,json1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--profile", default="", help="comma-separated rows to cProfile")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--trace", default="", help="comma-separated rows: device idle gaps")
    ap.add_argument("--trace-steps", type=int, default=24)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    prof = set(filter(None, args.profile.split(",")))
    trace = set(filter(None, args.trace.split(",")))
    rows = [run_row(args, r, r in prof, r in trace) for r in args.rows.split(",")]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
