"""Server-sent events (sse-starlette) and client-disconnect handling shared by the completion routes.

Conventions the OpenAI SDK relies on: one `data: <json>` event per chunk,
`: ping` comments as keep-alives, an error after the stream started as a `data: {"error": ...}` event, and
`data: [DONE]` last, always.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import orjson
from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from ..engine_io import EngineError
from .errors import error_body

log = logging.getLogger("aetheris.api")
T = TypeVar("T")
PING_SECONDS = 15


def _event(data: str) -> ServerSentEvent:
    return ServerSentEvent(data=data, sep="\n")


def sse_response(
    events: AsyncIterator[dict], abort: Callable[[], None], send_timeout: float | None = None
) -> EventSourceResponse:
    """Stream JSON chunks; close with [DONE], turning a failure into an error event first. However the stream
    ends (finished, failed, client gone, a send blocked past `send_timeout` by a client that stopped
    reading), `abort` runs: a no-op for finished requests, and the only way to stop requests whose output
    iterator never started (a disconnect during the first chunks)."""

    async def frames():
        try:
            async for event in events:
                yield _event(orjson.dumps(event).decode())  # compact UTF-8, several times faster than json
        except EngineError as e:
            yield _event(json.dumps(error_body(500, str(e), code="engine_error")))
        except Exception:
            log.exception("stream failed")
            yield _event(json.dumps(error_body(500, "internal error while streaming")))
        finally:
            abort()
            with contextlib.suppress(Exception):
                await events.aclose()
        yield _event("[DONE]")

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return EventSourceResponse(
        frames(),
        ping=PING_SECONDS,
        sep="\n",
        headers=headers,
        send_timeout=send_timeout,
        ping_message_factory=lambda: ServerSentEvent(comment="ping", sep="\n"),
    )


async def until_disconnect(request: Request, work: Awaitable[T], abort: Callable[[], None]) -> T:
    """Run `work` (a non-streaming completion); if the client goes away first, cancel it and abort its
    requests, which frees their slots at the engine's next iteration.

    The body has been read when this runs, so the next message on the receive channel is http.disconnect;
    waiting on it sees the client leave at once, with no polling."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        log.info("client disconnected; aborting its request")
        raise asyncio.CancelledError("client disconnected")
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            abort()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _disconnected(request: Request) -> None:
    """Return when the ASGI server reports that the client closed the connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as their items arrive, tagged with the iterator's position."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, it: AsyncIterator[T]):
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as e:  # hand the failure to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for it in streams:
            with contextlib.suppress(Exception):
                await it.aclose()
