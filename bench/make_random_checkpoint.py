"""Write a random-weights checkpoint directory the server can load, with a tokenizer.

    python -m bench.make_random_checkpoint --preset t6-medium --out /tmp/t6m --max-position 40960

Presets: the T6 sizes and the medium baselines (MHA / GQA / MQA / MLA, bench/presets.py);
each is written by its tpaserve class (T6, DenseLM, MLA) in the layout the authors' code uses.

The checkpoint is the authors' format (loader.save_checkpoint: config.json +
model.safetensors, bf16 by default). The tokenizer is a small sentencepiece BPE trained here
on generated text (no downloads): benchmarks send token-id prompts below its vocab size
(printed, and returned by make_checkpoint), so its quality does not matter; its size only
bounds which ids the server samples, not the model's compute (the full lm_head still runs).
It has no byte pieces, so it cannot spell JSON punctuation: structured-output benchmarks
take a real tokenizer instead (`--tokenizer tpaserve/demo/t6-demo`, 8192 tokens, copied).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from bench.presets import BASELINES, PRESETS, model_config
from bench.workload import WORDS
from tpaserve.config import ModelConfig
from tpaserve.models.dense import DenseConfig, DenseLM
from tpaserve.models.loader import resolve_dtype, save_checkpoint
from tpaserve.models.mla import MLA, MLAConfig
from tpaserve.models.t6 import T6

MODEL_CLASS = {ModelConfig: T6, DenseConfig: DenseLM, MLAConfig: MLA}


def train_tokenizer(directory: Path, vocab_size: int = 1000, seed: int = 0) -> int:
    """directory/tokenizer.model; returns its vocab size (<= vocab_size: the corpus bounds it)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    made_up = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    lines = [" ".join(rng.choice(WORDS + tuple(made_up)) for _ in range(rng.randint(4, 16)))
             for _ in range(4000)]
    with open(os.devnull, "w") as quiet:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(directory / "tokenizer"),
            # no byte pieces: every non-special token then decodes to text of its own, so a
            # streamed token is never held back waiting for the rest of a UTF-8 sequence
            model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=False,
            character_coverage=1.0, num_threads=max(1, min(8, os.cpu_count() or 1)),
            logstream=quiet)
    return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).vocab_size()


def copy_tokenizer(src: Path, directory: Path) -> int:
    """src's tokenizer.model (and tokenizer_config.json) into directory; its vocab size."""
    if not (src / "tokenizer.model").is_file():
        raise SystemExit(f"--tokenizer {src}: no tokenizer.model there")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, directory / name)
    return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).vocab_size()


def make_checkpoint(preset: str | ModelConfig | DenseConfig | MLAConfig, out: str | Path, *,
                    max_position: int = 4096, dtype: str = "bfloat16", seed: int = 0,
                    tokenizer_vocab: int = 1000,
                    tokenizer_from: str | Path | None = None) -> dict:
    """Save the checkpoint and tokenizer (trained here, or tokenizer_from's files copied);
    returns {path, vocab_size (tokenizer's), params}. preset: a name, or a config itself."""
    out = Path(out)
    # the longest context the server will accept, whatever the preset or config.json says
    cfg = model_config(preset) if isinstance(preset, str) else preset
    cfg = dataclasses.replace(cfg, max_position=max_position)
    model = MODEL_CLASS[type(cfg)](cfg).init_random(seed=seed).to(resolve_dtype(dtype, "cpu"))
    save_checkpoint(model, out, format="safetensors")
    params = sum(p.numel() for p in model.parameters())
    del model
    if tokenizer_from is None:
        vocab = train_tokenizer(out, tokenizer_vocab, seed)
    else:
        vocab = copy_tokenizer(Path(tokenizer_from), out)
        if vocab > cfg.vocab_size:
            raise SystemExit(f"--tokenizer has {vocab} tokens, more than the model's "
                             f"{cfg.vocab_size}")
    return dict(path=str(out), model=cfg.name, vocab_size=vocab, params=params,
                max_position=max_position)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.make_random_checkpoint",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="t6-medium",
                    help=f"{', '.join(PRESETS + BASELINES)}, or a config.json to copy the shape "
                    "of")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-position", type=int, default=4096,
                    help="config block_size: the longest context the server will accept")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-vocab", type=int, default=1000)
    ap.add_argument("--tokenizer", help="copy this directory's sentencepiece tokenizer "
                    "instead of training one (e.g. tpaserve/demo/t6-demo)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(16, os.cpu_count() or 1)))
    info = make_checkpoint(args.preset, args.out, max_position=args.max_position,
                           dtype=args.dtype, seed=args.seed, tokenizer_vocab=args.tokenizer_vocab,
                           tokenizer_from=args.tokenizer)
    print(f"{info['model']} ({info['params'] / 1e6:.0f}M parameters, random) -> {info['path']}; "
          f"tokenizer vocab {info['vocab_size']}: send token ids below it")
    return info


if __name__ == "__main__":
    main()
