"""FastAPI dependencies shared by the routers: the loaded model, and the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .errors import APIError
from .loading import ModelHolder
from .serving import Serving


def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


def get_serving(holder: Annotated[ModelHolder, Depends(get_holder)]) -> Serving:
    """The loaded model, or 503 (with Retry-After) while it loads or after it failed to."""
    if holder.serving is None:
        message = holder.error or "the model is still loading"
        raise APIError(503, message, code="model_loading", headers={"Retry-After": "2"})
    return holder.serving


def require_api_key(request: Request, holder: Annotated[ModelHolder, Depends(get_holder)]) -> None:
    """With --api-key set, the API routes need 'Authorization: Bearer <key>' (compared in constant time)."""
    expected = holder.settings.api_key
    if expected is None:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), expected.encode()):
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")


ServingDep = Annotated[Serving, Depends(get_serving)]
