"""One request's outputs on their way from the engine thread to its HTTP handler: a bounded channel.

The engine decodes at its own pace, whatever each client reads. A stream whose client stops reading blocks
its handler in `send`, and an unbounded queue in front of it would grow with every token. This channel holds
at most `limit` messages: past that, a new message is merged into the last one (the handler reads deltas in
order, so a merged message means the same), and when the channel has stayed full for `send_timeout` seconds
the request is aborted (its slot freed) and the handler, if it ever reads again, finds an error.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from ..engine_io import RequestOutput

DEFAULT_LIMIT = 64  # messages; a reading client takes one per engine iteration


class OutputChannel:
    """Filled by the event loop on the engine's behalf (`put`), drained by the request's handler (`get`)."""

    def __init__(self, request_id: str, on_stall: Callable[[], None], send_timeout: float, limit: int) -> None:
        self.request_id, self.on_stall = request_id, on_stall
        self.send_timeout, self.limit = send_timeout, limit
        self.items: deque[RequestOutput] = deque()
        self.ready = asyncio.Event()
        self.full_since: float | None = None
        self.stalled = False

    def put(self, out: RequestOutput) -> None:
        if self.stalled:
            return
        if len(self.items) < self.limit or out.prompt_logprobs is not None or self.items[-1].prompt_logprobs:
            self.items.append(out)
        else:
            _merge(self.items[-1], out)
            self._check_stall()
        self.ready.set()

    def _check_stall(self) -> None:
        now = time.monotonic()
        if self.full_since is None:
            self.full_since = now
        elif now - self.full_since > self.send_timeout:
            self.stalled = True
            self.items.clear()
            message = f"the client read nothing for {self.send_timeout:g} s; the request was aborted"
            self.items.append(RequestOutput(self.request_id, finished=True, error=message))
            self.on_stall()

    async def get(self) -> RequestOutput:
        """Everything that arrived since the last read, as one message: a handler that fell behind by several
        engine iterations sends their tokens in one event instead of one event each."""
        while not self.items:
            self.ready.clear()
            await self.ready.wait()
        out = self.items.popleft()
        while self.items and not (out.prompt_logprobs or self.items[0].prompt_logprobs):
            _merge(out, self.items.popleft())
        self.full_since = None
        return out


def _merge(into: RequestOutput, out: RequestOutput) -> None:
    """Fold `out` into the message before it: each choice's new text, tokens and logprobs appended to that
    choice's delta (so the handler sends one chunk per choice), the latest usage and end."""
    last = {d.index: d for d in into.deltas}
    for d in out.deltas:
        prev = last.get(d.index)
        if prev is None or prev.finish_reason is not None:
            into.deltas.append(d)
            last[d.index] = d
            continue
        prev.text += d.text
        prev.token_ids.extend(d.token_ids)
        prev.logprobs.extend(d.logprobs)
        prev.finish_reason = d.finish_reason
    into.usage = out.usage or into.usage
    into.finished = into.finished or out.finished
    into.error = into.error or out.error


def deliver(items: list[tuple[OutputChannel, RequestOutput]]) -> None:
    """Runs on the event loop: one wake-up hands an engine iteration's outputs to their channels."""
    for channel, out in items:
        channel.put(out)
