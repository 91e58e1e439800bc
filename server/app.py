"""The FastAPI application: the api/ pieces put together with the loader that builds the model behind them.

Where things are: api/holder.py (the model, loading in the background), api/routers.py and api/page.py (the
routes), api/middleware.py (API key, body limit, request id), api/errors.py (OpenAI-shaped errors), loading.py
(settings -> model -> engine).
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .api import errors
from .api.holder import ModelHolder, lifespan
from .api.middleware import ApiKeyGate, BodyLimit, RequestId
from .api.page import page_router
from .api.routers import openai_router, ops_router, tokenizer_router
from .api.serving import Serving
from .loading import build_serving
from .settings import Settings


def create_app(settings: Settings, serving: Serving | None = None) -> FastAPI:
    """`serving` may be given ready-made (tests); otherwise the model loads in the background at startup."""
    app = FastAPI(
        title="Aetheris",
        version="0.1.0",
        lifespan=lifespan,
        description="OpenAI-compatible server for hybrid Mamba + MoE language models",
    )
    app.state.holder = ModelHolder(settings, serving, loader=build_serving)
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
