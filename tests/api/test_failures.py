"""Server-side failures, in process (Starlette's TestClient runs the app and its lifespan):
an engine step that raises is a 500 (or an SSE error event then [DONE] once streaming),
an unexpected exception is a 500 that says nothing more, and a dead engine makes /health
and generation answer 503."""
from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from tests.api.conftest import MODEL_NAME
from tpaserve.api.engine_client import EngineClient
from tpaserve.api.server import build_app
from tpaserve.engine.async_engine import AsyncEngine
from tpaserve.engine.factory import build_engine
from tpaserve.engine.metrics import EngineMetrics

BODY = {"model": MODEL_NAME, "prompt": "hello world", "max_tokens": 4}


@pytest.fixture
def engine(checkpoint):
    return build_engine(str(checkpoint), device="cpu", num_blocks=64)


def error(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text and 'File "' not in r.text
    return r.json()["error"]


def test_engine_step_failure_is_500_then_dead_engine_is_503(engine, monkeypatch):
    def boom(sched):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(engine.runner, "execute", boom)
    with TestClient(build_app(engine, MODEL_NAME)) as c:
        err = error(c.post("/v1/completions", json=BODY), 500)
        assert err["type"] == "internal_server_error" and "kernel exploded" in err["message"]
        with c.stream("POST", "/v1/chat/completions", json={
                "model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}],
                "stream": True}) as r:
            assert r.status_code == 500           # failed before the first output
        assert c.get("/health").status_code == 200
        # the third failure in a row kills the engine: its request learns so
        err = error(c.post("/v1/completions", json=BODY), 503)
        assert err["code"] == "engine_dead" and "kernel exploded" in err["message"]
        err = error(c.get("/health"), 503)
        assert err["type"] == "service_unavailable_error"
        err = error(c.post("/v1/completions", json=BODY), 503)
        assert err["code"] == "engine_dead"


def test_failure_after_the_stream_started_is_an_sse_error_event(engine, monkeypatch):
    real, calls = engine.runner.execute, []

    def fail_third_step(sched):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("late failure")
        return real(sched)
    monkeypatch.setattr(engine.runner, "execute", fail_third_step)
    with TestClient(build_app(engine, MODEL_NAME)) as c:
        with c.stream("POST", "/v1/completions", json=dict(BODY, stream=True,
                                                           max_tokens=10)) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line]
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert "late failure" in err["message"] and err["type"] == "internal_server_error"
    assert all("choices" in json.loads(e) for e in events[:-2])


def test_unexpected_exception_is_a_generic_500(engine, monkeypatch):
    def broken(*a, **k):
        raise KeyError("secret internals")
    monkeypatch.setattr(engine.tokenizer, "encode", broken)
    with TestClient(build_app(engine, MODEL_NAME)) as c:
        err = error(c.post("/v1/completions", json=BODY), 500)
    assert err["message"] == "internal server error" and "secret" not in err["message"]


def test_health_is_503_until_the_engine_runs(engine):
    app = build_app(engine, MODEL_NAME)
    # no lifespan: the engine loop was never started
    app.state.client = EngineClient(engine, AsyncEngine(engine), [MODEL_NAME], None,
                                    EngineMetrics(engine, MODEL_NAME))
    c = TestClient(app)
    assert error(c.get("/health"), 503)["code"] == "engine_not_ready"
    assert error(c.post("/v1/completions", json=BODY), 503)["code"] == "engine_not_ready"
    assert c.get("/metrics").status_code == 200
