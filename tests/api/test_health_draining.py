"""/health in-process: 200 while the engine runs, 503 (OpenAI error body) while the server
drains after SIGTERM; the OpenAPI document declares the bearer key when one is set."""
from starlette.testclient import TestClient

from tpaserve.api.server import build_app
from tpaserve.args import ServerArgs


def test_health_turns_503_while_draining(async_llm):
    app = build_app(async_llm, "tiny", ServerArgs(api_key="k"))
    with TestClient(app) as http:
        assert http.get("/health").status_code == 200
        app.state.draining = True
        r = http.get("/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        spec = http.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in spec["paths"]["/health"]["get"]


def test_unknown_fields_are_dropped_with_one_warning(async_llm, caplog):
    """vLLM's policy (issue #15): a field unknown to OpenAI and vLLM is dropped with one
    warning line naming it; continuous_usage_stats is served (docs/api.md)."""
    app = build_app(async_llm, "tiny")
    with TestClient(app) as http:
        caplog.set_level("WARNING", logger="tpaserve.api")
        r = http.post("/v1/completions", json={"model": "tiny", "max_tokens": 2,
                                               "prompt": "hi", "frobnicate": 1})
        assert r.status_code == 200
        (line,) = [m for m in caplog.messages if "ignored field" in m]
        assert "frobnicate" in line
        r = http.post("/v1/completions", json={
            "model": "tiny", "max_tokens": 2, "prompt": "hi", "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        chunks = [c for c in r.text.split("\n\n") if c.startswith("data: {")]
        assert r.status_code == 200 and chunks
        assert all('"usage":{' in c for c in chunks)


def test_ping_and_head_follow_health(async_llm):
    app = build_app(async_llm, "tiny")
    with TestClient(app) as http:
        assert http.head("/health").status_code == 200
        app.state.draining = True
        for method, path in [("GET", "/ping"), ("POST", "/ping"), ("HEAD", "/ping"),
                             ("HEAD", "/health")]:
            assert http.request(method, path).status_code == 503
