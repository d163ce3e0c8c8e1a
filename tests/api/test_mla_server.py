"""A real `tpaserve` process serving a tiny random MLA checkpoint (its latent cache, the
absorbed form) through the official openai client: greedy completions equal reference
generation (mla.py's plain forward), echoed prompt logprobs match it, a repeated prompt
(a prefix-cache hit) answers the same, chat works, and /metrics gives the latent's bytes
per token and the same model's MHA twin."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.api.conftest import MODEL_NAME, launch, stop
from tests.models.conftest import train_spm
from tests.reference import reference_generate, reference_prompt_logprobs
from tpaserve.models.loader import load, save_checkpoint
from tpaserve.models.mla import MLA, MLAConfig
from tpaserve.models.tokenizer import load_tokenizer
from tpaserve.sampling_params import SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog because"


@pytest.fixture(scope="module")
def mla_server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny_mla")
    train_spm(root / "tok")
    tok = load_tokenizer(root / "tok")
    cfg = MLAConfig(n_layer=2, n_head=3, n_embd=32, vocab_size=tok.vocab_size + 5,
                    q_lora_rank=12, kv_lora_rank=20, qk_nope_head_dim=6, qk_rope_head_dim=4,
                    v_head_dim=10, using_groupnorm=True, max_position=256)
    ckpt = root / "ckpt"
    save_checkpoint(MLA(cfg).init_random(seed=0, std=0.3), ckpt)
    shutil.copy(root / "tok" / "tokenizer.model", ckpt / "tokenizer.model")
    s = launch(ckpt, root / "tpaserve.log", "--num-blocks", "64", "--block-size", "4",
               "--max-num-batched-tokens", "16")
    try:
        yield s, ckpt, tok
    finally:
        stop(s)


def test_mla_checkpoint_is_served(mla_server):
    server, ckpt, tok = mla_server
    model = load(Path(ckpt), dtype="float32", device="cpu")
    ids = tok.encode(PROMPT)
    c = server.client()
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                             echo=True, logprobs=0, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    want = reference_generate(model, ids, SamplingParams(max_tokens=10, temperature=0,
                                                         ignore_eos=True), None,
                              vocab_size=tok.vocab_size)
    assert lp.tokens[len(ids):] == tok.convert_ids_to_tokens(want)
    ref = reference_prompt_logprobs(model, ids, 0, vocab_size=tok.vocab_size)
    assert lp.token_logprobs[0] is None
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([x for x, _ in ref[1:]], abs=1e-4)
    again = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert r.choices[0].text == PROMPT + again.choices[0].text
    chat = c.chat.completions.create(model=MODEL_NAME, max_tokens=5, temperature=0,
                                     messages=[{"role": "user", "content": "hello"}])
    assert chat.choices[0].message.role == "assistant"
    cfg = model.cfg
    per_token = cfg.n_layer * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert server.metric("tpaserve:factor_cache_bytes_per_token") == per_token
    assert server.metric("tpaserve:mha_equivalent_bytes_per_token") == (
        cfg.n_layer * cfg.n_head * (cfg.q_head_dim + cfg.v_head_dim) * 4)
    assert "MLA: latent of kv_lora_rank 20" in server.log.read_text()
