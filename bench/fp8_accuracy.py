"""The fp8 factor cache's accuracy: logprobs and greedy outputs of the engine with
`--cache-dtype fp8` against the same engine with a bfloat16 cache (CPU or GPU).

    python -m bench.fp8_accuracy --model t6-demo --json fp8_demo.json
    python -m bench.fp8_accuracy --model t6-medium --tokens 256 --prompts 4 --json fp8_m.json

Teacher-forced: the text's first --tokens tokens (t6-demo: tests/data/demo_heldout.txt
through its tokenizer; a preset: random weights as bench/make_random_checkpoint.py makes
them, random token ids) go in as one prompt with prompt_logprobs, under a token budget of
--chunk tokens a step: with 1 (the default) every position is a decode step whose
attention reads all earlier positions from the cache. Per token, |delta logprob| of the
text's token given its prefix against the bfloat16 cache: max, mean, p99, and how often
the top-1 token agrees. Greedy: --prompts windows of the text (random ids for a preset) of
--prompt-len tokens, --greedy-tokens new tokens each, greedy with every cache: the tokens
equal to the bfloat16 cache's up to the first divergence.

Rows (--variants):
  fp8            the engine's fp8 cache (e4m3, per-rank scale folded into the factors)
  float16        a float16 cache: the noise floor of changing the cache's rounding at all
  fp8-pertoken   emulated: e4m3 with one power-of-two scale per (token, factor), the
                 explicit-scale design fp8 was chosen over (docs/kernel_notes.md)
  fp8-noscale    emulated: a plain e4m3 cast, no scale (vLLM's default k/v scale of 1)
The emulated rows store the quantised-then-dequantised factors in a bfloat16 cache (a
power-of-two scale times an e4m3 value is exact in bfloat16) by patching the CPU
reference store, so they run on the CPU only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from pathlib import Path

import torch

from tpaserve.args import DEMO_DIR
from tpaserve.frontend.llm_engine import build_engine
from tpaserve.kernels import reference as ref
from tpaserve.runner.attention import TorchOps
from tpaserve.sampling_params import SamplingParams

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "demo_heldout.txt"
VARIANTS = ("fp8", "float16", "fp8-pertoken", "fp8-noscale")


def _fake_quant(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """x (T, a, b) -> e4m3-rounded values times a power-of-two scale per token (or 1)."""
    xf = x.float()
    if not per_token:
        return ref.quantize_fp8(xf).float()
    amax = xf.abs().amax((1, 2), keepdim=True).clamp_min(1e-30)          # (T, 1, 1)
    e = torch.ceil(torch.log2(amax / ref.FP8_MAX))                          # max -> <= 448
    return ref.quantize_fp8(xf * torch.exp2(-e)).float() * torch.exp2(e)


@contextlib.contextmanager
def emulated_store(per_token: bool):
    """The CPU reference store, writing fake-quantised factors into a non-fp8 cache."""
    def store(ak, bk, av, bv, cos, sin, slot_mapping, ak_c, bk_c, av_c, bv_c):
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        blk, off = slots // bk_c.size(1), slots % bk_c.size(1)
        bk_rot = ref.rope_ref(bk[keep], cos[keep], sin[keep])
        for x, c in ((ak[keep], ak_c), (bk_rot, bk_c), (av[keep], av_c), (bv[keep], bv_c)):
            c[blk, off] = _fake_quant(x, per_token).to(c.dtype)
    saved = TorchOps.store_factors
    TorchOps.store_factors = staticmethod(store)
    try:
        yield
    finally:
        TorchOps.store_factors = saved


def load_model(name: str, dtype: str, device: str, max_position: int, seed: int):
    """(model, token ids of the text or None, vocab bound for random ids)."""
    if name == "t6-demo":
        from tpaserve.models.loader import load
        from tpaserve.models.tokenizer import load_tokenizer
        model = load(str(DEMO_DIR), dtype=dtype, device=device)
        tok = load_tokenizer(DEMO_DIR)
        return model, tok.encode(TEXT.read_text()), tok.vocab_size
    from bench.presets import model_config
    from tpaserve.models.loader import resolve_dtype
    from tpaserve.models.t6 import T6
    cfg = model_config(name, max_position=max_position)
    model = T6(cfg).init_random(seed=seed).to(resolve_dtype(dtype, device)).to(device).eval()
    return model, None, cfg.vocab_size


def run_variant(model, variant: str, text_ids: list[int], prompts: list[list[int]], *,
                device: str, chunk: int, greedy_tokens: int, max_len: int) -> dict:
    """Teacher-forced logprobs of text_ids and greedy outputs of prompts, one engine."""
    cache_dtype = {"bf16": "bfloat16", "fp8": "fp8", "float16": "float16"}.get(variant,
                                                                             "bfloat16")
    emulate = contextlib.nullcontext()
    if variant.startswith("fp8-"):
        if device != "cpu":
            raise SystemExit(f"{variant} is emulated through the CPU reference store: CPU only")
        emulate = emulated_store(per_token=variant == "fp8-pertoken")
    per_seq = -(-max_len // 16)
    with emulate:
        eng = build_engine(model, device=device, cache_dtype=cache_dtype, block_size=16,
                           num_blocks=per_seq * max(1, len(prompts)) + 4,
                           max_num_batched_tokens=chunk, max_num_seqs=max(1, len(prompts)),
                           max_model_len=max_len, enable_prefix_caching=False,
                           enforce_eager=True)
        eng.add_request("tf", text_ids, SamplingParams(max_tokens=1, prompt_logprobs=1,
                                                       temperature=0))
        greedy = SamplingParams(temperature=0, max_tokens=greedy_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            eng.add_request(f"g{i}", p, greedy)
        out, t0 = {}, time.perf_counter()
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    out[o.request_id] = o
        seconds = time.perf_counter() - t0
    lps = out["tf"].prompt_logprobs[1:]                    # (logprob, [(top id, logprob)])
    return dict(logprob=[lp for lp, _ in lps], top1=[top[0][0] for _, top in lps],
                greedy=[out[f"g{i}"].outputs[0].token_ids for i in range(len(prompts))],
                seconds=seconds)


def compare(base: dict, other: dict) -> dict:
    a = torch.tensor(base["logprob"], dtype=torch.float64)
    b = torch.tensor(other["logprob"], dtype=torch.float64)
    d = (a - b).abs()
    top1 = sum(x == y for x, y in zip(base["top1"], other["top1"])) / len(base["top1"])
    first = []
    for x, y in zip(base["greedy"], other["greedy"]):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
        first.append(n)
    n_tok = len(base["greedy"][0]) if base["greedy"] else 0
    return dict(max_abs_dlogprob=d.max().item(), mean_abs_dlogprob=d.mean().item(),
                p99_abs_dlogprob=torch.quantile(d, 0.99).item(), top1_agreement=top1,
                greedy_first_divergence=first,
                greedy_equal_prefix=sum(first) / max(1, n_tok * len(first)),
                greedy_identical=sum(f == n_tok for f in first),
                tokens=len(d), mean_logprob_bf16=a.mean().item())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="t6-demo", help="t6-demo or a preset (t6-medium, ...)")
    ap.add_argument("--dtype", default="bfloat16", help="the model's dtype")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=512, help="teacher-forced text tokens")
    ap.add_argument("--chunk", type=int, default=1, help="token budget a step (1: decode)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    max_len = max(a.tokens + 1, a.prompt_len + a.greedy_tokens)
    model, ids, vocab = load_model(a.model, a.dtype, a.device, max_len, a.seed)
    rng = random.Random(a.seed)
    if ids is None:                                       # random weights: random ids
        ids = [rng.randrange(vocab) for _ in range(a.tokens + a.prompts * a.prompt_len)]
    text_ids = ids[:a.tokens]
    starts = [rng.randrange(0, len(ids) - a.prompt_len) for _ in range(a.prompts)]
    prompts = [ids[s:s + a.prompt_len] for s in starts]
    kw = dict(device=a.device, chunk=a.chunk, greedy_tokens=a.greedy_tokens, max_len=max_len)
    base = run_variant(model, "bf16", text_ids, prompts, **kw)
    result = dict(args=vars(a), bf16_seconds=base["seconds"], rows={})
    print(f"{a.model} ({a.dtype} weights, {a.device}), {len(text_ids)} teacher-forced tokens "
          f"(chunk {a.chunk}), {a.prompts} x {a.greedy_tokens} greedy; mean logprob with "
          f"the bfloat16 cache {sum(base['logprob']) / len(base['logprob']):.3f}")
    print(f"{'cache':<14}{'max |dlp|':>10}{'mean |dlp|':>11}{'p99 |dlp|':>10}{'top-1':>8}"
          f"{'greedy prefix':>14}{'identical':>10}")
    for v in a.variants.split(","):
        row = compare(base, run_variant(model, v, text_ids, prompts, **kw))
        result["rows"][v] = row
        print(f"{v:<14}{row['max_abs_dlogprob']:>10.4f}{row['mean_abs_dlogprob']:>11.5f}"
              f"{row['p99_abs_dlogprob']:>10.4f}{row['top1_agreement']:>8.3f}"
              f"{row['greedy_equal_prefix']:>14.3f}{row['greedy_identical']:>6}/{a.prompts}",
              flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
