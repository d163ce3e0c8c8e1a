"""The shipped demo model (tpaserve/demo/t6-demo, docs/demo_model.md) still scores what it
scored when it was trained, and greedy decoding from it is deterministic and readable.

CPU, fp32. Recompute the recorded figure (tpaserve/demo/t6-demo/eval.json) with
    PYTHONPATH=. python tests/models/test_demo_model.py
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

import tpaserve
from tpaserve.models.attention import FullSequenceAttention
from tpaserve.models.loader import load

DEMO = Path(tpaserve.__file__).parent / "demo" / "t6-demo"
HELDOUT = Path(__file__).resolve().parent.parent / "data" / "demo_heldout.txt"
MAX_TOKENS = 1536          # the held-out file is ~1.1K tokens: all of it
PPL_RTOL = 0.05


@pytest.fixture(scope="module")
def model():
    return load(DEMO, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(DEMO / "tokenizer.model"))


@torch.no_grad()
def heldout_perplexity(model, sp) -> tuple[float, int]:
    """exp(mean next-token NLL) over [bos] + encode(held-out text), first MAX_TOKENS tokens.

    The sequence is cut into windows of the model's context (block_size) that overlap by
    one token, each run from position 0, so every token after bos is predicted exactly once.
    """
    bos = json.loads((DEMO / "tokenizer_config.json").read_text())["bos_token_id"]
    ids = ([bos] + sp.encode(HELDOUT.read_text(encoding="utf-8")))[:MAX_TOKENS]
    L = model.cfg.max_position
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, L):
        win = torch.tensor(ids[s:s + L + 1])                                  # (<= L+1,)
        x, y = win[:-1], win[1:]
        hidden = model(x, torch.arange(x.numel()), FullSequenceAttention([0, x.numel()]))
        nll += F.cross_entropy(model.compute_logits(hidden), y, reduction="sum").item()
        n += y.numel()
    return math.exp(nll / n), n


@torch.no_grad()
def greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    ids = list(prompt_ids)
    for _ in range(n):
        attn = FullSequenceAttention([0, len(ids)])
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), attn)
        ids.append(int(model.compute_logits(hidden[-1:]).argmax(-1)))
    return ids[len(prompt_ids):]


def test_shipped_files_fit_the_budget():
    names = {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"}
    assert names <= {p.name for p in DEMO.iterdir()}
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 32 * 2**20


def test_heldout_perplexity_matches_recorded(model, sp):
    recorded = json.loads((DEMO / "eval.json").read_text())
    ppl, n = heldout_perplexity(model, sp)
    assert n == recorded["heldout_tokens"], (n, recorded["heldout_tokens"])
    assert abs(ppl - recorded["heldout_ppl"]) <= PPL_RTOL * recorded["heldout_ppl"], (
        f"held-out perplexity {ppl:.3f}, recorded {recorded['heldout_ppl']:.3f}")


@pytest.mark.parametrize("prompt", ["It is a truth universally acknowledged",
                                    "And God said unto Moses,"])
def test_greedy_is_deterministic_and_readable(model, sp, prompt):
    bos = json.loads((DEMO / "tokenizer_config.json").read_text())["bos_token_id"]
    prompt_ids = [bos] + sp.encode(prompt)
    first, second = greedy(model, prompt_ids, 24), greedy(model, prompt_ids, 24)
    assert first == second
    text = sp.decode(first)
    assert text.replace("\n", " ").isprintable(), repr(text)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 8, repr(text)
    # "English words": at least 80% of them are whole-word pieces of the tokenizer, i.e.
    # frequent words of the corpus it was trained on (no dictionary needed in CI).
    pieces = {sp.id_to_piece(i).lstrip("\u2581").lower() for i in range(sp.get_piece_size())}
    known = sum(w.lower() in pieces for w in words)
    assert known >= 0.8 * len(words), (repr(text), known, len(words))


if __name__ == "__main__":
    m = load(DEMO, dtype="float32", device="cpu")
    s = spm.SentencePieceProcessor(model_file=str(DEMO / "tokenizer.model"))
    ppl, n = heldout_perplexity(m, s)
    print(json.dumps({"heldout_ppl": round(ppl, 4), "heldout_tokens": n}))
    for p in ["It is a truth universally acknowledged", "And God said unto Moses,"]:
        print(repr(p + s.decode(greedy(m, [1] + s.encode(p), 24))))
