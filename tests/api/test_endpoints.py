"""/v1/models, /health, /version, /metrics, and vLLM's /tokenize, /detokenize,
/tokenizer_info."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

import tpaserve
from tests.api.conftest import MAX_MODEL_LEN, MODEL_NAME

TEXT = "hello world, the quick brown fox 123"


def test_models(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    with server.http() as h:
        card = h.get(f"/v1/models/{MODEL_NAME}").json()
    assert card["id"] == MODEL_NAME and card["max_model_len"] == MAX_MODEL_LEN


def test_health_and_version(server):
    r = httpx.get(f"{server.url}/health")
    assert r.status_code == 200
    assert httpx.get(f"{server.url}/version").json() == {"version": tpaserve.__version__}


def test_metrics_exposition(server):
    server.client().completions.create(model=MODEL_NAME, prompt=TEXT, max_tokens=5,
                                       extra_body={"ignore_eos": True})
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("tpaserve:"):
                assert s.labels["model_name"] == MODEL_NAME
                samples.setdefault(s.name, []).append(s)
    for name in ("tpaserve:num_requests_running", "tpaserve:num_requests_waiting",
                 "tpaserve:prompt_tokens_total", "tpaserve:generation_tokens_total",
                 "tpaserve:request_success_total", "tpaserve:factor_cache_usage_perc"):
        assert name in samples, name
    assert samples["tpaserve:generation_tokens_total"][0].value >= 5
    reasons = {s.labels["finished_reason"]: s.value
               for s in samples["tpaserve:request_success_total"]}
    assert set(reasons) >= {"stop", "length", "abort"} and reasons["length"] >= 1
    assert 0 <= samples["tpaserve:factor_cache_usage_perc"][0].value <= 1
    assert not any(name.endswith("_created") for name in samples)


def test_tokenize_detokenize_round_trip(server, tokenizer):
    with server.http() as h:
        t = h.post("/tokenize", json={"model": MODEL_NAME, "prompt": TEXT,
                                      "return_token_strs": True}).json()
        assert t["tokens"] == tokenizer.encode(TEXT) and t["count"] == len(t["tokens"])
        assert t["max_model_len"] == MAX_MODEL_LEN
        assert t["token_strs"] == tokenizer.convert_ids_to_tokens(t["tokens"])
        d = h.post("/detokenize", json={"model": MODEL_NAME, "tokens": t["tokens"]}).json()
        assert d == {"prompt": TEXT}
        bare = h.post("/tokenize", json={"prompt": TEXT, "add_special_tokens": False}).json()
        assert bare["tokens"] == tokenizer.encode(TEXT, add_special_tokens=False)
        assert bare["token_strs"] is None


def test_tokenize_chat_matches_chat_usage(server):
    messages = [{"role": "user", "content": "hello world"}]
    with server.http() as h:
        t = h.post("/tokenize", json={"messages": messages}).json()
    r = server.client().chat.completions.create(model=MODEL_NAME, messages=messages,
                                                max_tokens=1)
    assert t["count"] == r.usage.prompt_tokens


def test_tokenize_needs_exactly_one_input(server):
    with server.http() as h:
        r = h.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user",
                                                                  "content": "b"}]})
        assert r.status_code == 400
        assert h.post("/tokenize", json={}).status_code == 400


def test_tokenizer_info(server, tokenizer):
    with server.http() as h:
        info = h.get("/tokenizer_info").json()
    assert info["vocab_size"] == tokenizer.vocab_size
    assert info["eos_token_id"] == tokenizer.eos_token_id
    assert info["bos_token"] == "<s>" and info["model_max_length"] == MAX_MODEL_LEN
    assert info["chat_template"] == tokenizer.chat_template
