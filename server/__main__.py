"""`python -m server`: serve a model (the embedded default unless --model says otherwise) on :7860."""

from __future__ import annotations

import logging
import sys
import threading

import uvicorn

from .app import create_app
from .settings import parse_args

FAILURE_GRACE_S = 2.0


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(), timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    # Stop a few seconds after a failure, so /health can say why (503) before the process exits non-zero.
    stop = lambda: setattr(server, "should_exit", True)  # noqa: E731
    app.state.holder.on_failure = lambda: threading.Timer(FAILURE_GRACE_S, stop).start()
    server.run()
    if app.state.holder.failed:  # the model did not load, or the engine stopped: the cause is logged
        sys.exit(1)


if __name__ == "__main__":
    main()
