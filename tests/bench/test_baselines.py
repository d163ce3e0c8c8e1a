"""The baselines and the random checkpoint, on tiny models on the CPU (transformers is not
needed: baseline_hf imports it only when run)."""
import json

import pytest
import torch

from bench import baseline_hf, baseline_recompute, make_random_checkpoint
from bench.client import RequestResult
from bench.metrics import summarize
from tests.reference import reference_generate
from tpaserve.config import ModelConfig
from tpaserve.models.loader import load
from tpaserve.models.t6 import T6
from tpaserve.models.tokenizer import load_tokenizer
from tpaserve.sampling_params import SamplingParams

TINY = dict(model_type="gpt2", n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=97,
            block_size=64, rank=2, q_rank=3, using_groupnorm=False, bias=False)


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


def test_recompute_equals_reference_greedy():
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=97, q_rank=3,
                      k_rank=2, v_rank=2, max_position=64)
    model = T6(cfg).init_random(seed=1, std=0.3).eval()
    prompts = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    out, steps = baseline_recompute.recompute_generate(model, prompts, 6)
    assert out.shape == (3, 6) and len(steps) == 6 and all(s > 0 for s in steps)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for p, o in zip(prompts.tolist(), out.tolist()):
        assert o == reference_generate(model, p, greedy, eos_token_id=None)


def test_recompute_cli_writes_rows_like_serve(tiny_config, tmp_path, capsys):
    out = tmp_path / "rc.json"
    rows = baseline_recompute.main(["--model", str(tiny_config), "--device", "cpu",
                                    "--dtype", "float32", "--batch", "1,3", "--prompt-len", "12",
                                    "--output-len", "4", "--json", str(out)])
    served = summarize([RequestResult(ok=True, output_tokens=2, latency=1, ttft=0.5)], 1.0,
                       label="", concurrency=1, request_rate="inf", num_prompts=1, sent=1,
                       input_len=1, output_len=1)
    saved = json.loads(out.read_text())["rows"]
    assert saved == rows and [r["concurrency"] for r in rows] == [1, 3]
    for r in rows:
        assert set(served) <= set(r)
        assert r["label"] == "recompute" and r["completed"] == r["concurrency"]
        assert r["total_output_tokens"] == 4 * r["concurrency"]
        assert r["output_throughput"] > 0 and r["mean_ttft_ms"] > 0 and r["mean_itl_ms"] > 0
    assert "output token throughput" in capsys.readouterr().out


def test_hf_baseline_needs_transformers_only_when_run():
    args = baseline_hf.parse_args(["--batch", "1,64", "--device", "cuda"])
    assert (args.prompt_len, args.output_len, args.batch) == (512, 256, "1,64")
    try:
        import transformers  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="transformers"):
            baseline_hf.main(["--device", "cpu"])


def test_random_checkpoint_loads_with_its_tokenizer(tiny_config, tmp_path):
    info = make_random_checkpoint.make_checkpoint(str(tiny_config), tmp_path / "ckpt",
                                                  max_position=128, tokenizer_vocab=300)
    model = load(tmp_path / "ckpt", dtype="float32", device="cpu")
    assert model.cfg.max_position == 128 and model.cfg.n_head == 5
    assert model.lm_head.weight.abs().sum() > 0
    tok = load_tokenizer(tmp_path / "ckpt")
    assert tok.vocab_size == info["vocab_size"] <= 300


def test_random_checkpoint_can_take_a_real_tokenizer(tiny_config, tmp_path):
    """--tokenizer copies one that spells JSON (the structured-output benchmark's need);
    one larger than the model's vocabulary is refused."""
    from tpaserve.args import DEMO_DIR
    with pytest.raises(SystemExit, match="more than the model's 97"):
        make_random_checkpoint.make_checkpoint(str(tiny_config), tmp_path / "small",
                                               tokenizer_from=DEMO_DIR)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({**TINY, "vocab_size": 8200}))
    info = make_random_checkpoint.make_checkpoint(str(big), tmp_path / "ckpt",
                                                  max_position=64, tokenizer_from=DEMO_DIR)
    tok = load_tokenizer(tmp_path / "ckpt")
    assert info["vocab_size"] == tok.vocab_size == 8192
    assert tok.decode(tok.encode('{"a": [1]}', add_special_tokens=False)) == '{"a": [1]}'


def test_mask_cost_walks_its_schema_at_both_vocabularies():
    from bench import mask_cost
    rows = mask_cost.main(["--rows", "1,3", "--steps", "4", "--vocab", "8192,9000"])
    assert [(r["vocab"], r["rows"]) for r in rows] == [(8192, 1), (8192, 3), (9000, 1),
                                                       (9000, 3)]
    assert all(r["fill_us"] > 0 and r["consume_us"] > 0 for r in rows)
