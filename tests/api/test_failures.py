"""Server-side failures, in process (Starlette's TestClient runs the app and its lifespan; the
engine core is a real spawned process): an unexpected exception is a 500 that says nothing
more, and the app answers 503 until its engine runs. Failed steps, a dead core and signals
are tested through real servers (tests/reliability)."""
from __future__ import annotations

from starlette.testclient import TestClient

from tests.api.conftest import MODEL_NAME
from tpaserve.api.server import build_app

BODY = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 4}


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    return r.json()["error"]


def test_unexpected_exception_is_a_generic_500(async_llm, monkeypatch):
    llm = async_llm
    def broken(*a, **k):
        raise KeyError("secret internals")
    with TestClient(build_app(llm, MODEL_NAME)) as c:
        assert c.post("/v1/completions", json=BODY).status_code == 200
        monkeypatch.setattr(llm.tokenizer, "encode", broken)
        err = error(c.post("/v1/completions", json=BODY), 500)
    assert err["message"] == "internal server error" and "secret" not in err["message"]


def test_health_is_503_until_the_engine_runs(async_llm):
    app = build_app(async_llm, MODEL_NAME)
    c = TestClient(app)                 # no lifespan: the app never connected to its core
    assert error(c.get("/health"), 503)["code"] == "engine_not_ready"
    assert error(c.post("/v1/completions", json=BODY), 503)["code"] == "engine_not_ready"
    assert c.get("/metrics").status_code == 200
