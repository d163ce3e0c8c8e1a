"""The offline API: LLM(model, ...).generate(prompts, params) -> one finished RequestOutput
per prompt, in the prompts' order, equal to the oracle. Ends with the engine drained."""
from __future__ import annotations

import random

import pytest

from tests.models.conftest import train_spm
from tests.reference import reference_generate
from tpaserve.config import ModelConfig
from tpaserve.exceptions import RequestRejected
from tpaserve.frontend.llm import LLM
from tpaserve.models.t6 import T6
from tpaserve.sampling_params import SamplingParams

V = 101


def make_model(vocab: int = V, q_rank: int | None = 3) -> T6:
    cfg = ModelConfig(n_layer=2, n_head=5, head_dim=8, n_embd=32, vocab_size=vocab, k_rank=2,
                      v_rank=2, q_rank=q_rank, max_position=256)
    return T6(cfg).init_random(seed=3, std=0.3).eval()


@pytest.fixture(scope="module", params=[3, None], ids=["t6", "t6-kvonly"])
def model(request) -> T6:
    return make_model(q_rank=request.param)


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory):
    from tpaserve.models.tokenizer import load_tokenizer
    return load_tokenizer(train_spm(tmp_path_factory.mktemp("spm_tokenizer")).parent)


def assert_drained(llm: LLM) -> None:
    eng = llm.engine
    eng.core.blocks.check()
    assert not eng.has_unfinished_requests() and not eng.core.scheduler.requests
    assert eng.core.blocks.num_free == eng.core.blocks.num_blocks and eng.core.blocks.tables == {}


def test_generate_returns_outputs_in_prompt_order_equal_to_reference(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 40))] for _ in range(12)]
    sp = SamplingParams(temperature=0, max_tokens=9)
    llm = LLM(model, num_blocks=40, block_size=4, max_num_batched_tokens=32, device="cpu")
    outs = llm.generate(prompts, sp)
    assert [o.prompt_token_ids for o in outs] == prompts
    for p, o in zip(prompts, outs):
        assert o.finished and o.outputs[0].finish_reason == "length"
        assert o.outputs[0].token_ids == reference_generate(model, p, sp, None)
    assert_drained(llm)
    # per-prompt params, and a second call on the same LLM (request ids keep counting)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=5 + i) for i in range(3)]
    outs2 = llm.generate(prompts[:3], params)
    assert len({o.request_id for o in outs + outs2}) == 15
    for p, sp_, o in zip(prompts, params, outs2):
        assert o.outputs[0].token_ids == reference_generate(model, p, sp_, None)
    assert_drained(llm)


def test_single_prompt_default_params_and_argument_errors(model):
    llm = LLM(model, num_blocks=32, block_size=4, device="cpu")
    (out,) = llm.generate([5, 6, 7])                    # one token-id prompt, not three
    assert out.prompt_token_ids == [5, 6, 7] and len(out.outputs[0].token_ids) == 16
    assert llm.generate([]) == []
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[1, 2]], [SamplingParams(), SamplingParams()])
    with pytest.raises(ValueError, match="need a tokenizer"):
        llm.generate("hello")
    with pytest.raises(RequestRejected):
        llm.generate([[1] * 300])
    assert_drained(llm)
    # a bad prompt after good ones: nothing stays queued for the next call
    with pytest.raises(RequestRejected, match="outside the vocabulary"):
        llm.generate([[1, 2], [3, 4], [V + 5]])
    assert_drained(llm)
    (again,) = llm.generate([[1, 2]], SamplingParams(max_tokens=2))
    assert len(again.outputs[0].token_ids) == 2
    assert_drained(llm)


def test_text_prompts_with_a_tokenizer(spm_tokenizer):
    tok = spm_tokenizer
    model = make_model(vocab=tok.vocab_size)
    llm = LLM(model, tokenizer=tok, num_blocks=64, block_size=4, device="cpu")
    texts = ["hello world", "the quick brown fox jumps over", "naïve café 日本"]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate(texts, sp)
    for text, o in zip(texts, outs):
        ids = tok.encode(text)
        assert o.prompt_token_ids == ids
        c = o.outputs[0]
        assert c.token_ids == reference_generate(model, ids, sp, tok.eos_token_id,
                                                 vocab_size=tok.vocab_size)
        assert c.text == tok.decode(ids + c.token_ids)[len(tok.decode(ids)):]
    (single,) = llm.generate("hello world", sp)
    assert single.outputs[0].token_ids == outs[0].outputs[0].token_ids
    assert_drained(llm)


def test_llm_with_no_model_serves_the_bundled_demo_as_the_cli_does():
    """`tpaserve.LLM()` loads the demo model the CLI serves by default, with its tokenizer,
    and takes the CLI's engine flags as keywords (unknown ones are a TypeError naming them)."""
    import tpaserve
    llm = tpaserve.LLM(device="cpu", num_blocks=64)
    out = llm.generate("It is a truth universally acknowledged",
                       SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.finished and len(out.outputs[0].token_ids) == 8 and out.outputs[0].text
    assert llm.engine.info.max_model_len == 512 and llm.tokenizer.vocab_size == 8192
    with pytest.raises(TypeError, match="max_num_seq"):
        tpaserve.LLM(device="cpu", max_num_seq=3)
    assert_drained(llm)
