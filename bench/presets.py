"""The paper's T6 sizes (../shared/TPA.md section 2) as ModelConfigs, by name, and the
medium-size baselines the paper trains beside T6-medium (bench/family.py's twins).

d_h = 64, R_Q = 6, R_K = R_V = 2, vocab 50304 (GPT-2 BPE padded) for every size; the
"-kvonly" variants have plain queries and fewer heads. Used by capacity.py, the baselines
and make_random_checkpoint.py so the suite's model is the one the tables describe.

The medium baselines (24 layers, d_model 1024, d_h 64) keep the attention parameters of
MHA-16 (4 d_model^2): query heads + kv heads = 32, so MHA 16/16, GQA 28/4, GQA 30/2 (the
authors' medium GQA config: group_size 15), MQA 31/1. MLA-medium is what the authors'
llama-mla builds for medium: 23 heads, their class defaults q_lora 512, kv_lora 256, rope 32
(their train script never passes the MLA sizes; docs/model_family.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpaserve.config import ModelConfig
from tpaserve.models.dense import DenseConfig
from tpaserve.models.loader import load_config
from tpaserve.models.mla import MLAConfig

VOCAB = 50304
# name: (n_layer, d_model, h for T6, h for T6-KVonly)
_SIZES = {"small": (12, 768, 34, 22), "medium": (24, 1024, 47, 29),
          "large": (36, 1280, 61, 37), "xl": (48, 1600, 78, 47)}


def _preset(size: str, kv_only: bool, max_position: int) -> ModelConfig:
    n_layer, d_model, h, h_kv = _SIZES[size]
    return ModelConfig(n_layer=n_layer, n_head=h_kv if kv_only else h, head_dim=64,
                       n_embd=d_model, vocab_size=VOCAB, k_rank=2, v_rank=2,
                       q_rank=None if kv_only else 6, max_position=max_position,
                       name=f"t6-{size}" + ("-kvonly" if kv_only else ""))


# name: (query heads, kv heads) at medium size
_DENSE_MEDIUM = {"mha16-medium": (16, 16), "gqa4-medium": (28, 4), "gqa2-medium": (30, 2),
                 "mqa-medium": (31, 1)}
PRESETS = tuple(f"t6-{s}{k}" for s in _SIZES for k in ("", "-kvonly"))
BASELINES = (*_DENSE_MEDIUM, "mla-medium")


def _baseline(name: str, max_position: int) -> DenseConfig | MLAConfig:
    n_layer, d_model, _, _ = _SIZES["medium"]
    if name == "mla-medium":
        return MLAConfig(n_layer=n_layer, n_head=23, n_embd=d_model, vocab_size=VOCAB,
                         q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64,
                         qk_rope_head_dim=32, v_head_dim=64, max_position=max_position,
                         name=name)
    h, kv = _DENSE_MEDIUM[name]
    return DenseConfig(n_layer=n_layer, n_head=h, n_kv_head=kv, head_dim=64, n_embd=d_model,
                       vocab_size=VOCAB, max_position=max_position, name=name)


def model_config(name_or_path: str,
                 max_position: int = 1024) -> ModelConfig | DenseConfig | MLAConfig:
    """A preset name (t6-small ... t6-xl[-kvonly], or a medium baseline: mha16-medium,
    gqa4-medium, gqa2-medium, mqa-medium, mla-medium) or a checkpoint directory / config.json."""
    if name_or_path in BASELINES:
        return _baseline(name_or_path, max_position)
    if name_or_path in PRESETS:
        size = name_or_path.removeprefix("t6-").removesuffix("-kvonly")
        return _preset(size, name_or_path.endswith("-kvonly"), max_position)
    path = Path(name_or_path)
    if path.is_dir():                       # a checkpoint: the loader's own reading of it
        return load_config(path)
    if path.is_file() and path.suffix == ".json":
        # A bare config.json: no weight keys to tell T6-KVonly, so q_rank decides.
        raw = json.loads(path.read_text())
        return ModelConfig(n_layer=raw["n_layer"], n_head=raw["n_head"],
                           head_dim=raw["head_dim"], n_embd=raw["n_embd"],
                           vocab_size=raw["vocab_size"],
                           k_rank=raw.get("k_rank", raw.get("rank")),
                           v_rank=raw.get("v_rank", raw.get("rank")), q_rank=raw.get("q_rank"),
                           max_position=raw.get("block_size", max_position), name=path.stem)
    raise ValueError(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                     "checkpoint directory or config.json")


def baseline_parser(prog: str, description: str | None, model_help: str) -> argparse.ArgumentParser:
    """The flags both baselines take, so their rows line up with bench.serve's."""
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="t6-medium", help=model_help)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", default="1", help="comma list: one row per batch size")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="OUT")
    return ap
