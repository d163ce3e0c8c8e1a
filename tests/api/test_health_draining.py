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


def test_unknown_fields_are_refused_naming_them(async_llm):
    """Nothing a client sends is dropped silently: an unknown field is a 400 naming it,
    as OpenAI answers (stream_options.continuous_usage_stats included: not supported)."""
    app = build_app(async_llm, "tiny")
    with TestClient(app) as http:
        for body, param in [
            ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
            ({"prompt": "hi", "stream": True,
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
             "stream_options.continuous_usage_stats")]:
            r = http.post("/v1/completions", json={"model": "tiny", "max_tokens": 2, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param
