"""Baseline: Hugging Face transformers `generate` on a LLaMA of the same size as a T6 preset
(default T6-medium: 24 layers, d_model 1024, 16 heads of 64, SwiGLU 2730, tied embeddings,
vocab 50304, about 353M parameters), random weights, greedy, exactly --output-len new tokens.

    python -m bench.baseline_hf --device cuda --dtype bfloat16 --batch 1,64 \
        --prompt-len 512 --output-len 256 --json hf.json

transformers is imported only here, at run time (it is not a tpaserve dependency). TTFT is a
separate generate of one token on the same prompts; TPOT follows from the full run.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from bench.metrics import batch_row, format_row
from bench.presets import PRESETS, baseline_parser, model_config
from bench.serve import write_json
from tpaserve.config import ModelConfig
from tpaserve.models.loader import resolve_dtype


def llama_config(cfg: ModelConfig, max_position: int):
    from transformers import LlamaConfig
    heads = cfg.mha_equivalent_heads
    return LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
                       intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                       num_attention_heads=heads, num_key_value_heads=heads,
                       head_dim=cfg.n_embd // heads, max_position_embeddings=max_position,
                       tie_word_embeddings=True, attention_bias=False, mlp_bias=False,
                       pad_token_id=0)


def build_model(cfg: ModelConfig, max_position: int, device: str, dtype: torch.dtype):
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(cfg, max_position))
    return model.to(dtype).eval()


def _timed_generate(model, prompts: torch.Tensor, new_tokens: int) -> float:
    if prompts.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    if prompts.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert out.shape[1] == prompts.shape[1] + new_tokens, out.shape
    return elapsed


@torch.no_grad()
def run(model, cfg: ModelConfig, batch: int, prompt_len: int, output_len: int,
        seed: int = 0) -> dict:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=g).to(device)
    ttft = _timed_generate(model, prompts, 1)
    total = _timed_generate(model, prompts, output_len)
    return batch_row("hf-generate", batch, prompt_len, output_len, ttft_s=ttft, total_s=total,
                     model=f"llama-like-{cfg.name}",
                     dtype=str(next(model.parameters()).dtype).removeprefix("torch."))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return baseline_parser("python -m bench.baseline_hf", __doc__,
                           f"the T6 whose size to match: preset ({', '.join(PRESETS)}), "
                           "checkpoint dir or config.json").parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        raise SystemExit("baseline_hf needs transformers (pip install transformers)") from e
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype, device)
    cfg = model_config(args.model)
    model = build_model(cfg, args.prompt_len + args.output_len, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    print(f"LLaMA-shaped {cfg.name}: {params / 1e6:.0f}M parameters, {dtype}, {device}")
    run(model, cfg, 1, 16, 4)                                       # warm-up, not reported
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        rows.append(run(model, cfg, b, args.prompt_len, args.output_len, args.seed))
        print(format_row(rows[-1]) + "\n", flush=True)
        if args.json:
            write_json(args.json, vars(args), rows)
    return rows


if __name__ == "__main__":
    main()
