"""lm-eval's `local-completions` model, unchanged, against a real tpaserve for each of the
paper's families (#17: "a T6, a GQA and an MLA checkpoint trained with the authors' code serve
side by side, lm-eval's local-completions task runs against each unchanged").

Variants, one server each:
  t6-demo  the bundled demo model (tpaserve/demo/t6-demo; T6, trained, exact fp32 RoPE tables)
  gqa      a random llama-gqa checkpoint written as the authors' code writes it
           (config.json + pytorch_model.bin, no tpaserve fields; 6 query heads, 2 kv heads)
  mla      a random llama-mla checkpoint, same format, served through its latent cache
           (branch mla-serve; its run time here is not measured yet: no lm-eval venv there).

lm-eval 0.4.13 runs from its own venv (.venv-lmeval, built best-effort by `make test`; it
needs no torch) on a local task (tests/data/lmeval: 12 multiple-choice items scored by
loglikelihood, i.e. /v1/completions with echo + logprobs, and 3 greedy generate_until items).
model_args are only model, base_url, num_concurrent and max_retries: lm-eval finds
tpaserve's /tokenizer_info and /tokenize and takes the "remote" tokenizer backend by itself,
so nothing is downloaded (the hub is switched off to prove it). Asserted:
  * lm_eval exits 0 and its results JSON has acc and exact_match over every item;
  * every choice's loglikelihood lm-eval reports equals the authors' forward
    (tests/models/authors_reference.py, fp32) summed over the continuation's tokens;
  * every greedy generation equals tpaserve's own /v1/completions for the same prompt ids;
  * the server answered every request 200 and logged no error.
CI cost on 2 cores: t6-demo 29 s, gqa 26 s, mla 10 s while refused (59 / 53 / 13 s with the
cores busy with other work); most of it is lm_eval's imports (the run itself 17-35 s) and the
server's start (~10 s). Random weights at std 0.3: peaked enough that greedy tokens are not
near-ties, which batching differences could flip.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from tests.api.conftest import MODEL_NAME, launch, stop
from tests.models.authors_reference import AuthorsConfig, AuthorsGPT, save_authors_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TASK_DIR = ROOT / "tests" / "data" / "lmeval"
DEMO = ROOT / "tpaserve" / "demo" / "t6-demo"
TASKS = {"tpaserve_family_mc": ("acc", 12), "tpaserve_family_gen": ("exact_match", 3)}
API_KEY = "lmeval-key"
LP_TOL = 2e-3          # nats per choice (a sum of <= 12 fp32 token logprobs, ~2e-5 each)
# the Makefile's venv (.ok: its install completed); TPASERVE_LM_EVAL names another lm_eval
LMEVAL_VENV = ROOT / ".venv-lmeval"
LM_EVAL = os.environ.get("TPASERVE_LM_EVAL") or (
    str(LMEVAL_VENV / "bin" / "lm_eval") if (LMEVAL_VENV / ".ok").is_file() else None)

# the authors' configs for the random twins: vocab padded past the demo tokenizer's 8192, as
# their 50304 pads GPT-2's 50257
DEMO_VOCAB = 8192
AUTHORS = {
    "gqa": AuthorsConfig("gqa", n_layer=2, n_head=6, group_size=3, head_dim=16, n_embd=48,
                         vocab_size=DEMO_VOCAB + 64, block_size=512),
    "mla": AuthorsConfig("mla", n_layer=2, n_head=3, n_embd=48, head_dim=16,
                         qk_rope_head_dim=8, q_lora_rank=24, kv_lora_rank=16, v_head_dim=16,
                         vocab_size=DEMO_VOCAB + 64, block_size=512),
}


def demo_as_authors_model() -> AuthorsGPT:
    """The demo's weights in the authors' T6 (it was saved in their key layout, bf16, tied
    lm_head not stored); it was trained with exact fp32 RoPE tables (config.json says so)."""
    raw = json.loads((DEMO / "config.json").read_text())
    ref = AuthorsGPT(AuthorsConfig("t6", n_layer=raw["n_layer"], n_head=raw["n_head"],
                                   n_embd=raw["n_embd"], head_dim=raw["head_dim"],
                                   rank=raw["rank"], q_rank=raw["q_rank"],
                                   vocab_size=raw["vocab_size"], block_size=raw["block_size"]))
    sd = {k: v.float() for k, v in load_file(DEMO / "model.safetensors").items()}
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    return ref


@pytest.fixture(scope="module", params=["t6-demo", "gqa", "mla"])
def variant(request, tmp_path_factory):
    """(name, checkpoint dir, the authors' model of the same weights, exact RoPE tables?)."""
    if request.param == "t6-demo":
        return request.param, DEMO, demo_as_authors_model().eval(), True
    ref = AuthorsGPT(AUTHORS[request.param]).randomize(seed=7, std=0.3).eval()
    path = save_authors_checkpoint(ref, tmp_path_factory.mktemp(request.param) / "ckpt")
    # their checkpoints carry no tokenizer: the demo's sentencepiece model goes beside it
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(DEMO / name, path / name)
    return request.param, path, ref, False


@pytest.fixture(scope="module")
def served(variant, tmp_path_factory):
    name, path, _, _ = variant
    if LM_EVAL is None:
        pytest.skip("lm-eval is not installed: `make .venv-lmeval/.ok` builds its venv (it "
                    "was not run, or could not install lm_eval[api]==0.4.13)")
    log = tmp_path_factory.mktemp(f"server-{name}") / "tpaserve.log"
    s = launch(path, log, "--max-num-seqs", "8", "--num-blocks", "256", "--block-size", "16",
               api_key=API_KEY)
    try:
        yield s
    finally:
        stop(s)


@pytest.fixture(scope="module")
def lm_eval_run(served, tmp_path_factory):
    """Run lm_eval once against the server; (its output dir, its log, seconds)."""
    out = tmp_path_factory.mktemp("lmeval")
    args = [LM_EVAL, "--model", "local-completions", "--model_args",
            f"model={MODEL_NAME},base_url={served.v1}/completions,num_concurrent=4,"
            f"max_retries=1,auth_token={API_KEY}",
            "--tasks", ",".join(TASKS), "--include_path", ".", "--output_path", str(out),
            "--log_samples"]
    # no hub: a tokenizer or dataset download would fail instead of passing unnoticed
    env = dict(os.environ, OPENAI_API_KEY=API_KEY, HF_HOME=str(out / "hf"),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    start = time.monotonic()
    r = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env,
                       cwd=TASK_DIR)     # data_files in the task YAMLs are relative to it
    seconds = time.monotonic() - start
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    print(f"lm_eval against {served.url}: {seconds:.1f} s")
    return out, log, seconds


def _samples(out: Path, task: str) -> list[dict]:
    (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _tokenize(http: httpx.Client, text: str) -> list[int]:
    """What lm-eval's remote tokenizer gets for text (no special tokens)."""
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_lm_eval_scores_every_item(lm_eval_run):
    out, log, _ = lm_eval_run
    assert "Using remote tokenizer backend" in log      # tpaserve's /tokenize, no download
    (results_path,) = glob.glob(str(out / "*" / "results_*.json"))
    results = json.loads(Path(results_path).read_text())
    for task, (metric, n) in TASKS.items():
        value = results["results"][task][f"{metric},none"]
        assert 0.0 <= value <= 1.0, results["results"][task]
        assert results["n-samples"][task] == {"original": n, "effective": n}
        samples = _samples(out, task)
        assert sorted(s["doc_id"] for s in samples) == list(range(n))
        assert all(s[metric] in (0.0, 1.0) for s in samples)


def test_loglikelihoods_are_the_authors(lm_eval_run, served, variant):
    """Each choice's score is the authors' forward over the same token ids (what lm-eval
    sends: the context's ids, then the rest of context + " " + choice's), summed over the
    continuation, with logprobs normalised over the tokenizer's tokens as the server
    reports them (it never samples or reports a checkpoint's padding ids)."""
    out, _, _ = lm_eval_run
    name, _, ref, exact = variant
    rows = []                                     # (lm-eval's score, ids, context length)
    with served.http() as http:
        vocab = http.get("/tokenizer_info").json()["vocab_size"]
        for s in _samples(out, "tpaserve_family_mc"):
            ctx_ids = _tokenize(http, s["doc"]["context"])
            for i, choice in enumerate(s["doc"]["choices"]):
                whole = _tokenize(http, s["doc"]["context"] + " " + choice)
                assert whole[:len(ctx_ids)] == ctx_ids
                rows.append((float(s["resps"][i][0][0]), whole, len(ctx_ids)))
    # one right-padded batch: causal attention, so the padding never reaches a real position
    width = max(len(ids) for _, ids, _ in rows)
    batch = torch.tensor([ids + [0] * (width - len(ids)) for _, ids, _ in rows])  # (N, T)
    lp = ref.logprobs(batch, exact=exact)[..., :vocab]                    # (N, T, vocab)
    lp = lp - lp.logsumexp(-1, keepdim=True)
    worst = 0.0
    for n, (got, ids, ctx_len) in enumerate(rows):
        want = sum(lp[n, t - 1, ids[t]].item() for t in range(ctx_len, len(ids)))
        worst = max(worst, abs(got - want))
        assert got == pytest.approx(want, abs=LP_TOL), (n, ids)
    print(f"{name}: max |lm-eval loglikelihood - authors' forward| {worst:.2e} nats "
          f"over {len(rows)} choices")


def test_greedy_generations_equal_the_servers_own(lm_eval_run, served):
    out, _, _ = lm_eval_run
    texts = []
    with served.http() as h:
        eos = h.get("/tokenizer_info").json()["eos_token"]
        for s in _samples(out, "tpaserve_family_gen"):
            # what lm-eval sent: the prompt's ids, its until + the eos text as stop strings
            kw = s["arguments"]["gen_args_0"]["arg_1"]
            ids = _tokenize(h, s["doc"]["prompt"])
            r = h.post("/v1/completions", json={
                "model": MODEL_NAME, "prompt": ids, "temperature": 0.0,
                "max_tokens": kw["max_gen_toks"], "stop": kw["until"] + [eos]})
            assert r.status_code == 200, r.text
            assert s["resps"][0][0] == r.json()["choices"][0]["text"], s["doc_id"]
            texts.append(s["resps"][0][0])
    assert any(texts), "every generation was empty: the comparison would mean nothing"


def test_server_answered_everything(lm_eval_run, served):
    text = served.log.read_text(errors="replace")
    access = [line for line in text.splitlines() if "uvicorn.access" in line]
    assert sum("/v1/completions" in line for line in access) >= 48 + 3
    bad = [line for line in access if not line.rstrip().endswith(" 200")]
    assert not bad, bad[:5]
    assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
