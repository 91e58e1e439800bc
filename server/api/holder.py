"""The app's one model, loaded in the background: the server listens before the model is ready, /health
answers 503 ("loading") until `ModelHolder.serving` is set, and the API routes answer 503 meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from ..metrics import Metrics
from ..settings import Settings
from .serving import Serving

log = logging.getLogger("aetheris.api")


class ModelHolder:
    """The loaded model (None while loading), or the error that stopped it loading. `loader` builds the
    `Serving` from the settings and the app's metrics (server/loading.py)."""

    def __init__(
        self,
        settings: Settings,
        serving: Serving | None = None,
        loader: Callable[[Settings, Metrics], Serving] | None = None,
    ) -> None:
        self.settings, self.serving, self.loader = settings, serving, loader
        self.error: str | None = None
        self.metrics = serving.engine.metrics if serving is not None and serving.engine.metrics else Metrics()
        # Called when loading fails or the engine stops for good; `python -m server` stops the server with it, so
        # the process exits non-zero and `docker run` or an orchestrator shows the cause (and restarts it),
        # instead of a server answering 503 forever.
        self.on_failure: Callable[[], None] | None = None

    @property
    def failed(self) -> bool:
        """The model did not load, or its engine has stopped for good."""
        return self.error is not None or (self.serving is not None and not self.serving.engine.alive)

    def load(self) -> None:
        try:
            self.serving = self.loader(self.settings, self.metrics)
            self.serving.engine.on_death = lambda: self.on_failure and self.on_failure()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.error("could not load the model %s: %s", self.settings.model, self.error)
            log.debug("the loader's traceback:", exc_info=True)
            if self.on_failure is not None:
                self.on_failure()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start loading when the server starts (the loader runs beside the event loop); stop the engine at exit."""
    holder: ModelHolder = app.state.holder
    if holder.serving is None and holder.loader is not None:
        threading.Thread(target=holder.load, name="aetheris-load", daemon=True).start()
    yield
    if holder.serving is not None:
        await asyncio.to_thread(holder.serving.engine.shutdown)
