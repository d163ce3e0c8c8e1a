"""The paper's model family, loaded from checkpoints written the way the authors' code writes
them (tests/models/authors_reference.py), gives the authors' logprobs.

For each variant (T6, T6-KVonly, MHA, GQA, MQA, MLA) on awkward shapes (odd head counts,
head_dim != n_embd / n_head, sequences of 1, 37 and 130 tokens packed in one flat batch):
- load_any() recognises it from its keys and config fields and builds it;
- every next-token logprob (all positions, whole vocab) is within LP_TOL of the authors'
  forward with *their* RoPE tables (fp32 angles rounded to bf16), fp32 on the CPU;
- exact fp32 tables (rope_tables="exact") match the authors' forward run with exact tables
  just as tightly, and differ from the bf16-table forward by far more than LP_TOL, so the
  comparison above can tell the two apart.
The paged engine serves every variant (T6 factors, MHA / GQA / MQA as constant-A factors,
MLA's latent cache): an engine started from an authors' checkpoint directory generates what
the reference does, its prompt logprobs match the authors' forward, and it reports the
variant's bytes per token.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.models.authors_reference import AuthorsConfig, AuthorsGPT, save_authors_checkpoint
from tpaserve.exceptions import CheckpointError
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.dense import DenseConfig, DenseLM
from tpaserve.models.loader import load, load_any, load_config, save_checkpoint
from tpaserve.models.mla import MLA, MLAConfig
from tpaserve.models.t6 import T6

LP_TOL = 5e-5                        # fp32, logprobs in nats; only summation order differs
LENS = (1, 37, 130)                  # not multiples of any block size
VARIANTS = {  # name: (authors' config, written as, tpaserve class)
    "t6": (AuthorsConfig("t6", n_head=5, head_dim=8, n_embd=24, q_rank=3, rank=2,
                         using_groupnorm=True), "bin", T6),
    "t6-kvonly": (AuthorsConfig("t6-kvonly", n_head=7, head_dim=6, n_embd=20, rank=3),
                  "safetensors", T6),
    # config head_dim 64 is ignored by llama-mha: head_dim = n_embd / n_head = 10
    "mha": (AuthorsConfig("mha", n_head=3, n_embd=30, head_dim=64, using_groupnorm=True),
            "sharded", DenseLM),
    "gqa": (AuthorsConfig("gqa", n_head=6, group_size=3, head_dim=8, n_embd=28), "bin", DenseLM),
    "mqa": (AuthorsConfig("gqa", n_head=5, group_size=5, head_dim=6,
                          n_embd=22), "safetensors", DenseLM),
    "mla": (AuthorsConfig("mla", n_head=3, n_embd=28, head_dim=6, qk_rope_head_dim=4,
                          q_lora_rank=10, kv_lora_rank=7, v_head_dim=5), "bin", MLA),
}


def sequences(vocab: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in LENS]


def authors_logprobs(ref: AuthorsGPT, seqs, exact: bool) -> torch.Tensor:
    """(sum(LENS), vocab): each sequence run alone, batch of one, as their code runs."""
    return torch.cat([ref.logprobs(s[None], exact=exact)[0] for s in seqs])


def tpaserve_logprobs(model, seqs) -> torch.Tensor:
    ids = torch.cat(seqs)                                                   # (T,)
    pos = torch.cat([torch.arange(len(s)) for s in seqs])                   # (T,)
    cu = [0]
    for s in seqs:
        cu.append(cu[-1] + len(s))
    with torch.no_grad():
        logits = model.compute_logits(model(ids, pos, FullSequenceAttention(cu)))
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(variant, authors' reference model, its checkpoint directory)."""
    cfg, fmt, _ = VARIANTS[request.param]
    ref = AuthorsGPT(cfg).randomize(seed=3, std=0.35).eval()
    path = tmp_path_factory.mktemp(request.param)
    prefix = "_orig_mod." if request.param in ("gqa", "mla") else ""   # saved compiled
    return request.param, ref, save_authors_checkpoint(ref, path, fmt, prefix)


def test_recognised_and_built(checkpoint):
    name, ref, path = checkpoint
    model = load_any(path, dtype="float32", device="cpu")
    assert type(model) is VARIANTS[name][2]
    cfg = model.cfg
    assert cfg.rope_table_dtype == "bfloat16"          # no field: the authors' tables
    if isinstance(cfg, DenseConfig):
        assert cfg.variant == name
        kv = {"mha": 3, "gqa": 2, "mqa": 1}[name]
        assert (cfg.n_kv_head, cfg.head_dim) == (kv, 10 if name == "mha" else ref.c.head_dim)
    if isinstance(cfg, MLAConfig):    # sizes from the shapes: their config.json lacks them
        assert (cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.v_head_dim) == (
            10, 7, 4, 5)
    assert load_config(path) == cfg


def test_logprobs_match_the_authors_with_their_bf16_tables(checkpoint):
    name, ref, path = checkpoint
    seqs = sequences(ref.c.vocab_size)
    want_bf16 = authors_logprobs(ref, seqs, exact=False)
    want_exact = authors_logprobs(ref, seqs, exact=True)
    got = tpaserve_logprobs(load_any(path, dtype="float32", device="cpu"), seqs)
    got_exact = tpaserve_logprobs(
        load_any(path, dtype="float32", device="cpu", rope_tables="exact"), seqs)
    d_trained = (got - want_bf16).abs().max().item()
    d_exact = (got_exact - want_exact).abs().max().item()
    d_tables = (want_exact - want_bf16).abs().max().item()
    print(f"{name}: max |d logprob| trained {d_trained:.2e}, exact {d_exact:.2e}; "
          f"bf16 vs exact tables {d_tables:.2e}")
    assert d_trained <= LP_TOL and d_exact <= LP_TOL
    assert d_tables >= 50 * LP_TOL, "the tables must be told apart for the test to mean anything"


def test_tpaserve_checkpoint_keeps_its_tables(tmp_path):
    """save_checkpoint writes rope_table_dtype, so a model trained with tpaserve's exact
    tables (the demo) reloads with them, and an authors' model saved again keeps bf16."""
    cfg, _, _ = VARIANTS["gqa"]
    path = save_authors_checkpoint(AuthorsGPT(cfg).randomize(0, 0.1), tmp_path / "a")
    authors = load_any(path, dtype="float32", device="cpu")
    again = load_any(save_checkpoint(authors, tmp_path / "b"), dtype="float32", device="cpu")
    assert again.cfg.rope_table_dtype == "bfloat16"
    assert again.cfg == dataclasses.replace(authors.cfg, name="b")
    exact = DenseLM(DenseConfig(n_layer=1, n_head=4, n_kv_head=2, head_dim=6, n_embd=12,
                                vocab_size=9))
    assert exact.cfg.rope_table_dtype == "float32"
    assert load_any(save_checkpoint(exact, tmp_path / "c")).cfg.rope_table_dtype == "float32"
    mla = MLA(MLAConfig(n_layer=1, n_head=2, n_embd=12, vocab_size=9, q_lora_rank=5,
                        kv_lora_rank=3, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3))
    loaded = load_any(save_checkpoint(mla.init_random(1), tmp_path / "d"))
    assert loaded.cfg == dataclasses.replace(mla.cfg, name="d")


@pytest.mark.parametrize("name", ["mha", "gqa", "mqa", "mla"])
def test_paged_engine_serves_family_checkpoints(name, tmp_path, caplog):
    """An authors' MHA / GQA / MQA / MLA checkpoint through EngineCore's own load(): greedy
    tokens equal reference generation; the start-up log and /metrics give the variant's
    bytes per token (2 n_kv d_h a layer; MLA kv_lora + rope) and the saving against the
    same model's MHA twin (MLA: h (nope + rope + v))."""
    import logging

    from tests.reference import reference_generate
    from tpaserve.args import EngineArgs
    from tpaserve.core.engine_core import EngineCore
    from tpaserve.frontend.llm_engine import build_engine
    from tpaserve.frontend.metrics import EngineMetrics, render
    from tpaserve.sampling_params import SamplingParams
    cfg, fmt, _ = VARIANTS[name]
    ref = AuthorsGPT(cfg).randomize(seed=3, std=0.35).eval()
    path = save_authors_checkpoint(ref, tmp_path / name, fmt)
    with caplog.at_level(logging.INFO):
        core = EngineCore(EngineArgs(model=str(path), dtype="float32", device="cpu",
                                     num_blocks=40, block_size=4).create_engine_config())
    model, info = core.model, core.info
    core.close()
    c = model.cfg
    assert type(model) is VARIANTS[name][2] and c.variant == name
    log = "\n".join(r.getMessage() for r in caplog.records)
    if name == "mla":
        per_token = c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) * 4
        mha = c.n_layer * c.n_head * (c.q_head_dim + c.v_head_dim) * 4
        assert f"MLA: latent of kv_lora_rank {c.kv_lora_rank}" in log
    else:
        per_token = c.n_layer * 2 * c.n_kv_head * c.head_dim * 4
        mha = c.n_layer * 2 * c.n_head * c.head_dim * 4
        assert f"{name.upper()}: keys and values of {c.n_kv_head} kv head" in log
    assert f"{per_token} B/token" in log and f"({mha / per_token:.1f}x fewer)" in log
    assert (info.bytes_per_token, info.mha_bytes_per_token) == (per_token, mha)
    EngineMetrics(info, f"family-{name}")
    text = render()[0].decode()
    for metric, want in (("factor_cache_bytes_per_token", per_token),
                         ("mha_equivalent_bytes_per_token", mha)):
        assert f'tpaserve:{metric}{{model_name="family-{name}"}} {float(want)}' in text
    prompts = [s.tolist() for s in sequences(c.vocab_size, seed=5)[:2]] + [[3, 1, 4, 1, 5]]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    eng = build_engine(model, device="cpu", num_blocks=40, block_size=4,
                       max_num_batched_tokens=16)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p[:30], sp)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    for i, p in enumerate(prompts):
        assert done[str(i)] == reference_generate(model, p[:30], sp, None), i
    assert eng.core.blocks.num_free == eng.core.blocks.num_blocks


@pytest.mark.parametrize("name,edit,match", [
    ("gqa", {"head_dim": None}, "not a llama-gqa config .*missing fields head_dim"),
    ("gqa", {"group_size": 4}, "group_size 4 must divide n_head 6"),
    ("mha", {"n_embd": 31}, "n_embd 31 is not a multiple of n_head 3"),
    ("mha", {"n_embd": 36}, None),      # head_dim 12: the tensor check names the shapes
    ("mla", {"head_dim": None, "block_size": None},
     "not a llama-mla config .*missing fields block_size, head_dim"),
    ("mla", {"kv_lora_rank": 9}, "kv_lora_rank is 9 but the weights say 7"),
])
def test_config_errors_name_what_is_wrong(name, edit, match, tmp_path):
    cfg, fmt, _ = VARIANTS[name]
    path = save_authors_checkpoint(AuthorsGPT(cfg).randomize(0, 0.1), tmp_path, fmt)
    raw = json.loads((path / "config.json").read_text()) | edit
    (path / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if v is not None}))
    with pytest.raises(CheckpointError, match=match or r"does not match MHA .*head_dim=12") as e:
        load_any(path, dtype="float32", device="cpu")
    if match is not None:
        assert "\n" not in str(e.value)
    else:
        assert "c_q.weight': expected shape (36, 36), found (30, 30)" in str(e.value)


def test_mla_missing_latent_tensor_is_named(tmp_path):
    cfg, _, _ = VARIANTS["mla"]
    ref = AuthorsGPT(cfg).randomize(0, 0.1)
    path = save_authors_checkpoint(ref, tmp_path, "bin")
    sd = torch.load(path / "pytorch_model.bin")
    del sd["transformer.h.0.attn.kv_a_layernorm.weight"]
    torch.save(sd, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="missing: transformer.h.0.attn.kv_a_layernorm"):
        load_any(path, dtype="float32", device="cpu")


def test_cache_bytes_per_token_of_the_paper_sizes():
    """Medium (24 layers, d_model 1024) in bf16, from the authors' medium configs: T6 h 47
    R 2; MHA 16 x 64; GQA 30 heads, group_size 15 (2 kv heads); MQA 31 heads; MLA with
    their class defaults kv_lora_rank 256, qk_rope_head_dim 32 (what their script builds)."""
    from tpaserve.config import ModelConfig
    from tpaserve.runner.factor_cache import FactorCacheSpec, cache_bytes_per_token
    t6 = ModelConfig(n_layer=24, n_head=47, head_dim=64, n_embd=1024, vocab_size=50304,
                     k_rank=2, v_rank=2, q_rank=6)
    dense = dict(n_layer=24, head_dim=64, n_embd=1024, vocab_size=50304)
    mha = DenseConfig(n_head=16, n_kv_head=16, **dense)
    gqa = DenseConfig(n_head=30, n_kv_head=2, **dense)
    mqa = DenseConfig(n_head=31, n_kv_head=1, **dense)
    mla = MLAConfig(n_layer=24, n_head=23, n_embd=1024, vocab_size=50304, q_lora_rank=512,
                    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64)
    got = {c: cache_bytes_per_token(c, torch.bfloat16) for c in (t6, mha, gqa, mqa, mla)}
    assert list(got.values()) == [24 * 444 * 2, 24 * 2048 * 2, 24 * 256 * 2, 24 * 128 * 2,
                                  24 * 288 * 2]
    for c in (t6, mha, gqa, mqa, mla):         # the engine's spec says the same
        assert got[c] == FactorCacheSpec.from_model(c, torch.bfloat16, 16).bytes_per_token


def test_older_mla_file_reproduces_with_mla_rope_head_index(tmp_path):
    """The authors' older model/llama-mla.py turned q_pe by its head index and k_pe not at
    all; its checkpoints look like the current file's, so config.json must say so."""
    cfg, _, _ = VARIANTS["mla"]
    ref = AuthorsGPT(dataclasses.replace(cfg, kind="mla-v1")).randomize(seed=3, std=0.35)
    path = save_authors_checkpoint(ref.eval(), tmp_path, "safetensors")
    seqs = sequences(cfg.vocab_size)
    wrong = tpaserve_logprobs(load_any(path, dtype="float32", device="cpu"), seqs)  # no field
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(raw | {"mla_rope": "head_index"}))
    for rope_tables in ("trained", "exact"):
        model = load_any(path, dtype="float32", device="cpu", rope_tables=rope_tables)
        assert model.cfg.mla_rope == "head_index"
        want = authors_logprobs(ref, seqs, exact=rope_tables == "exact")
        assert (tpaserve_logprobs(model, seqs) - want).abs().max().item() <= LP_TOL
    assert (wrong - authors_logprobs(ref, seqs, exact=False)).abs().max().item() > 0.1


@pytest.mark.parametrize("kind", ["mla", "mla-v1"])
def test_paged_engine_prompt_logprobs_match_the_authors_mla(kind, tmp_path):
    """An authors' MLA checkpoint (their current file, and the older one with mla_rope
    "head_index" in config.json) through the paged engine: its latent cache, the absorbed
    form, chunked prefill (chunks of 16 over blocks of 5), prompt logprobs of a 130-token
    prompt within LP_TOL of the authors' own forward with their bf16 tables."""
    from tpaserve.frontend.llm_engine import build_engine
    from tpaserve.sampling_params import SamplingParams
    cfg, _, _ = VARIANTS["mla"]
    ref = AuthorsGPT(dataclasses.replace(cfg, kind=kind)).randomize(seed=3, std=0.35).eval()
    path = save_authors_checkpoint(ref, tmp_path, "bin", "_orig_mod.")
    if kind == "mla-v1":
        raw = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(raw | {"mla_rope": "head_index"}))
    prompt = sequences(cfg.vocab_size, seed=7)[2]                           # 130 tokens
    with torch.no_grad():
        want = ref.logprobs(prompt[None])[0]                                # (130, vocab)
    model = load(path, dtype="float32", device="cpu")         # the engine core's loader
    assert model.cfg.mla_rope == ("head_index" if kind == "mla-v1" else "positions")
    eng = build_engine(model, device="cpu", num_blocks=40, block_size=5,
                       max_num_batched_tokens=16)
    eng.add_request("p", prompt.tolist(), SamplingParams(max_tokens=1, prompt_logprobs=0))
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    got = done["p"].prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)
    worst = max(abs(got[p][0] - want[p - 1, prompt[p]].item()) for p in range(1, len(prompt)))
    print(f"{kind}: paged engine vs the authors' forward, max |d logprob| {worst:.2e}")
    assert worst <= LP_TOL
