"""Baseline: the authors' way of generating with T6, a full recompute of every sequence for
each new token (no cache), with tpaserve's own T6 module and FullSequenceAttention.

    python -m bench.baseline_recompute --device cuda --dtype bfloat16 --batch 1,64 \
        --prompt-len 512 --output-len 256 --json recompute.json

Greedy decoding of random-weight models on random prompts; step i runs the whole batch's
prompt + i tokens through the model and takes each sequence's last position. Timed with a
device synchronize per step: TTFT is step 0 (the prefill), ITL the later steps.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from bench.metrics import batch_row, format_row
from bench.presets import PRESETS, baseline_parser, model_config
from bench.serve import write_json
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.loader import resolve_dtype
from tpaserve.models.t6 import T6


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def recompute_generate(model: T6, prompts: torch.Tensor,
                       output_len: int) -> tuple[torch.Tensor, list[float]]:
    """prompts (B, P) -> (generated ids (B, output_len), seconds per step)."""
    device = prompts.device
    ids = prompts                                                             # (B, L)
    steps = []
    for _ in range(output_len):
        t0 = time.perf_counter()
        B, L = ids.shape
        positions = torch.arange(L, device=device).repeat(B)                  # (B*L,)
        attn = FullSequenceAttention(list(range(0, B * L + 1, L)))
        hidden = model(ids.reshape(-1), positions, attn)                      # (B*L, d)
        logits = model.compute_logits(hidden.view(B, L, -1)[:, -1])          # (B, V)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)        # (B, L+1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    return ids[:, prompts.size(1):], steps


def build_model(name: str, max_position: int, device: str, dtype: torch.dtype,
                seed: int = 0) -> T6:
    cfg = model_config(name, max_position=max_position)
    with torch.device(device):
        model = T6(cfg)
    # init_random draws on a CPU generator: the same weights on every device.
    return model.init_random(seed=seed).to(device=device, dtype=dtype).eval()


def run(model: T6, batch: int, prompt_len: int, output_len: int, seed: int = 0,
        label: str = "recompute") -> dict:
    device = model.lm_head.weight.device
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g)
    _, steps = recompute_generate(model, prompts.to(device), output_len)
    return batch_row(label, batch, prompt_len, output_len, ttft_s=steps[0],
                     total_s=sum(steps), itl_s=steps[1:], model=model.cfg.name,
                     dtype=str(model.lm_head.weight.dtype).removeprefix("torch."))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return baseline_parser("python -m bench.baseline_recompute", __doc__,
                           f"preset ({', '.join(PRESETS)}), checkpoint dir or config.json "
                           "(shape only: weights are random)").parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    model = build_model(args.model, args.prompt_len + args.output_len, device, dtype, args.seed)
    run(model, 1, min(args.prompt_len, 16), 2)                       # warm-up, not reported
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        rows.append(run(model, b, args.prompt_len, args.output_len, args.seed))
        print(format_row(rows[-1]) + "\n", flush=True)
        if args.json:
            write_json(args.json, vars(args), rows)
    return rows


if __name__ == "__main__":
    main()
