"""The FastAPI application factory: state, middleware, error handlers and routers put together.

Where things are: loading.py (the lifespan that loads the model), deps.py (auth and the loaded model as
dependencies), routers.py (the routes), middleware.py (body limit, request id), errors.py (OpenAI-shaped
errors).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from . import errors
from .loading import ModelHolder, lifespan
from .middleware import ApiKeyGate, BodyLimit, RequestId
from .routers import openai_router, ops_router, page_router, tokenizer_router
from .serving import Serving
from .settings import Settings


def create_app(settings: Settings, serving: Serving | None = None) -> FastAPI:
    """`serving` may be given ready-made (tests); otherwise the model loads in the background at startup."""
    app = FastAPI(
        title="Aetheris",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible server for hybrid Mamba + MoE language models",
    )
    app.state.holder = ModelHolder(settings, serving)
    errors.install(app)
    # Added first, so innermost: CORS (outside it) answers preflights and adds its headers to a 401.
    app.add_middleware(ApiKeyGate, key=settings.api_key, metrics=settings.metrics_require_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(BodyLimit, limit=int(settings.max_body_mb * (1 << 20)))
    app.add_middleware(RequestId)
    for router in (openai_router, tokenizer_router, ops_router, page_router):
        app.include_router(router)
    return app
