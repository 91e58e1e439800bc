"""The FastAPI application factory: routes, auth, CORS, body limits, health and metrics.

The model loads in a background thread after the server starts listening, so /health answers 503
("loading") until the engine is ready and 200 after; API routes answer 503 meanwhile.
"""

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Annotated

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.checkpoint import load_model
from model.packed import can_pack, pack_linears

from . import errors
from .chat import create_chat_completion
from .completions import create_completion
from .core import CoreConfig
from .engine import Engine
from .errors import APIError, error_response
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    now,
)
from .serving import Serving
from .settings import Settings

log = logging.getLogger("aetheris.api")
PAGE = Path(__file__).with_name("static") / "index.html"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available")
    return torch.device(name)


def build_serving(settings: Settings, metrics: Metrics) -> Serving:
    """Load the model and start the engine (runs in a worker thread)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)
    dtype = DTYPES.get(settings.dtype)
    if dtype is None and device.type == "cuda":
        dtype = torch.bfloat16
    model, tokenizer = load_model(settings.model, device, dtype)
    if tokenizer is None:
        raise RuntimeError(f"{settings.model}: the checkpoint has no tokenizer.json, which serving needs")
    total, active = model.num_parameters()  # before packing, which moves weights out of the parameters
    if settings.pack_weights and can_pack(model):
        log.info("packed %d Linear layers for oneDNN", pack_linears(model))
    if settings.compile:
        t0 = time.perf_counter()
        try:
            model.compile_inference()
            log.info("compiled the decode step and the prefill scan in %.1f s", time.perf_counter() - t0)
        except Exception as e:  # an optimisation: serve eagerly rather than not at all
            log.warning("torch.compile failed (%s: %s); decoding eagerly", type(e).__name__, str(e)[:300])
    cfg = CoreConfig(settings.max_batch_size, settings.prefill_budget, int(settings.state_cache_mb * (1 << 20)))
    engine = Engine(model, tokenizer, cfg, settings.max_queue, metrics).start()
    log.info(
        "serving %s as '%s' on %s (%s): %.1fM parameters, %.1fM active",
        settings.model,
        settings.model_name,
        device,
        model.embeddings.weight.dtype,
        total / 1e6,
        active / 1e6,
    )
    return Serving(settings, engine, tokenizer)


class _BodyLimit:
    """413 for a body over the limit, whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send):
        mb = self.limit / (1 << 20)
        response = error_response(413, f"request body larger than {mb:g} MiB", code="request_too_large")
        await response(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """Raised from inside body reading; FastAPI re-raises HTTPExceptions unchanged (413, not a parse 400)."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


def create_app(settings: Settings, serving: Serving | None = None) -> FastAPI:
    """`serving` may be given ready-made (tests); otherwise the model loads in the background at startup."""
    metrics = serving.engine.metrics if serving is not None and serving.engine.metrics else Metrics()
    state = {"serving": serving, "error": None}

    def load() -> None:
        try:
            state["serving"] = build_serving(settings, metrics)
        except Exception as e:
            log.exception("loading the model failed")
            state["error"] = f"{type(e).__name__}: {e}"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state["serving"] is None:
            threading.Thread(target=load, name="aetheris-load", daemon=True).start()
        yield
        if state["serving"] is not None:
            await asyncio.to_thread(state["serving"].engine.shutdown)

    app = FastAPI(
        title="Aetheris",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible server for hybrid Mamba + MoE language models",
    )
    errors.install(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(_BodyLimit, limit=int(settings.max_body_mb * (1 << 20)))

    @app.middleware("http")
    async def request_id(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        response = await call_next(request)
        response.headers["X-Request-ID"] = rid
        return response

    def get_serving() -> Serving:
        if state["serving"] is None:
            raise APIError(
                503, state["error"] or "the model is still loading", code="model_loading", headers={"Retry-After": "2"}
            )
        return state["serving"]

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            raise APIError(
                401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    ServingDep = Annotated[Serving, Depends(get_serving)]
    api = [Depends(check_key)]

    @app.get("/health")
    async def health():
        s = state["serving"]
        if s is None:
            status = "failed" if state["error"] else "loading"
            return error_response(503, state["error"] or "the model is still loading", code=f"model_{status}")
        if not s.engine.alive:
            return error_response(503, "the engine thread has stopped", code="engine_dead")
        return {"status": "ok", "model": s.model_name}

    @app.get("/metrics")
    async def metrics_route():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=api)
    async def list_models(s: ServingDep) -> ModelList:
        return ModelList(data=[ModelCard(id=s.model_name, created=now())])

    @app.get("/v1/models/{model_id:path}", dependencies=api)
    async def get_model(model_id: str, s: ServingDep) -> ModelCard:
        s.check_model(model_id)
        return ModelCard(id=s.model_name, created=now())

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat(body: ChatCompletionRequest, request: Request, s: ServingDep):
        return await create_chat_completion(s, body, request)

    @app.post("/v1/completions", dependencies=api)
    async def completions(body: CompletionRequest, request: Request, s: ServingDep):
        return await create_completion(s, body, request)

    @app.post("/tokenize", dependencies=api)
    async def tokenize(body: TokenizeRequest, s: ServingDep):
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt", "invalid_value")
        if body.messages is not None:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
            ids = s.tokenizer.encode_chat(msgs, body.add_generation_prompt)
        else:
            ids = s.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": None}

    @app.post("/detokenize", dependencies=api)
    async def detokenize(body: DetokenizeRequest, s: ServingDep):
        s.check_tokens(body.tokens, "tokens")
        return {"prompt": s.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @app.get("/", include_in_schema=False)
    async def index():
        if PAGE.exists():
            return HTMLResponse(PAGE.read_text(encoding="utf-8"))
        return JSONResponse({"message": "Aetheris is running; the API is under /v1"})

    return app
