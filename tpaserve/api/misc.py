"""Small endpoints: GET /v1/models (and /v1/models/{id}), /health, /version, /metrics."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

import tpaserve
from tpaserve.api.engine_client import EngineClient
from tpaserve.api.errors import OpenAIRoute, error_responses
from tpaserve.api.protocol import ModelCard, ModelList
from tpaserve.frontend.metrics import render as render_metrics

router = APIRouter(route_class=OpenAIRoute)


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _card(client: EngineClient, name: str) -> ModelCard:
    # root is the served name, as vLLM's: the checkpoint's path on this machine is nobody's
    # business over HTTP
    return ModelCard(id=name, root=name, max_model_len=client.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401))
async def list_models(request: Request) -> Response:
    client: EngineClient = request.app.state.client
    return _json(ModelList(data=[_card(client, n) for n in client.model_names]))


@router.get("/v1/models/{model:path}", response_model=ModelCard,
            responses=error_responses(401, 404))
async def get_model(model: str, request: Request) -> Response:
    client: EngineClient = request.app.state.client
    return _json(_card(client, client.check_model(model)))


@router.get("/health", response_class=Response,
            responses={200: {"description": "The engine runs (empty body)."},
                       **error_responses(503)})
async def health(request: Request) -> Response:
    """200 with an empty body while the engine runs; 503 before it started, while the
    server drains after SIGTERM, and after the engine died (load balancers and k8s probes
    read the status only)."""
    request.app.state.client.check_ready(getattr(request.app.state, "draining", False))
    return Response(status_code=200)


@router.get("/version", responses={200: {"content": {"application/json": {"schema": {
    "type": "object", "required": ["version"],
    "properties": {"version": {"type": "string"}}}}}}})
async def version() -> Response:
    return JSONResponse({"version": tpaserve.__version__})


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    body, content_type = render_metrics()
    return Response(body, media_type=content_type)
