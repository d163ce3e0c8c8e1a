"""Loading and writing the authors' checkpoint directories (../shared/TPA.md section 3): T6
and T6-KVonly, and the paper's baselines llama-mha / llama-gqa (MQA) / llama-mla.

A checkpoint is a directory: config.json plus the weights in one of, by preference,
    model.safetensors | model.safetensors.index.json (shards) |
    pytorch_model.bin | pytorch_model.bin.index.json (shards)
Rules, decided once here:
- The variant is decided by the weight KEYS (models/family.py: c_qkv.c_q.weight => KVonly,
  attn.c_k => MHA/GQA, attn.kv_a_proj_with_mqa => MLA), not the config: the authors save
  them all as model_type "gpt2", and their KVonly configs may still carry q_rank.
- RoPE tables: as the checkpoint was trained (config.json rope_table_dtype; absent = the
  authors' bf16-rounded tables) unless rope_tables="exact" (--rope-tables exact) asks fp32.
- load() returns what the paged engine serves: every variant (T6 / T6-KVonly, MHA / GQA /
  MQA as non-contextual TPA, MLA with its latent cache: runner/factor_cache.py); load_any()
  is the same loader under the name the full-recompute tools use.
- Keys may carry torch.compile's `_orig_mod.` prefix; it is stripped.
- lm_head.weight is the tied embedding: it may be absent, present alongside
  transformer.wte.weight (same shape required; if the values differ we warn and keep wte,
  since the model ties them), or present alone (then it is the embedding).
- Keys whose last name is a known non-parameter buffer (IGNORED_BUFFERS: rotary caches,
  nanoGPT's causal-mask `attn.bias`) are ignored. Anything else the model lacks is an error.
- .bin files are read with torch.load(weights_only=True) only: never arbitrary unpickling.
Loading builds the model on the meta device, checks every key and shape before reading any
data, then reads one tensor at a time, casting it and moving it to the device, so at most one
source tensor is alive next to the target-dtype model.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tpaserve.config import ROPE_TABLES
from tpaserve.exceptions import CheckpointError, ConfigError
from tpaserve.models.decoder import DecoderLM
from tpaserve.models.dense import DenseConfig, DenseLM
from tpaserve.models.family import FamilyConfig, describe, read_config
from tpaserve.models.files import (  # noqa: F401
    BIN,
    BIN_INDEX,
    CONFIG_FILE,
    SAFETENSORS,
    SAFETENSORS_INDEX,
    WEIGHT_FILES,
)
from tpaserve.models.layers import Rotary
from tpaserve.models.mla import MLA, MLAConfig
from tpaserve.models.t6 import T6

COMPILED_PREFIX = "_orig_mod."
EMBEDDING, LM_HEAD = "transformer.wte.weight", "lm_head.weight"
# Last dotted names of buffers the authors' modules may have saved; never parameters.
# "bias" is only a buffer directly under attn (the causal mask); attn.c_proj.bias is a bias.
IGNORED_BUFFERS = ("inv_freq", "cos_cached", "sin_cached", "freqs_cis", "masked_bias")
IGNORED_ATTN_BUFFERS = ("attn.bias",)
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
          "fp32": torch.float32, "float": torch.float32}
MAX_LISTED = 20                                       # problems listed in one error message
logger = logging.getLogger("tpaserve.models")


def model_class(cfg: FamilyConfig) -> type[DecoderLM]:
    return DenseLM if isinstance(cfg, DenseConfig) else MLA if isinstance(cfg, MLAConfig) else T6


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """"auto" -> bf16 on cuda, fp32 elsewhere; names and aliases in DTYPES; a floating
    torch.dtype passes through (tests use float64)."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"--dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if resolve_device(device).startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r} is not supported; choose one of: auto, "
                          + ", ".join(DTYPES))
    return DTYPES[dtype]


# ---------------------------------------------------------------------------- reading

def _weight_files(root: Path) -> list[Path]:
    """The files holding the weights, for the first format found in WEIGHT_FILES."""
    for name in WEIGHT_FILES:
        f = root / name
        if not f.is_file():
            continue
        if not name.endswith(".index.json"):
            return [f]
        try:
            weight_map = json.loads(f.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{f}: not a shard index with a weight_map ({e!r})") from e
        shards = [root / s for s in sorted(set(weight_map.values()))]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise CheckpointError(f"{f} names shard files that do not exist: {absent}")
        return shards
    raise CheckpointError(f"no weights in {root}: looked for " + ", ".join(WEIGHT_FILES))


def _torch_load(f: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:                 # legacy (pre-zip) format cannot be mmapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; keep its one line that names the object.
        m = re.search(r"Unpickler error:\s*(.+?)(\.\s|\n|$)", str(e))
        reason = m.group(1) if m else type(e).__name__
        raise CheckpointError(
            f"{f}: refused to unpickle arbitrary objects: tpaserve reads .bin weights with "
            f"torch.load(weights_only=True) and this file holds more than tensors ({reason}). "
            "Save a plain state dict, or convert it to model.safetensors.") from e
    except (RuntimeError, OSError, EOFError) as e:
        raise CheckpointError(f"{f}: cannot read as a torch state dict: {e}") from e
    if not isinstance(sd, dict):
        raise CheckpointError(f"{f}: expected a state dict (name -> tensor), "
                              f"found {type(sd).__name__}")
    for k, v in sd.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{f}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return sd


def _shapes(f: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of one weight file, without reading tensor data."""
    if f.suffix == ".safetensors":
        try:
            with safe_open(f, framework="pt") as st:
                return {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
        except Exception as e:   # safetensors raises its own SafetensorError for bad headers
            raise CheckpointError(f"{f}: cannot read as safetensors: {e}") from e
    return {k: tuple(v.shape) for k, v in _torch_load(f).items()}


def _tensors(f: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if f.suffix == ".safetensors":
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                yield k, st.get_tensor(k)
    else:
        yield from _torch_load(f).items()


def _canonical(key: str) -> str | None:
    """Checkpoint key -> parameter name, or None for an ignored buffer."""
    key = key.removeprefix(COMPILED_PREFIX)
    if key.rsplit(".", 1)[-1] in IGNORED_BUFFERS or key.endswith(IGNORED_ATTN_BUFFERS):
        return None
    return key


def _index(root: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Parameter name -> (file, key in file, shape), over all weight files."""
    index: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in _weight_files(root):
        for key, shape in _shapes(f).items():
            name = _canonical(key)
            if name is None:
                continue
            if name in index:
                raise CheckpointError(f"tensor {name!r} appears twice: as {index[name][1]!r} "
                                      f"in {index[name][0].name} and as {key!r} in {f.name}")
            index[name] = (f, key, shape)
    return index


# ---------------------------------------------------------------------------- config

def _config(root: Path, index: dict) -> FamilyConfig:
    return read_config(root, {name: shape for name, (_, _, shape) in index.items()})


def load_config(path: str | Path) -> FamilyConfig:
    """The checkpoint's config (ModelConfig for T6; DenseConfig / MLAConfig otherwise)."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} is not a directory")
    return _config(root, _index(root))


def rope_tables_line(cfg: FamilyConfig, rope_tables: str) -> str:
    """The start-up log line saying which RoPE tables the model runs with, and why."""
    if cfg.rope_table_dtype == "bfloat16":
        return ("RoPE tables: fp32 rounded to bfloat16, as the checkpoint was trained (the "
                "authors' Rotary); --rope-tables exact for fp32 tables")
    why = "--rope-tables exact" if rope_tables == "exact" else "config.json rope_table_dtype"
    return f"RoPE tables: exact fp32 ({why})"


# ---------------------------------------------------------------------------- loading

def _check(index: dict, expected: dict[str, tuple[int, ...]], root: Path, cfg: FamilyConfig):
    """One CheckpointError listing every missing, unexpected or mis-shaped tensor."""
    def shape(s):
        return "(" + ", ".join(map(str, s)) + ")"
    problems = []
    if LM_HEAD in index and index[LM_HEAD][2] != expected[EMBEDDING]:
        problems.append(f"tensor {LM_HEAD!r} (tied to {EMBEDDING}): expected shape "
                        f"{shape(expected[EMBEDDING])}, found {shape(index[LM_HEAD][2])}")
    for name, exp in expected.items():
        if name not in index:
            problems.append(f"missing tensor {name!r}: expected shape {shape(exp)}, found none")
        elif index[name][2] != exp:
            problems.append(f"tensor {name!r}: expected shape {shape(exp)}, "
                            f"found {shape(index[name][2])}")
    for name in sorted(index.keys() - expected.keys() - {LM_HEAD}):
        problems.append(f"unexpected tensor {name!r}: expected none, "
                        f"found shape {shape(index[name][2])}")
    if problems:
        more = len(problems) - MAX_LISTED
        kind, _, shape_ = describe(cfg).partition(" ")
        raise CheckpointError(
            f"checkpoint {root} does not match {kind} as its config describes it {shape_}:\n  "
            + "\n  ".join(problems[:MAX_LISTED]) + (f"\n  ... and {more} more" if more > 0 else ""))


def load(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto",
         rope_tables: str = "trained") -> DecoderLM:
    """Checkpoint directory -> T6, DenseLM (MHA / GQA / MQA) or MLA in eval mode, no grads,
    weights in dtype on device: what the paged engine serves (all of load_any's variants).
    rope_tables: "trained" | "exact" (config.ROPE_TABLES)."""
    return load_any(path, dtype, device, rope_tables)


def load_any(path: str | Path, dtype: str | torch.dtype = "auto", device: str = "auto",
             rope_tables: str = "trained") -> DecoderLM:
    """Checkpoint directory -> T6 | DenseLM | MLA (models/family.py decides) in eval mode,
    no grads, weights in dtype on device."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} is not a directory")
    if rope_tables not in ROPE_TABLES:
        raise ConfigError(f"--rope-tables must be one of {', '.join(ROPE_TABLES)}, "
                          f"got {rope_tables!r}")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    index = _index(root)
    cfg = _config(root, index)
    if rope_tables == "exact":
        cfg = dataclasses.replace(cfg, rope_table_dtype="float32")
    with torch.device("meta"):
        model = model_class(cfg)(cfg)
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # lm_head is wte
    if LM_HEAD in index and EMBEDDING not in index:
        index[EMBEDDING] = index.pop(LM_HEAD)       # only the head was saved: it is wte
    _check(index, expected, root, cfg)

    wanted = {(f, key): name for name, (f, key, _) in index.items()}
    head = None                                     # lm_head copy, compared with wte at the end
    for f in dict.fromkeys(f for f, _ in wanted):
        for key, t in _tensors(f):
            name = wanted.get((f, key))
            if name is None:
                continue                            # an ignored buffer
            if not t.is_floating_point():
                raise CheckpointError(f"{f.name}: tensor {key!r} has dtype {t.dtype}, "
                                      "expected floating point")
            t = t.to(device=device, dtype=dtype, copy=True).contiguous()  # detach from mmap
            if name == LM_HEAD:
                head = t
                continue
            mod, _, leaf = name.rpartition(".")
            model.get_submodule(mod)._parameters[leaf] = nn.Parameter(t, requires_grad=False)
            del t
    model.lm_head.weight = model.transformer.wte.weight                  # re-tie
    if head is not None and not torch.equal(head, model.transformer.wte.weight):
        warnings.warn(f"{root}: lm_head.weight differs from transformer.wte.weight; the "
                      "model ties them, so the embedding is used for both", stacklevel=2)
    # The only buffer: RoPE frequencies, rebuilt in fp32 (never cast to the weight dtype).
    model.rotary = Rotary(model.rope_dim(cfg), cfg.rope_base, cfg.rope_table_dtype)
    logger.info("%s: %s; %s", root.name, describe(cfg), rope_tables_line(cfg, rope_tables))
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------- writing

def _authors_config(cfg: FamilyConfig) -> dict:
    """config.json as the authors' train script writes it for this variant, plus
    rope_table_dtype (which their checkpoints lack: bf16-rounded is implied)."""
    raw = dict(model_type="gpt2", n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
               vocab_size=cfg.vocab_size, block_size=cfg.max_position,
               using_groupnorm=cfg.using_groupnorm, bias=False, dropout=0.0)
    if isinstance(cfg, DenseConfig):
        raw["head_dim"] = cfg.head_dim
        if cfg.n_kv_head != cfg.n_head or cfg.head_dim * cfg.n_head != cfg.n_embd:
            raw["group_size"] = cfg.n_head // cfg.n_kv_head       # llama-gqa's config
    elif isinstance(cfg, MLAConfig):
        raw.update(head_dim=cfg.qk_nope_head_dim, q_lora_rank=cfg.q_lora_rank,
                   kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                   v_head_dim=cfg.v_head_dim)
        if cfg.mla_rope != "positions":
            raw["mla_rope"] = cfg.mla_rope
    else:
        raw.update(head_dim=cfg.head_dim, rank=cfg.k_rank)
        if cfg.q_rank is not None:
            raw["q_rank"] = cfg.q_rank
        if cfg.v_rank != cfg.k_rank:
            raw.update(k_rank=cfg.k_rank, v_rank=cfg.v_rank)
    if cfg.rope_base != 10000.0:
        raw["rope_base"] = cfg.rope_base
    raw["rope_table_dtype"] = cfg.rope_table_dtype
    return raw


def save_checkpoint(model: DecoderLM, path: str | Path, format: str = "safetensors",
                    compiled_prefix: bool = False, extra_config: dict | None = None) -> Path:
    """Write `model` as the authors' directory format (tests, demo model, benchmarks).

    format: "bin" (pytorch_model.bin, lm_head.weight kept as the tied duplicate the way a
    pickled state dict holds it), "safetensors" (model.safetensors, lm_head.weight dropped:
    safetensors refuses shared tensors), "sharded" (three model-0000i-of-00003.safetensors
    + model.safetensors.index.json). compiled_prefix prefixes every key with `_orig_mod.`.
    extra_config entries are merged into config.json; an entry set to None removes the field.
    """
    if format not in ("bin", "safetensors", "sharded"):
        raise ValueError(f"format must be bin, safetensors or sharded, got {format!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    raw = _authors_config(model.cfg) | (extra_config or {})
    (root / CONFIG_FILE).write_text(json.dumps({k: v for k, v in raw.items() if v is not None},
                                               indent=2))
    prefix = COMPILED_PREFIX if compiled_prefix else ""
    sd = {prefix + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
          if format == "bin" or k != LM_HEAD}
    if format == "bin":
        torch.save(sd, root / BIN)
    elif format == "safetensors":
        save_file(sd, root / SAFETENSORS, metadata={"format": "pt"})
    else:
        keys = list(sd)
        n = min(3, len(keys))
        weight_map = {}
        for i in range(n):
            shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            part = {k: sd[k] for k in keys[i * len(keys) // n:(i + 1) * len(keys) // n]}
            save_file(part, root / shard, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (root / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return root
