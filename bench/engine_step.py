"""Engine-level GPU check and timing (run on the device machine).

1. Correctness: the same greedy requests through the engine on CUDA with the Triton kernels
   (+ CUDA graphs) and with the torch reference ops (eager): next-token logits of a mixed
   prefill/decode workload compared step by step, and greedy tokens compared.
2. Speed: a full T6-medium decode step (24 layers, random weights, bf16) at batch 1, 16, 64
   with CUDA graphs and eager: engine.step() wall time (scheduling + runner + sampling) and
   the graph replay alone. Variant "fused" is the engine as built (fused projection GEMMs +
   the kernels/fused.py tails); "base" is the same model unfused on plain torch ops, for an
   A/B in one run.
3. Kernel census (graph rows): the kernels of one decode step (the captured forward, run
   eagerly under torch.profiler): count per step and per layer, and device time by kernel.

4. --mixed: the step that admits 1, 2 or 4 new 512-token prompts while 64 requests decode
   (wall time without the profiler, device time with it); --host-profile adds a cProfile
   of one such step.

    PYTHONPATH=. python3 bench/engine_step.py [--quick] [--no-correctness]
        [--rows base:1:graphs,fused:1:graphs,fused:16:graphs8] [--max-model-len 33024]
        [--mixed [--host-profile]] [--no-skinny-gemm]
Row mode graphsK: CUDA graphs with multi-step rounds of K decode steps (time per token).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time
from collections import defaultdict

import torch

from tpaserve.config import ModelConfig
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.kernels import linear as linear_kernels
from tpaserve.models import T6
from tpaserve.runner.attention import TorchOps
from tpaserve.sampling_params import SamplingParams

MEDIUM = dict(n_layer=24, n_head=47, head_dim=64, n_embd=1024, vocab_size=50304, k_rank=2,
              v_rank=2, q_rank=6, max_position=4096)


def make_model(cfg: ModelConfig, dtype=torch.bfloat16) -> T6:
    return T6(cfg).init_random(0).to(device="cuda", dtype=dtype).eval()


def greedy_run(engine, prompts, max_tokens):
    p = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, pr in enumerate(prompts):
        engine.add_request(str(i), pr, p)
    done = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    return [done[str(i)] for i in range(len(prompts))]


def check_correctness(quick: bool) -> dict:
    """Kernels + graphs vs reference ops on one model: tokens of greedy decoding (fp32 model,
    so rounding cannot flip argmax unless logits nearly tie) and step-1 logits."""
    cfg = ModelConfig(n_layer=4, n_head=47, head_dim=64, n_embd=512, vocab_size=4096, k_rank=2,
                      v_rank=2, q_rank=6, max_position=2048)
    model = make_model(cfg, torch.float32)
    rng = random.Random(0)
    prompts = [[rng.randrange(cfg.vocab_size) for _ in range(rng.choice([1, 15, 16, 17, 100, 700]))]
               for _ in range(8 if quick else 24)]
    fast = build_engine(model, num_blocks=2048, block_size=16, max_num_batched_tokens=512,
                        max_num_seqs=32)
    ref = build_engine(model, num_blocks=2048, block_size=16, max_num_batched_tokens=512,
                       max_num_seqs=32, enforce_eager=True)
    ref.core.runner.ops = TorchOps
    a = greedy_run(fast, prompts, 24)
    b = greedy_run(ref, prompts, 24)
    same = sum(x == y for x, y in zip(a, b))
    first_div = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
    return dict(requests=len(prompts), identical=same, first_divergence=first_div,
                graphs=fast.core.runner.graphs is not None)


@contextlib.contextmanager
def unfused(model: T6):
    """build_engine without fuse_projections, model on plain torch ops (the pre-fusion step)."""
    fuse = T6.fuse_projections
    T6.fuse_projections = lambda self: self
    model.use_kernels = False
    try:
        yield
    finally:
        T6.fuse_projections = fuse


def kernel_census(eng, batch: int, ctx_class: int) -> dict:
    """Kernels (and memsets) of one decode step: the graph's forward run eagerly under the
    profiler. Returns counts and device microseconds by kernel name."""
    from torch.profiler import ProfilerActivity, profile
    g = eng.core.runner.graphs
    b = g.decode_bucket(batch)
    with torch.inference_mode():
        g._decode(b, ctx_class)                              # warm (no compiles inside)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g._decode(b, ctx_class)
            torch.cuda.synchronize()
    count, us = defaultdict(int), defaultdict(float)
    for e in prof.events():
        if str(e.device_type).endswith("CUDA"):
            count[e.name] += 1
            us[e.name] += e.time_range.elapsed_us()
    n = sum(count.values())
    top = sorted(us, key=us.get, reverse=True)[:14]
    return dict(kernels_per_step=n, kernels_per_layer=n / MEDIUM["n_layer"],
                device_us_total=sum(us.values()),
                top=[(k[:70], count[k], round(us[k], 1)) for k in top])


def time_decode(model: T6, variant: str, batch: int, eager: bool, ctx: int, steps: int,
                round_steps: int = 1) -> dict:
    """round_steps > 1: multi-step rounds; each engine.step() then makes round_steps tokens
    per request and the row reports time per token step (step time / round_steps). With
    async scheduling a step() launches one step and finishes the one before: in the steady
    state its wall time is the larger of the host's and the device's time per step."""
    ctxm = unfused(model) if variant == "base" else contextlib.nullcontext()
    with ctxm:
        eng = build_engine(model, num_blocks=batch * (ctx // 16 + 40 + round_steps * (steps + 4) // 16)
                           + 64, block_size=16,
                           max_num_batched_tokens=max(2048, ctx), max_num_seqs=max(batch, 1),
                           enforce_eager=eager, num_scheduler_steps=round_steps)
    p = SamplingParams(temperature=0, max_tokens=round_steps * (steps + 4) + 8, ignore_eos=True)
    rng = random.Random(1)
    for i in range(batch):
        eng.add_request(str(i), [rng.randrange(50257) for _ in range(ctx)], p)
    # finish every prefill first, then time pure decode steps
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.core.scheduler.requests.values()) \
            or eng.core.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()              # returns after the step before's results are on the host
        times.append(time.perf_counter() - t)
    row = dict(variant=variant, batch=batch, ctx=ctx, eager=eager,
               max_model_len=eng.max_model_len, round_steps=round_steps,
               step_ms_median=1e3 * statistics.median(times) / round_steps,
               step_ms_p90=1e3 * sorted(times)[int(0.9 * len(times))] / round_steps)
    g = eng.core.runner.graphs
    key = ("decode", g.decode_bucket(batch), g.context_class(ctx)) if g is not None else None
    if g is not None and key in g.graphs:        # the class of the timed steps' contexts
        graph, _ = g.graphs[key]
        reps = []
        for _ in range(5):                                   # 5 x 50 replays: median, spread
            torch.cuda.synchronize()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(50):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            reps.append(start.elapsed_time(end) / 50)
        row["graph_replay_ms"] = statistics.median(reps)
        row["graph_replay_ms_range"] = [min(reps), max(reps)]
        try:
            row["census"] = kernel_census(eng, batch, key[2])
        except Exception as e:                               # the profiler is optional
            row["census"] = dict(error=repr(e))
    del eng
    model.use_kernels = None
    torch.cuda.empty_cache()
    return row


def time_mixed(model: T6, batch: int = 64, ctx: int = 512, new: int = 2, reps: int = 6,
               host_profile: bool = False) -> dict:
    """The step that admits `new` prompts of ctx tokens while `batch - new` requests decode
    (what a concurrency-64 server does whenever requests finish and others arrive): an
    eager step. Wall time of engine.step() and the device time of its kernels."""
    from torch.profiler import ProfilerActivity, profile
    eng = build_engine(model, num_blocks=(batch + new * reps) * (ctx // 16 + 40) + 64,
                       block_size=16, max_num_seqs=batch + new)
    p = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    rng = random.Random(2)
    prompt = lambda: [rng.randrange(50257) for _ in range(ctx)]     # noqa: E731
    for i in range(batch - new):
        eng.add_request(f"r{i}", prompt(), p)
    while eng.core.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                                       for r in eng.core.scheduler.requests.values()):
        eng.step()
    walls, device = [], []
    for rep in range(reps + 1):                      # the first one compiles: not counted
        for j in range(new):
            eng.add_request(f"n{rep}.{j}", prompt(), SamplingParams(max_tokens=1, temperature=0))
        torch.cuda.synchronize()
        profiled = rep % 2 == 0 and rep > 0           # odd reps: wall time without the profiler
        with profile(activities=[ProfilerActivity.CUDA]) if profiled else contextlib.nullcontext() as prof:
            t = time.perf_counter()
            eng.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
        if profiled:
            device.append(sum(e.time_range.elapsed_us() for e in prof.events()
                              if str(e.device_type).endswith("CUDA")) / 1e3)
        elif rep:
            walls.append(1e3 * wall)
        eng.step()                                   # finishes the admitted ones' max_tokens=1
    if host_profile:                                 # where the host time of one goes
        import cProfile
        import pstats
        for j in range(new):
            eng.add_request(f"prof.{j}", prompt(), SamplingParams(max_tokens=1, temperature=0))
        pr = cProfile.Profile()
        pr.enable()
        eng.step()
        torch.cuda.synchronize()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
    row = dict(kind="mixed", batch=batch, new_prompts=new, ctx=ctx,
               step_ms_median=statistics.median(walls), device_ms_median=statistics.median(device))
    del eng
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-correctness", action="store_true",
                    help="skip the engine check (tests/engine/test_engine_gpu.py does it too)")
    ap.add_argument("--rows", default="base:1:graphs,fused:1:graphs,fused:1:eager,"
                    "fused:16:graphs,fused:64:graphs,base:64:graphs",
                    help="variant:batch:mode,... (variant base|fused, mode graphs|eager); "
                         "base rows run first, while the model is still unfused")
    ap.add_argument("--max-model-len", type=int, default=MEDIUM["max_position"],
                    help="the model's context and the engine's max_model_len; CUDA graphs are "
                         "captured for it (the serving suite uses 33024)")
    ap.add_argument("--mixed", action="store_true",
                    help="also time mixed steps: 2 and 4 new 512-token prompts among 64 decoding")
    ap.add_argument("--host-profile", action="store_true",
                    help="with --mixed: cProfile one mixed step (top functions by own time)")
    ap.add_argument("--no-skinny-gemm", action="store_true",
                    help="route every per-layer GEMM to cuBLAS (the A/B of kernels/linear.py)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    MEDIUM["max_position"] = args.max_model_len
    if args.no_skinny_gemm:
        linear_kernels.ENABLED = False
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    if not args.no_correctness:
        res["correctness"] = check_correctness(args.quick)
        print("correctness:", res["correctness"], flush=True)
    # mode: graphs | eager | graphsK (graphs, multi-step rounds of K decode steps)
    specs = [(v, int(b), m == "eager", int(m[6:] or 1) if m.startswith("graphs") else 1)
             for v, b, m in (r.split(":") for r in args.rows.split(","))]
    specs.sort(key=lambda s: s[0] != "base")   # fusing is in place: unfused rows first
    base = make_model(ModelConfig(**MEDIUM))
    rows = []
    for variant, batch, eager, round_steps in specs:
        model = base          # fused rows fuse it in place (build_engine); base rows ran first
        rows.append(time_decode(model, variant, batch, eager,
                                ctx=512 if args.quick else 1024, steps=30,
                                round_steps=round_steps))
        print(rows[-1], flush=True)
        res["decode"] = rows
        with open(os.path.join(args.out, "engine_step.json"), "w") as f:
            json.dump(res, f, indent=1)
    if args.mixed:
        for new in (1, 2, 4):
            res.setdefault("mixed", []).append(time_mixed(base, new=new, reps=10,
                                                          host_profile=args.host_profile and new == 2))
            print(res["mixed"][-1], flush=True)
        with open(os.path.join(args.out, "engine_step.json"), "w") as f:
            json.dump(res, f, indent=1)
    print("\n| variant | batch | context | mode | engine step median (ms per token step) | p90 "
          "| graph replay (ms) | kernels/layer |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        k = r.get("census", {}).get("kernels_per_layer", float("nan"))
        mode = "eager" if r["eager"] else "graphs" if r["round_steps"] == 1 else \
            f"graphs, rounds of {r['round_steps']}"
        print(f"| {r['variant']} | {r['batch']} | {r['ctx']} | "
              f"{mode} | {r['step_ms_median']:.3f} | "
              f"{r['step_ms_p90']:.3f} | {r.get('graph_replay_ms', float('nan')):.3f} | {k:.1f} |")
    for r in rows:
        if "census" in r:
            print(r["variant"], r["batch"], json.dumps(r["census"]))


if __name__ == "__main__":
    main()
