"""Checkpoint loading: every format the authors' code (or a user) may produce loads to the
same logits, bit for bit in fp32; every malformed checkpoint fails with a message that
names what is wrong (key, both shapes, fields, file)."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from tpaserve.config import ConfigError, ModelConfig
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.loader import (
    CheckpointError,
    load,
    load_config,
    resolve_dtype,
    save_checkpoint,
)
from tpaserve.models.t6 import T6

CFGS = {
    "t6": ModelConfig(n_layer=2, n_head=3, head_dim=8, n_embd=16, vocab_size=37, k_rank=2,
                      v_rank=2, q_rank=3, using_groupnorm=True, max_position=128),
    "kvonly": ModelConfig(n_layer=2, n_head=5, head_dim=4, n_embd=12, vocab_size=29, k_rank=1,
                          v_rank=2, q_rank=None, using_groupnorm=False, max_position=64),
}
A_K0 = "transformer.h.0.attn.c_qkv.W_A_k.weight"


@pytest.fixture(params=list(CFGS))
def model(request):
    return T6(CFGS[request.param]).init_random(seed=7, std=0.1).eval()


def logits(m: T6) -> torch.Tensor:
    ids = torch.arange(9) * 5 % m.cfg.vocab_size
    with torch.no_grad():
        return m.compute_logits(m(ids, torch.arange(9), FullSequenceAttention([0, 9])))


def state_dict(m: T6, lm_head=True) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if lm_head or k != "lm_head.weight"}


def write_bin(m: T6, path, sd) -> None:
    """A hand-built checkpoint: the model's config.json, `sd` as pytorch_model.bin."""
    save_checkpoint(m, path, "bin")
    torch.save(sd, path / "pytorch_model.bin")


def assert_same_model(loaded: T6, source: T6) -> None:
    assert loaded.cfg.kv_only == source.cfg.kv_only
    assert torch.equal(logits(loaded), logits(source))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


# ------------------------------------------------------------------ formats

@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("fmt", ["bin", "safetensors", "sharded"])
def test_round_trip_every_format(model, tmp_path, fmt, compiled):
    save_checkpoint(model, tmp_path, fmt, compiled_prefix=compiled)
    if fmt == "sharded":
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 3
        assert all(k.startswith("_orig_mod.") == compiled for k in index["weight_map"])
    loaded = load(tmp_path, dtype="float32", device="cpu")
    assert_same_model(loaded, model)
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.cfg == dataclasses.replace(model.cfg, name=tmp_path.name)


def test_safetensors_with_lm_head_and_bin_without(model, tmp_path):
    save_checkpoint(model, tmp_path / "st", "safetensors")
    save_file(state_dict(model), tmp_path / "st" / "model.safetensors")  # lm_head as a copy
    assert_same_model(load(tmp_path / "st", "fp32", "cpu"), model)
    write_bin(model, tmp_path / "bin", state_dict(model, lm_head=False))
    assert_same_model(load(tmp_path / "bin", "fp32", "cpu"), model)


def test_lm_head_alone_is_the_embedding(model, tmp_path):
    sd = state_dict(model)
    del sd["transformer.wte.weight"]
    write_bin(model, tmp_path, sd)
    assert_same_model(load(tmp_path, "fp32", "cpu"), model)


def test_lm_head_differing_from_embedding_warns_and_keeps_wte(model, tmp_path):
    sd = state_dict(model)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    write_bin(model, tmp_path, sd)
    with pytest.warns(UserWarning, match="lm_head.weight differs from transformer.wte.weight"):
        loaded = load(tmp_path, "fp32", "cpu")
    assert_same_model(loaded, model)


def test_sharded_bin_with_index(model, tmp_path):
    save_checkpoint(model, tmp_path, "bin")
    (tmp_path / "pytorch_model.bin").unlink()
    sd = state_dict(model)
    keys = list(sd)
    shards = {"pytorch_model-00001-of-00002.bin": keys[:5],
              "pytorch_model-00002-of-00002.bin": keys[5:]}
    for name, part in shards.items():
        torch.save({"_orig_mod." + k: sd[k] for k in part}, tmp_path / name)
    weight_map = {"_orig_mod." + k: name for name, part in shards.items() for k in part}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    assert_same_model(load(tmp_path, "fp32", "cpu"), model)


def test_saved_buffers_are_ignored(model, tmp_path):
    sd = state_dict(model)
    for i in range(model.cfg.n_layer):
        sd[f"transformer.h.{i}.attn.rotary.inv_freq"] = torch.ones(model.cfg.head_dim // 2)
        sd[f"transformer.h.{i}.attn.bias"] = torch.ones(1, 1, 8, 8).tril()   # causal mask
    write_bin(model, tmp_path, sd)
    assert_same_model(load(tmp_path, "fp32", "cpu"), model)


def test_kv_only_decided_by_keys_not_q_rank(tmp_path):
    m = T6(CFGS["kvonly"]).init_random(seed=1)
    save_checkpoint(m, tmp_path, extra_config={"q_rank": 6})       # authors' KVonly config
    assert load_config(tmp_path).q_rank is None
    assert_same_model(load(tmp_path, "fp32", "cpu"), m)


def test_load_config_reads_authors_fields(tmp_path):
    m = T6(CFGS["t6"]).init_random()
    save_checkpoint(m, tmp_path, extra_config={"rank": 9, "k_rank": 2, "v_rank": 2,
                                               "block_size": 2048, "dropout": 0.1})
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "gpt2" and raw["bias"] is False
    cfg = load_config(tmp_path)
    assert (cfg.k_rank, cfg.v_rank, cfg.q_rank, cfg.max_position) == (2, 2, 3, 2048)
    assert cfg.using_groupnorm and cfg.name == tmp_path.name


def test_using_groupnorm_absent_is_read_from_keys(tmp_path):
    m = T6(CFGS["t6"]).init_random()
    save_checkpoint(m, tmp_path, extra_config={"using_groupnorm": None})
    assert load_config(tmp_path).using_groupnorm
    assert_same_model(load(tmp_path, "fp32", "cpu"), m)


def test_bf16_load_keeps_rope_in_fp32(tmp_path):
    m = T6(CFGS["t6"]).init_random()
    save_checkpoint(m, tmp_path)
    loaded = load(tmp_path, dtype="bf16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.rotary._inv_freq.dtype == torch.float32
    assert torch.equal(loaded.transformer.wte.weight, m.transformer.wte.weight.bfloat16())


# ------------------------------------------------------------------ malformed checkpoints

def test_missing_tensor_names_key_and_shape(model, tmp_path):
    sd = state_dict(model)
    expected = tuple(sd.pop(A_K0).shape)
    write_bin(model, tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path, "fp32", "cpu")
    assert f"missing tensor '{A_K0}': expected shape {expected}, found none" in str(e.value)


def test_unexpected_tensor_names_key_and_shape(model, tmp_path):
    sd = state_dict(model)
    sd["transformer.h.0.attn.c_proj.bias"] = torch.zeros(model.cfg.n_embd)
    write_bin(model, tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path, "fp32", "cpu")
    assert (f"unexpected tensor 'transformer.h.0.attn.c_proj.bias': expected none, "
            f"found shape ({model.cfg.n_embd})") in str(e.value)


def test_wrong_shape_names_both_shapes(model, tmp_path):
    sd = state_dict(model)
    expected = tuple(sd[A_K0].shape)
    sd[A_K0] = torch.zeros(expected[0] + 1, expected[1])
    write_bin(model, tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path, "fp32", "cpu")
    msg = str(e.value)
    assert f"tensor '{A_K0}': expected shape {expected}, found ({expected[0] + 1}, " in msg
    assert msg.count("\n") == 1                                  # nothing else is reported


def test_lm_head_of_wrong_shape(model, tmp_path):
    sd = state_dict(model)
    sd["lm_head.weight"] = torch.zeros(3, model.cfg.n_embd)
    write_bin(model, tmp_path, sd)
    with pytest.raises(CheckpointError, match=re.escape(
            f"expected shape ({model.cfg.vocab_size}, {model.cfg.n_embd}), "
            f"found (3, {model.cfg.n_embd})")):
        load(tmp_path, "fp32", "cpu")


def test_every_problem_in_one_message(model, tmp_path):
    sd = state_dict(model)
    del sd[A_K0]
    sd["extra.weight"] = torch.zeros(2)
    write_bin(model, tmp_path, sd)
    with pytest.raises(CheckpointError) as e:
        load(tmp_path, "fp32", "cpu")
    assert "missing tensor" in str(e.value) and "unexpected tensor 'extra.weight'" in str(e.value)


def test_missing_config_fields_are_all_named(tmp_path):
    m = T6(CFGS["t6"]).init_random()
    save_checkpoint(m, tmp_path, extra_config={"n_head": None, "rank": None, "q_rank": None,
                                               "block_size": None})
    with pytest.raises(CheckpointError) as e:
        load_config(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "config.json") in msg
    assert "missing fields n_head, block_size, rank, q_rank" in msg


def test_gpt2_config_is_not_t6(tmp_path):
    m = T6(CFGS["t6"]).init_random()
    save_checkpoint(m, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 2, "n_head": 3, "n_embd": 16, "vocab_size": 37,
         "n_positions": 128}))
    with pytest.raises(CheckpointError, match="not a T6 config .*missing fields head_dim, "
                                              "block_size, rank, q_rank"):
        load(tmp_path, "fp32", "cpu")


def test_invalid_config_value_names_file(tmp_path):
    save_checkpoint(T6(CFGS["t6"]).init_random(), tmp_path, extra_config={"head_dim": 7})
    with pytest.raises(CheckpointError, match=r"config\.json: .*head_dim must be even.*7"):
        load_config(tmp_path)


def test_bias_true_refused(tmp_path):
    save_checkpoint(T6(CFGS["t6"]).init_random(), tmp_path, extra_config={"bias": True})
    with pytest.raises(CheckpointError, match="bias=true: tpaserve supports bias-free models only"):
        load(tmp_path, "fp32", "cpu")


class NotATensor:
    pass


def test_unsafe_pickle_refused(tmp_path):
    m = T6(CFGS["t6"]).init_random()
    write_bin(m, tmp_path, {**state_dict(m), "optimizer": NotATensor()})
    with pytest.raises(CheckpointError, match="refused to unpickle arbitrary objects") as e:
        load(tmp_path, "fp32", "cpu")
    assert "NotATensor" in str(e.value)


def test_pickle_of_non_tensor_entry(tmp_path):
    m = T6(CFGS["t6"]).init_random()
    write_bin(m, tmp_path, {**state_dict(m), "step": 100})
    with pytest.raises(CheckpointError, match="entry 'step' is a int, not a tensor"):
        load(tmp_path, "fp32", "cpu")


def test_no_weight_files_lists_names_looked_for(tmp_path):
    save_checkpoint(T6(CFGS["t6"]).init_random(), tmp_path, "safetensors")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load(tmp_path, "fp32", "cpu")
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        assert name in str(e.value)


def test_index_naming_absent_shard(tmp_path):
    save_checkpoint(T6(CFGS["t6"]).init_random(), tmp_path, "sharded")
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        load(tmp_path, "fp32", "cpu")


def test_not_a_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        load(tmp_path / "nope", "fp32", "cpu")
    save_checkpoint(T6(CFGS["t6"]).init_random(), tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json in"):
        load(tmp_path, "fp32", "cpu")


# ------------------------------------------------------------------ dtypes

@pytest.mark.parametrize("name,device,want", [
    ("auto", "cpu", torch.float32), ("auto", "cuda", torch.bfloat16),
    ("auto", "cuda:1", torch.bfloat16), ("bfloat16", "cpu", torch.bfloat16),
    ("bf16", "cpu", torch.bfloat16), ("float16", "cpu", torch.float16),
    ("fp16", "cuda", torch.float16), ("half", "cpu", torch.float16),
    ("float32", "cuda", torch.float32), ("fp32", "cpu", torch.float32),
    ("float", "cpu", torch.float32), (torch.float64, "cpu", torch.float64),
])
def test_resolve_dtype(name, device, want):
    assert resolve_dtype(name, device) == want


def test_resolve_dtype_rejects_with_choices():
    with pytest.raises(ValueError) as e:
        resolve_dtype("int8", "cpu")
    assert isinstance(e.value, ConfigError)
    assert "'int8'" in str(e.value)
    for choice in ("auto", "bfloat16", "bf16", "float16", "fp16", "half", "float32", "fp32"):
        assert choice in str(e.value)
    with pytest.raises(ConfigError, match="floating-point"):
        resolve_dtype(torch.int32, "cpu")
