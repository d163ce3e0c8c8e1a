"""Capacity arithmetic (T6-medium against TPA.md's numbers, FactorCacheSpec as the source)
and --verify against the stub server's /metrics."""
import asyncio
import json

import pytest
import torch

from bench import capacity
from bench.presets import PRESETS, model_config
from tpaserve.runner.factor_cache import FactorCacheSpec

# TPA.md section 2: numbers per token per layer, TPA and the same-size MHA
PAPER = {"t6-small": (392, 1536), "t6-medium": (444, 2048), "t6-large": (500, 2560),
         "t6-xl": (568, 3200)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_match_the_paper_table(name):
    spec = FactorCacheSpec.from_model(model_config(name), torch.bfloat16, 16)
    tpa, mha = capacity.layouts(spec, [])
    assert (tpa.elems_per_token_layer, mha.elems_per_token_layer) == PAPER[name]
    assert model_config(name + "-kvonly").factor_elems_per_token_layer == PAPER[name][0] - 4 * (
        model_config(name).n_head - model_config(name + "-kvonly").n_head)
    assert set(PRESETS) >= {name, name + "-kvonly"}


def test_t6_medium_capacity():
    spec = FactorCacheSpec.from_model(model_config("t6-medium"), torch.bfloat16, 16)
    assert spec.bytes_per_token == 24 * 444 * 2 == 21312
    tpa, mha, gqa4, gqa2 = capacity.layouts(spec, [4, 2])
    assert tpa.bytes_per_token == spec.bytes_per_token               # one source
    assert mha.name == "MHA-16" and mha.bytes_per_token == 24 * 2048 * 2
    assert (gqa4.elems_per_token_layer, gqa2.elems_per_token_layer) == (512, 256)
    assert mha.bytes_per_token / tpa.bytes_per_token == pytest.approx(4.61, abs=0.01)
    budget = 80 * 2**30
    rows = capacity.capacity_table([tpa, mha, gqa4, gqa2], budget, [4096, 4100])
    # 80 GiB / (21312 B * 16) = 251,910 blocks; a 4096-token sequence takes 256 of them
    assert spec.num_blocks_for(budget) == 251_910
    assert rows[0]["TPA"] == 251_910 // 256 == 984
    assert rows[0]["MHA-16"] == budget // (98304 * 4096) == 213
    assert rows[0]["tpa_over_mha"] == pytest.approx(984 / 213)
    assert rows[1]["TPA"] == 251_910 // 257                            # partial block rounds up
    assert tpa.bytes_per_seq(4100) == 257 * 16 * 21312
    text = capacity.format_table([tpa, mha, gqa4, gqa2], budget, rows, "t6-medium")
    assert "444" in text and "2048" in text and "984" in text


def test_parse_bytes():
    assert capacity.parse_bytes("80GiB") == 80 * 2**30
    assert capacity.parse_bytes("16GB") == 16 * 10**9
    assert capacity.parse_bytes("1.5e9") == 1_500_000_000
    assert capacity.parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(Exception):
        capacity.parse_bytes("lots")


def test_model_from_a_checkpoint_config(tmp_path):
    raw = dict(model_type="gpt2", n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=64,
               block_size=128, rank=1, q_rank=3)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = model_config(str(tmp_path / "config.json"))
    assert cfg.factor_elems_per_token_layer == 2 * (5 + 8)
    result = capacity.main(["--model", str(tmp_path / "config.json"), "--cache-bytes", "1MiB",
                            "--contexts", "16,64", "--dtype", "float32", "--gqa-kv-heads", "2"])
    assert result["bytes_per_token"]["TPA"] == 2 * 26 * 4
    assert [r["context"] for r in result["rows"]] == [16, 64]


def test_read_gauges_sums_label_sets():
    text = ('# TYPE tpaserve:num_requests_running gauge\n'
            'tpaserve:num_requests_running{model_name="a"} 3.0\n'
            'tpaserve:num_requests_running{model_name="b"} 2.0\n'
            '# TYPE other gauge\nother 7\n')
    assert capacity.read_gauges(text, [capacity.RUNNING, capacity.WAITING]) == {
        capacity.RUNNING: 5.0}


def test_verify_sees_every_request_running(stub):
    # the stub's cache: 40 blocks of 16; sequences of 64 tokens take 4 -> 10 requests
    stub.state.first_delay, stub.state.gap = 0.3, 0.05
    v = asyncio.run(capacity.verify(stub.url, 64, 4, num_requests=None, block_size=16,
                                    vocab_size=50))
    assert v["requested"] == 10 and v["server_num_blocks"] == 40
    assert v["max_running"] == 10 and v["completed"] == 10 and v["failed"] == 0
    assert v["model"] == "stub"
    assert len(stub.state.bodies[0]["prompt"]) == 60 and stub.state.bodies[0]["max_tokens"] == 4
    assert any(t[1] == 10 for t in v["timeline"])
    spec = FactorCacheSpec.from_model(model_config("t6-medium"), torch.bfloat16, 16)
    assert "max running at once (/metrics): 10 of 10" in capacity.format_verify(
        v, capacity.layouts(spec))


def test_capacity_plot(tmp_path):
    pytest.importorskip("matplotlib")
    capacity.main(["--model", "t6-medium", "--plot", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 0
