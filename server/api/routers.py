"""The HTTP routes, one router per endpoint group; each handler hands its work to the module named after it.
The API key is checked before any of them runs (middleware.ApiKeyGate); the chat page is page.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import tokenization
from .chat import create_chat_completion
from .completions import create_completion
from .deps import ServingDep, get_holder
from .errors import error_response
from .holder import ModelHolder
from .protocol import ChatCompletionRequest, CompletionRequest
from .responses import ModelCard, ModelList, now
from .tokenization import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse

HolderDep = Annotated[ModelHolder, Depends(get_holder)]

openai_router = APIRouter(prefix="/v1")
tokenizer_router = APIRouter()
ops_router = APIRouter()


@openai_router.get("/models")
async def list_models(s: ServingDep) -> ModelList:
    return ModelList(data=[ModelCard(id=s.model_name, created=now(), max_model_len=s.max_model_len)])


@openai_router.get("/models/{model_id:path}")
async def get_model(model_id: str, s: ServingDep) -> ModelCard:
    s.check_model(model_id)
    return ModelCard(id=s.model_name, created=now(), max_model_len=s.max_model_len)


@openai_router.post("/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request, s: ServingDep):
    return await create_chat_completion(s, body, request)


@openai_router.post("/completions")
async def completions(body: CompletionRequest, request: Request, s: ServingDep):
    return await create_completion(s, body, request)


@tokenizer_router.post("/tokenize")
async def tokenize(body: TokenizeRequest, s: ServingDep) -> TokenizeResponse:
    return await tokenization.tokenize(s, body)


@tokenizer_router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, s: ServingDep) -> DetokenizeResponse:
    return tokenization.detokenize(s, body)


@ops_router.get("/health")
async def health(holder: HolderDep):
    s = holder.serving
    if s is None:
        status = "failed" if holder.error else "loading"
        return error_response(503, holder.error or "the model is still loading", code=f"model_{status}")
    if not s.engine.alive:
        return error_response(503, "the engine thread has stopped", code="engine_dead")
    if s.engine.stalled(holder.settings.watchdog_s):
        message = f"the engine has made no progress for over {holder.settings.watchdog_s:g} s"
        return error_response(503, message, code="engine_stalled")
    return {"status": "ok", "model": s.model_name}


@ops_router.get("/metrics")
async def metrics(holder: HolderDep) -> Response:
    return Response(generate_latest(holder.metrics.registry), media_type=CONTENT_TYPE_LATEST)
