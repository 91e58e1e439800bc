"""What the chat and completions handlers share: the response's usage object, and answering with a stream of
server-sent events or a whole response, aborting the request when the client leaves either way."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import Request

from ..engine_io import Usage
from .protocol import PromptTokensDetails, StreamOptions, UsageInfo
from .serving import Serving
from .streaming import sse_response, until_disconnect


def usage_info(u: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


def include_usage(stream_options: StreamOptions | None) -> bool:
    """Whether a stream ends with a chunk that carries the usage (stream_options.include_usage)."""
    return bool(stream_options and stream_options.include_usage)


async def respond(
    serving: Serving,
    request: Request,
    stream: bool,
    events: Callable[[], AsyncIterator[dict]],
    whole: Callable[[], Awaitable],
    abort: Callable[[], None],
):
    """The SSE response over `events()` when the client asked for a stream, else the awaited `whole()`; a
    client that goes away aborts the request in both cases."""
    if stream:
        return sse_response(events(), abort, serving.settings.send_timeout)
    return await until_disconnect(request, whole(), abort)
