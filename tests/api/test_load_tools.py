"""The load tools vLLM users run, unchanged, against a live server, with zero errors:

  * guidellm 0.8.1 (its own venv, .venv-guidellm, which `make test` builds: it needs
    transformers 5): chat, streamed, with stream_options.include_usage +
    continuous_usage_stats, "stop": null and ignore_eos;
  * a `vllm bench serve`-style client: the payloads vLLM's benchmark sends (stream,
    include_usage, continuous_usage_stats, ignore_eos), its SSE parsing, and its check that
    every request produced exactly the tokens asked for.

Neither may make the server log an ignored field: they send only fields it knows.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import MODEL_NAME

ROOT = Path(__file__).resolve().parents[2]
# the Makefile's venv (.ok: its install completed); TPASERVE_GUIDELLM names another
# guidellm executable
GUIDELLM_VENV = ROOT / ".venv-guidellm"
GUIDELLM = os.environ.get("TPASERVE_GUIDELLM") or (
    str(GUIDELLM_VENV / "bin" / "guidellm") if (GUIDELLM_VENV / ".ok").is_file() else None)


def _byte_tokenizer(where: Path) -> Path:
    """A byte-level tokenizer.json that transformers loads offline: guidellm needs one to
    size its synthetic prompts (any tokenizer does; the server counts with its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    where.mkdir(parents=True, exist_ok=True)
    tok.save(str(where / "tokenizer.json"))
    (where / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return where


def _log_size(server) -> int:
    return server.log.stat().st_size


def _no_ignored_fields(server, since: int) -> None:
    """The server logged no ignored field since byte `since` of its log."""
    with open(server.log, "rb") as f:
        f.seek(since)
        new = f.read().decode(errors="replace")
    assert "ignored field" not in new, new[-2000:]


def test_guidellm_runs_with_zero_errors(server, tmp_path):
    """guidellm's default request format, chat (the completions payload differs only in
    prompt vs messages; the vllm-bench client below covers that route)."""
    if GUIDELLM is None:
        pytest.skip("guidellm is not installed: `make .venv-guidellm/.ok` builds its venv "
                    "(it was not run, or could not install guidellm 0.8.1)")
    tok, since = _byte_tokenizer(tmp_path / "tok"), _log_size(server)
    out = tmp_path / "guidellm.json"
    backend = {"kind": "openai_http", "target": server.url, "model": MODEL_NAME,
               "api_key": server.api_key, "request_format": "/v1/chat/completions"}
    cmd = [GUIDELLM, "run", "--backend", json.dumps(backend),
           "--profile", "kind=concurrent,streams=2",
           "--constraint", "kind=max_requests,count=6",
           "--data", "kind=synthetic_text,prompt_tokens=24,output_tokens=8",
           "--tokenizer", f"kind=huggingface_auto,model={tok}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL="WARNING")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    (bench,) = report["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert totals["errored"] == 0 and totals["incomplete"] == 0, totals
    # guidellm's max_requests constraint can stop its scheduler one request short on a busy
    # machine (seen in CI: 5 of 6, none errored or incomplete): what tpaserve answers for is
    # that every request guidellm sent succeeded
    assert totals["successful"] >= 5 and totals["successful"] == totals["total"], totals
    # the usage the server reported is what guidellm counted: 8 tokens per request
    out_tokens = bench["metrics"]["output_token_count"]["successful"]
    assert out_tokens["total_sum"] == 8 * totals["successful"], out_tokens
    _no_ignored_fields(server, since)


def _bench_payload(route: str, prompt: str, output_len: int) -> dict:
    """What `vllm bench serve` sends (vllm/benchmarks/lib/endpoint_request_func.py), with
    the usage in every chunk as its streaming clients ask for."""
    common = {"model": MODEL_NAME, "stream": True, "ignore_eos": True,
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if route == "/v1/completions":
        return {**common, "prompt": prompt, "repetition_penalty": 1.0, "temperature": 0.0,
                "max_tokens": output_len, "logprobs": None}
    return {**common, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
            "max_completion_tokens": output_len}


def _bench_one(server, route: str, prompt: str, output_len: int) -> dict:
    """One request, parsed as vLLM's benchmark parses it: TTFT at the first chunk with text,
    the output length from the last usage seen."""
    start, ttft, text, usage, usages = time.perf_counter(), None, "", None, 0
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as h, \
            h.stream("POST", route, json=_bench_payload(route, prompt, output_len)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            chunk = line.strip().removeprefix("data: ")
            if not chunk or chunk == "[DONE]":
                continue
            data = json.loads(chunk)
            assert "error" not in data, data
            if data.get("usage"):
                usage, usages = data["usage"], usages + 1
            for choice in data["choices"]:
                delta = choice.get("text") if "text" in choice else \
                    choice["delta"].get("content")
                if delta:
                    ttft = ttft or time.perf_counter() - start
                    text += delta
    return {"ttft": ttft, "text": text, "usage": usage, "usage_chunks": usages}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_bench_style_client(server, route):
    prompts = [f"benchmark prompt {i}: the quick brown fox" for i in range(8)]
    since = _log_size(server)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: _bench_one(server, route, p, 12), prompts))
    for res in results:
        assert res["usage"]["completion_tokens"] == 12      # ignore_eos: exactly max tokens
        assert res["ttft"] is not None and res["text"]
        assert res["usage_chunks"] > 2                      # continuous: not only the last
    _no_ignored_fields(server, since)

