"""Pure ASGI middleware: the API key gate, the request-body limit and the X-Request-ID header.

Each wraps `receive` / `send` and nothing else: a Starlette BaseHTTPMiddleware (`@app.middleware("http")`)
would hide the client's http.disconnect from the route, and a non-streaming request whose client left
would keep its slot until it finished.
"""

from __future__ import annotations

import hmac
import uuid

from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_response


class BodyLimit:
    """413 for a body over the limit, whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited() -> Message:
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

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        mb = self.limit / (1 << 20)
        response = error_response(413, f"request body larger than {mb:g} MiB", code="request_too_large")
        await response(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """Raised from inside body reading; FastAPI re-raises HTTPExceptions unchanged (413, not a parse 400)."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


class RequestId:
    """Echo the client's X-Request-ID, or a fresh one, on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id")
        rid = given.decode("latin-1") if given else uuid.uuid4().hex[:16]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-ID"] = rid
            await send(message)

        await self.app(scope, receive, send_with_id)


OPEN = ("/health", "/")  # what stays open with --api-key: the health check and the chat page (it asks for the key)


class ApiKeyGate:
    """With --api-key, 401 on every route except `OPEN` (and /metrics unless --metrics-require-key), before
    anything reads the body: FastAPI reads and parses a body before its dependencies run, so a dependency
    would let anyone without the key make the server read and parse megabytes. A route added later is
    protected unless it is added to the open list. CORS preflights (OPTIONS) pass, so a browser can ask."""

    def __init__(self, app: ASGIApp, key: str | None, metrics: bool = False) -> None:
        self.app, self.key = app, key.encode() if key else None
        self.open = frozenset(OPEN + (() if metrics else ("/metrics",)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.key is None or scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in self.open:
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, key = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.key):
            return await self.app(scope, receive, send)
        message = "invalid or missing API key (send 'Authorization: Bearer <key>')"
        await error_response(401, message, code="invalid_api_key")(scope, receive, send)
