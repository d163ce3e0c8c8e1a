"""Which member of the paper's family a checkpoint holds, and its config, from config.json's
fields and the state dict's parameter names and shapes (no tensor data is read).

The authors save every variant as model_type "gpt2" with the same core fields (n_layer,
n_head, head_dim, n_embd, vocab_size, block_size, rank, q_rank, using_groupnorm, bias,
dropout), so the *keys* decide (layer-0 names, `_orig_mod.` already stripped):
    attn.c_qkv.W_A_k.weight          T6 (attn.c_qkv.c_q.weight too: T6-KVonly)
    attn.c_k.weight                  llama-gqa if config.json has group_size (n_kv = n_head /
                                     group_size; MQA when that is 1), else llama-mha
    attn.kv_a_proj_with_mqa.weight   llama-mla
Nothing recognised: T6, so the loader's shape check names the missing T6 tensors.

RoPE tables (config.json `rope_table_dtype`): absent means the authors' code, whose Rotary
rounds cos/sin to bfloat16; tpaserve's save_checkpoint writes the field.
"""
from __future__ import annotations

import json
from pathlib import Path

from tpaserve.config import ConfigError, ModelConfig
from tpaserve.exceptions import CheckpointError
from tpaserve.models.dense import DenseConfig
from tpaserve.models.mla import MLAConfig

FamilyConfig = ModelConfig | DenseConfig | MLAConfig
KV_ONLY_QUERY = "attn.c_qkv.c_q.weight"
DENSE_KEY, MLA_KEY = "attn.c_k.weight", "attn.kv_a_proj_with_mqa.weight"
REQUIRED_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")
T6_FIELDS = ("n_layer", "n_head", "head_dim", "n_embd", "vocab_size", "block_size")
AUTHORS_ROPE_TABLES = "bfloat16"            # what the authors' Rotary feeds every checkpoint


def variant_of(shapes: dict[str, tuple[int, ...]]) -> str:
    """"t6" | "dense" | "mla" from parameter names (any layer)."""
    if any(n.endswith(MLA_KEY) for n in shapes):
        return "mla"
    if any(n.endswith(DENSE_KEY) and ".c_qkv." not in n for n in shapes):
        return "dense"
    return "t6"


def describe(cfg: FamilyConfig) -> str:
    """One phrase naming the variant and its shape, for errors and the start-up log."""
    if isinstance(cfg, DenseConfig):
        return (f"{cfg.variant.upper()} (n_layer={cfg.n_layer}, n_head={cfg.n_head}, "
                f"n_kv_head={cfg.n_kv_head}, head_dim={cfg.head_dim}, n_embd={cfg.n_embd})")
    if isinstance(cfg, MLAConfig):
        return (f"MLA (n_layer={cfg.n_layer}, n_head={cfg.n_head}, n_embd={cfg.n_embd}, "
                f"q_lora_rank={cfg.q_lora_rank}, kv_lora_rank={cfg.kv_lora_rank}, "
                f"head_dim={cfg.qk_nope_head_dim}+{cfg.qk_rope_head_dim} rope, "
                f"v_head_dim={cfg.v_head_dim}"
                + (", RoPE by head index: the older llama-mla.py)"
                   if cfg.mla_rope == "head_index" else ")"))
    return (f"{'T6-KVonly' if cfg.kv_only else 'T6'} (n_layer={cfg.n_layer}, "
            f"n_head={cfg.n_head}, head_dim={cfg.head_dim}, n_embd={cfg.n_embd}, "
            f"ranks q/k/v={cfg.q_rank}/{cfg.k_rank}/{cfg.v_rank})")


def read_config(root: Path, shapes: dict[str, tuple[int, ...]]) -> FamilyConfig:
    """config.json + parameter shapes -> the variant's config. CheckpointError (one line)
    names the file and what is missing or inconsistent."""
    f = root / "config.json"
    if not f.is_file():
        raise CheckpointError(f"no config.json in {root}")
    try:
        raw = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{f}: expected a JSON object, found {type(raw).__name__}")
    variant = variant_of(shapes)
    build = {"t6": _t6, "dense": _dense, "mla": _mla}[variant]
    groupnorm = raw.get("using_groupnorm")
    if groupnorm is None:                           # absent: the subln weights tell
        groupnorm = any(n.endswith("attn.subln.weight") for n in shapes)
    common = dict(vocab_size=raw.get("vocab_size"), max_position=raw.get("block_size"),
                  using_groupnorm=bool(groupnorm),
                  rope_base=float(raw.get("rope_base", 10000.0)),
                  rope_table_dtype=raw.get("rope_table_dtype", AUTHORS_ROPE_TABLES),
                  name=str(raw.get("name", root.resolve().name)))
    try:
        cfg = build(raw, shapes, f, common)
    except ConfigError as e:
        raise CheckpointError(f"{f}: {e}") from e
    if raw.get("bias", False):
        raise CheckpointError(f"{f} has bias=true: tpaserve supports bias-free models only "
                              "(the authors' models are trained with bias=false)")
    return cfg


def _missing(raw: dict, fields, f: Path, kind: str, extra: list[str] = ()) -> None:
    missing = [k for k in fields if k not in raw] + list(extra)
    if missing:
        raise CheckpointError(f"{f} is not a {kind} config (model_type "
                              f"{raw.get('model_type')!r}): missing fields {', '.join(missing)}")


def _t6(raw: dict, shapes, f: Path, common: dict) -> ModelConfig:
    kv_only = any(n.endswith(KV_ONLY_QUERY) for n in shapes)   # the keys decide, not q_rank
    extra = []
    if "rank" not in raw and not ("k_rank" in raw and "v_rank" in raw):
        extra.append("rank")
    if not kv_only and "q_rank" not in raw:
        extra.append("q_rank")
    _missing(raw, T6_FIELDS, f, "T6", extra)
    return ModelConfig(
        n_layer=raw["n_layer"], n_head=raw["n_head"], head_dim=raw["head_dim"],
        n_embd=raw["n_embd"], k_rank=raw.get("k_rank", raw.get("rank")),
        v_rank=raw.get("v_rank", raw.get("rank")), q_rank=None if kv_only else raw["q_rank"],
        **common)


def _dense(raw: dict, shapes, f: Path, common: dict) -> DenseConfig:
    n_head = raw.get("n_head")
    if "group_size" in raw:                 # llama-gqa: head_dim from config.json
        _missing(raw, REQUIRED_FIELDS + ("head_dim", "group_size"), f, "llama-gqa")
        g = raw["group_size"]
        if not isinstance(g, int) or g < 1 or n_head % g:
            raise CheckpointError(f"{f}: group_size {g!r} must divide n_head {n_head} (the "
                                  f"authors' llama-gqa repeats each kv head group_size times)")
        n_kv, head_dim = n_head // g, raw["head_dim"]
    else:                                   # llama-mha: head_dim = n_embd // n_head
        _missing(raw, REQUIRED_FIELDS, f, "llama-mha")
        if raw["n_embd"] % n_head:
            raise CheckpointError(f"{f}: n_embd {raw['n_embd']} is not a multiple of n_head "
                                  f"{n_head} (the authors' llama-mha uses head_dim = n_embd / "
                                  f"n_head; a GQA checkpoint would carry group_size)")
        n_kv, head_dim = n_head, raw["n_embd"] // n_head
    return DenseConfig(n_layer=raw["n_layer"], n_head=n_head, n_kv_head=n_kv,
                       head_dim=head_dim, n_embd=raw["n_embd"], **common)


def _mla(raw: dict, shapes, f: Path, common: dict) -> MLAConfig:
    """The latent sizes: config.json's fields if present, else layer 0's shapes (the authors'
    train script does not pass them to the config, so their saved config.json lacks them)."""
    _missing(raw, REQUIRED_FIELDS + ("head_dim",), f, "llama-mla")
    pre = "transformer.h.0.attn."
    need = [pre + k for k in ("q_a_proj.weight", "kv_a_proj_with_mqa.weight",
                              "kv_a_layernorm.weight", "c_proj.weight")]
    absent = [k for k in need if k not in shapes]
    if absent:
        raise CheckpointError(f"{f.parent}: an MLA checkpoint (it has {MLA_KEY}) but the "
                              f"tensors that give its sizes are missing: {', '.join(absent)}")
    q_lora, kv_a, kv_lora, proj = (shapes[k] for k in need)
    n_head = raw["n_head"]
    if proj[1] % n_head:
        raise CheckpointError(f"{f.parent}: {need[3]} has {proj[1]} inputs, not a multiple "
                              f"of n_head {n_head}")
    sizes = dict(q_lora_rank=q_lora[0], kv_lora_rank=kv_lora[0],
                 qk_rope_head_dim=kv_a[0] - kv_lora[0], v_head_dim=proj[1] // n_head)
    for k, v in sizes.items():
        if k in raw and raw[k] != v:
            raise CheckpointError(f"{f}: {k} is {raw[k]} but the weights say {v}")
    return MLAConfig(n_layer=raw["n_layer"], n_head=n_head, n_embd=raw["n_embd"],
                     qk_nope_head_dim=raw["head_dim"],
                     mla_rope=raw.get("mla_rope", "positions"), **sizes, **common)
