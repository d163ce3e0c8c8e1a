"""What the sampler's non-finite guard costs per step (runner/sampler.py: a row max over the
(B, V) fp32 logits, a compare, a where; greedy batches take the max from the argmax they
need anyway): CUDA-event timing of the sampled path's guard ops alone, at a GPT-2-sized
vocabulary, against the whole sample_ids call they are part of. Launch-bound at every batch
here: the timing is of back-to-back launches from the host.

    python -m bench.guard_cost
"""
from __future__ import annotations

import torch

from tpaserve.runner.sampler import NONFINITE, Sampler, SamplingRow
from tpaserve.sampling_params import SamplingParams


def timed(fn, iters: int = 200) -> float:
    """Mean microseconds per call, after a warm-up."""
    for _ in range(10):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def main() -> None:
    v = 50304
    print(f"{'batch':>6} {'mode':>8} {'guard us':>9} {'sample_ids us':>14} {'share':>6}")
    for b in (1, 64, 256):
        logits = torch.randn(b, v, device="cuda", dtype=torch.bfloat16)
        for mode, p in (("greedy", SamplingParams(temperature=0.0)),
                        ("sampled", SamplingParams(temperature=0.8, top_p=0.95))):
            sampler = Sampler(v, 2)
            rows = [SamplingRow(p, [1], [], None) for _ in range(b)]
            meta = sampler.metadata(rows, logits.device)
            x = logits.float()
            tokens = torch.zeros(b, dtype=torch.int64, device="cuda")

            def guard():
                return torch.where(x.amax(dim=-1) < float("inf"), tokens, NONFINITE)

            g = timed(guard)
            whole = timed(lambda: sampler.sample_ids(logits, meta))
            print(f"{b:>6} {mode:>8} {g:>9.1f} {whole:>14.1f} {g / whole:>6.1%}")


if __name__ == "__main__":
    main()
