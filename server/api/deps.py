"""FastAPI dependencies shared by the routers: the app's model holder and the loaded model."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .errors import APIError
from .holder import ModelHolder
from .serving import Serving


def get_holder(request: Request) -> ModelHolder:
    return request.app.state.holder


def get_serving(holder: Annotated[ModelHolder, Depends(get_holder)]) -> Serving:
    """The loaded model, or 503 (with Retry-After) while it loads or after it failed to."""
    if holder.serving is None:
        message = holder.error or "the model is still loading"
        raise APIError(503, message, code="model_loading", headers={"Retry-After": "2"})
    return holder.serving


ServingDep = Annotated[Serving, Depends(get_serving)]
