"""streaming.py through real ASGI apps in-process: sse_response's events, its error event and [DONE], the abort
callback however a stream ends; until_disconnect's cancel-and-abort when the client leaves; merge()."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from server.api.streaming import merge, sse_response, until_disconnect
from server.engine_io import EngineError


async def _gen(items, delay: float, closed: list, fail: bool = False):
    try:
        for item in items:
            await asyncio.sleep(delay)
            yield item
        if fail:
            raise RuntimeError("engine failed")
    finally:
        closed.append(items[0])


def test_merge_interleaves_tagged_by_stream_and_keeps_each_order():
    async def run():
        closed: list = []
        got = [x async for x in merge([_gen(["a1", "a2", "a3"], 0.03, closed), _gen(["b1", "b2"], 0.01, closed)])]
        return got, closed

    got, closed = asyncio.run(run())
    assert sorted(got) == [(0, "a1"), (0, "a2"), (0, "a3"), (1, "b1"), (1, "b2")]
    assert [x for i, x in got if i == 0] == ["a1", "a2", "a3"] and [x for i, x in got if i == 1] == ["b1", "b2"]
    assert got.index((1, "b2")) < got.index((0, "a3"))  # the faster stream is not held back by the slower
    assert sorted(closed) == ["a1", "b1"]


def test_merge_raises_a_streams_failure_and_closes_the_others():
    async def run():
        closed: list = []
        got = []
        with pytest.raises(RuntimeError, match="engine failed"):
            async for x in merge([_gen(["a1"], 0.01, closed, fail=True), _gen(["b1"] * 50, 0.01, closed)]):
                got.append(x)
        await asyncio.sleep(0.05)
        return got, closed

    got, closed = asyncio.run(run())
    assert (0, "a1") in got and sorted(closed) == ["a1", "b1"]


def _sse_app(events, log: list) -> Starlette:
    """One route streaming `events()`; `log` records the abort call and the events iterator's closing."""

    async def closing():
        try:
            async for e in events():
                yield e
        finally:
            log.append("closed")

    async def route(request):
        return sse_response(closing(), abort=lambda: log.append("abort"))

    return Starlette(routes=[Route("/s", route)])


def _get(app: Starlette, path: str) -> httpx.Response:
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get(path)

    return asyncio.run(run())


def _data(body: str) -> list[str]:
    """The data fields of an SSE body, in order (pings and other fields dropped)."""
    return [line.removeprefix("data: ") for line in body.split("\n") if line.startswith("data: ")]


def test_sse_streams_each_chunk_as_a_data_event_then_done():
    async def events():
        yield {"i": 0, "text": "caf\u00e9"}
        yield {"i": 1, "text": "\U0001f642"}

    log: list = []
    r = _get(_sse_app(events, log), "/s")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    data = _data(r.text)
    assert [json.loads(d) for d in data[:-1]] == [{"i": 0, "text": "caf\u00e9"}, {"i": 1, "text": "\U0001f642"}]
    assert data[-1] == "[DONE]" and "caf\u00e9" in r.text  # UTF-8, not \\u escapes
    assert log == ["closed", "abort"]  # a finished stream still calls abort (a no-op for the engine)


@pytest.mark.parametrize(
    "error,message,code",
    [(EngineError("the engine failed"), "the engine failed", "engine_error"),
     (KeyError("x"), "internal error while streaming", None)],
)  # fmt: skip
def test_an_error_mid_stream_becomes_an_error_event_before_done(error, message, code):
    async def events():
        yield {"i": 0}
        raise error

    log: list = []
    data = _data(_get(_sse_app(events, log), "/s").text)
    assert json.loads(data[0]) == {"i": 0}
    assert json.loads(data[1]) == {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    assert data[2:] == ["[DONE]"] and log == ["closed", "abort"]


async def _drive(app: Starlette, leave: asyncio.Event) -> tuple[list[dict], bool]:
    """One GET through the ASGI app whose client disconnects once `leave` is set: (the messages sent back,
    whether the app ended by raising CancelledError, as a route whose client left does)."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http"}
    scope |= {"path": "/s", "raw_path": b"/s", "query_string": b"", "headers": [], "server": ("t", 80)}
    try:
        await asyncio.wait_for(app(scope, receive, send), 30)  # a guard against a hang, not a timing check
    except asyncio.CancelledError:
        return sent, True
    return sent, False


def test_sse_client_disconnect_aborts_and_closes_the_stream():
    leave = asyncio.Event()

    async def events():
        yield {"i": 0}
        leave.set()  # the client leaves after the first chunk; the engine sends nothing more
        await asyncio.Event().wait()
        yield {"i": 1}

    log: list = []
    sent, _ = asyncio.run(_drive(_sse_app(events, log), leave))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    assert _data(body) == ['{"i":0}'] and log == ["closed", "abort"]  # no [DONE] to a client that left


def _until_disconnect_app(work, log: list) -> Starlette:
    async def route(request: Request):
        await request.body()
        return JSONResponse(await until_disconnect(request, work(), abort=lambda: log.append("abort")))

    return Starlette(routes=[Route("/s", route)])


def test_until_disconnect_returns_the_result_when_the_work_finishes_first():
    async def work():
        await asyncio.sleep(0)
        return {"done": True}

    log: list = []
    (start, body), cancelled = asyncio.run(_drive(_until_disconnect_app(work, log), asyncio.Event()))
    assert start["status"] == 200 and json.loads(body["body"]) == {"done": True}
    assert not cancelled and log == []


def test_until_disconnect_cancels_the_work_and_aborts_when_the_client_leaves():
    leave = asyncio.Event()

    async def work():
        try:
            leave.set()  # the client leaves while the completion runs
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("cancelled")
            raise

    log: list = []
    sent, cancelled = asyncio.run(_drive(_until_disconnect_app(work, log), leave))
    assert cancelled and sent == [] and sorted(log) == ["abort", "cancelled"]
