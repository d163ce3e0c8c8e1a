"""The GPU tile and split choices (decode_config, mla_config, num_splits_for) as measured
on the H200 (docs/kernel_notes.md): pure host functions, checked here with the interpreter
switch off and the SM count the H200 reports, so a change to a measured default is a
visible test change."""
from __future__ import annotations

import pytest
import torch

from tpaserve.kernels import _validate as v
from tpaserve.kernels import decode
from tpaserve.kernels.decode import DecodeConfig, decode_config, num_splits_for, wave_splits
from tpaserve.kernels.mla_decode import mla_config

H200_SMS = 132


@pytest.fixture
def gpu_choices(monkeypatch):
    monkeypatch.setattr(v, "INTERPRET", False)
    monkeypatch.setattr(decode, "_sm_count", lambda index: H200_SMS)


@pytest.mark.parametrize("h,n_kv,batch,want", [
    (16, 16, 64, DecodeConfig(16, 16, 4, 2)),                  # MHA: 16-head blocks
    (32, 8, 64, DecodeConfig(16, 16, 1, 5)),                   # GQA-4: 1-warp blocks
    (64, 8, 64, DecodeConfig(16, 16, 1, 5)),                   # groups of 8
    (30, 2, 64, DecodeConfig(16, 16, 1, 5, kv_grid=True)),     # groups of 15: kv grid
    (64, 2, 16, DecodeConfig(16, 16, 1, 5, kv_grid=True)),     # groups of 32
    (31, 1, 64, DecodeConfig(32, 16, 1, 5)),                   # MQA: paper shape program
    (16, 16, 1, DecodeConfig(16, 16, 1, 5, kv_grid=True)),     # batch < 16: kv grid
    (31, 1, 8, DecodeConfig(16, 16, 1, 5, kv_grid=True)),
])
def test_const_a_tiles(gpu_choices, h, n_kv, batch, want):
    assert decode_config(h, 64, n_kv, n_kv, 16, batch, const_a=True) == want


def test_t6_tiles_unchanged(gpu_choices):
    assert decode_config(47, 64, 2, 2, 16, 64) == DecodeConfig(16, 16, 1, 5)
    assert decode_config(47, 64, 2, 2, 16, 1).num_warps == 2
    assert decode_config(32, 64, 1, 1, 16, 64) == DecodeConfig(32, 16, 1, 5)
    assert decode_config(32, 64, 1, 1, 32, 64) == DecodeConfig(32, 32, 1, 5)


def test_wave_splits():
    # 64 one-program sequences on 132 slots: 2 and 4 splits both take whole waves; 5 takes
    # three waves for 2.4 waves of work (measured 45% slower than 4)
    assert wave_splits(64, 5, 132) == 4
    assert wave_splits(64, 8, 132) == 8
    assert wave_splits(16, 17, 132) == 16
    assert wave_splits(1, 64, 132) == 64
    assert wave_splits(300, 1, 132) == 1
    for p in range(1, 200, 7):
        for m in (1, 3, 9, 33, 64):
            s = wave_splits(p, m, 132)
            assert 1 <= s <= m


@pytest.mark.parametrize("h,kv_lora,batch,ctx,want_bn,want_splits", [
    (23, 256, 64, 32768, 128, 4),    # the medium twin: measured 0.449 ms at 4 splits
    (16, 512, 64, 32768, 32, 4),     # DeepSeek-V2-Lite's latent: 0.722 ms at 4
    (23, 256, 16, 32768, 128, 16),
    (23, 256, 1, 4096, 128, 32),     # capped at max_seq_len / 128
])
def test_mla_tiles_and_splits(gpu_choices, h, kv_lora, batch, ctx, want_bn, want_splits):
    cfg = mla_config(h, kv_lora, batch)
    assert cfg.block_n == want_bn and cfg.num_warps == 4 and cfg.resident_per_sm == 1
    assert num_splits_for(batch, h, ctx, cfg, torch.device("cuda", 0)) == want_splits
