"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info."""
from __future__ import annotations

import json

from fastapi import APIRouter, Request
from starlette.responses import Response

from tpaserve.api.chat import encode_chat
from tpaserve.api.engine_client import EngineClient, off_loop
from tpaserve.api.errors import OpenAIRoute, bad_request, error_responses
from tpaserve.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(route_class=OpenAIRoute)


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


@router.post("/tokenize", response_model=TokenizeResponse,
             responses=error_responses(400, 401, 404, 413))
async def tokenize(body: TokenizeRequest, request: Request) -> Response:
    client: EngineClient = request.app.state.client
    client.check_model(body.model)
    tok = client.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt (text) and messages (chat)", "prompt")
    if body.prompt is not None:
        ids = await off_loop(lambda: tok.encode(
            body.prompt, add_special_tokens=body.add_special_tokens is not False))
    else:
        ids = await off_loop(encode_chat, client.tokenizer_for("messages"), body.messages,
                             body.add_generation_prompt, body.add_special_tokens)
    return _json(TokenizeResponse(
        count=len(ids), max_model_len=client.max_model_len, tokens=ids,
        token_strs=tok.convert_ids_to_tokens(ids) if body.return_token_strs else None))


@router.post("/detokenize", response_model=DetokenizeResponse,
             responses=error_responses(400, 401, 404, 413))
async def detokenize(body: DetokenizeRequest, request: Request) -> Response:
    client: EngineClient = request.app.state.client
    client.check_model(body.model)
    tok = client.tokenizer
    client.check_token_ids(body.tokens, "tokens")
    return _json(DetokenizeResponse(prompt=tok.decode(body.tokens)))


@router.get("/tokenizer_info", responses={
    200: {"content": {"application/json": {"schema": {"type": "object"}}}},
    **error_responses(400, 401)})
async def tokenizer_info(request: Request) -> Response:
    client: EngineClient = request.app.state.client
    tok = client.tokenizer

    def name(i: int | None) -> str | None:
        return None if i is None else tok.convert_ids_to_tokens([i])[0]

    return Response(json.dumps({
        "tokenizer_class": type(tok).__name__,
        "name_or_path": client.model_names[0],      # the served name, never a path
        "vocab_size": tok.vocab_size,
        "model_max_length": client.max_model_len,
        "bos_token": name(tok.bos_token_id), "bos_token_id": tok.bos_token_id,
        "eos_token": name(tok.eos_token_id), "eos_token_id": tok.eos_token_id,
        "chat_template": tok.chat_template,
    }), media_type="application/json")
