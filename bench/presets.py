"""The paper's T6 sizes (../shared/TPA.md section 2) as ModelConfigs, by name.

d_h = 64, R_Q = 6, R_K = R_V = 2, vocab 50304 (GPT-2 BPE padded) for every size; the
"-kvonly" variants have plain queries and fewer heads. Used by capacity.py, the baselines
and make_random_checkpoint.py so the suite's model is the one the tables describe.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpaserve.config import ModelConfig
from tpaserve.models.loader import load_config

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


PRESETS = tuple(f"t6-{s}{k}" for s in _SIZES for k in ("", "-kvonly"))


def model_config(name_or_path: str, max_position: int = 1024) -> ModelConfig:
    """A preset name (t6-small ... t6-xl[-kvonly]) or a checkpoint directory / config.json."""
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
