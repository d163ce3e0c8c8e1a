"""bench/make_random_checkpoint.py writes the authors' MLA baseline: the mla-medium preset's
shape and its latent cache's size (the engine's spec), and a checkpoint that copies an MLA
checkpoint's shape loads as MLA through the engine's loader."""
from __future__ import annotations

import torch

from bench import make_random_checkpoint
from bench.presets import model_config
from tpaserve.models.loader import load, save_checkpoint
from tpaserve.models.mla import MLA, MLAConfig
from tpaserve.runner.factor_cache import FactorCacheSpec


def test_mla_medium_preset():
    cfg = model_config("mla-medium", max_position=4096)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (
        24, 1024, 23, 256, 32)
    spec = FactorCacheSpec.from_model(cfg, torch.bfloat16, 16)
    assert spec.bytes_per_token == 24 * 288 * 2
    assert spec.mha_bytes_per_token == 24 * 23 * (96 + 64) * 2          # 12.8x the latent


def test_checkpoint_copying_an_mla_shape_loads_as_mla(tmp_path):
    small = MLA(MLAConfig(n_layer=1, n_head=3, n_embd=16, vocab_size=1100, q_lora_rank=8,
                          kv_lora_rank=6, qk_nope_head_dim=4, qk_rope_head_dim=2,
                          v_head_dim=4))
    src = save_checkpoint(small.init_random(0), tmp_path / "src")
    info = make_random_checkpoint.make_checkpoint(str(src), tmp_path / "ckpt", max_position=64,
                                                  tokenizer_vocab=300)
    model = load(info["path"], dtype="float32", device="cpu")
    assert isinstance(model, MLA) and model.cfg.kv_lora_rank == 6
    assert model.cfg.max_position == 64
