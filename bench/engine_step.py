"""Engine-level GPU check and timing (run on the device machine).

1. Correctness: the same greedy requests through the engine on CUDA with the Triton kernels
   (+ CUDA graphs) and with the torch reference ops (eager): next-token logits of a mixed
   prefill/decode workload compared step by step, and greedy tokens compared.
2. Speed: a full T6-medium decode step (24 layers, random weights, bf16) at batch 1, 16, 64
   with CUDA graphs and eager: engine.step() wall time (scheduling + runner + sampling) and
   the graph replay alone.

    PYTHONPATH=. python3 bench/engine_step.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from tpaserve.config import ModelConfig
from tpaserve.engine.factory import build_engine
from tpaserve.engine.paged_attention import TorchOps
from tpaserve.models import T6
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
    ref.runner.ops = TorchOps
    a = greedy_run(fast, prompts, 24)
    b = greedy_run(ref, prompts, 24)
    same = sum(x == y for x, y in zip(a, b))
    first_div = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
    return dict(requests=len(prompts), identical=same, first_divergence=first_div,
                graphs=fast.runner.graphs is not None)


def time_decode(batch: int, eager: bool, ctx: int, steps: int) -> dict:
    cfg = ModelConfig(**MEDIUM)
    model = make_model(cfg)
    eng = build_engine(model, num_blocks=batch * (ctx // 16 + 40) + 64, block_size=16,
                       max_num_batched_tokens=max(2048, ctx), max_num_seqs=max(batch, 1),
                       enforce_eager=eager)
    p = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    rng = random.Random(1)
    for i in range(batch):
        eng.add_request(str(i), [rng.randrange(50257) for _ in range(ctx)], p)
    # finish every prefill first, then time pure decode steps
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.requests.values()) \
            or eng.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        eng.step()              # returns after sampling: .tolist() syncs the device
        times.append(time.perf_counter() - t)
    row = dict(batch=batch, ctx=ctx, eager=eager, step_ms_median=1e3 * statistics.median(times),
               step_ms_p90=1e3 * sorted(times)[int(0.9 * len(times))])
    g = eng.runner.graphs
    if g is not None and batch in g.graphs:
        graph, _ = g.graphs[g.bucket_for(batch)]
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        row["graph_replay_ms"] = start.elapsed_time(end) / 50
    del eng, model
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
    res["correctness"] = check_correctness(args.quick)
    print("correctness:", res["correctness"], flush=True)
    rows = []
    for batch, eager in [(1, False), (1, True), (16, False), (64, False), (64, True)]:
        rows.append(time_decode(batch, eager, ctx=512 if args.quick else 1024, steps=30))
        print(rows[-1], flush=True)
    res["decode"] = rows
    with open(os.path.join(args.out, "engine_step.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n| batch | context | mode | engine step median (ms) | p90 | graph replay (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['ctx']} | {'eager' if r['eager'] else 'graphs'} | "
              f"{r['step_ms_median']:.3f} | {r['step_ms_p90']:.3f} | {r.get('graph_replay_ms', float('nan')):.3f} |")


if __name__ == "__main__":
    main()
