"""The async engine: the scheduler loop in its own thread, requests in through an inbox, outputs out
through one asyncio queue per request.

The event loop never runs model code. `submit()` returns an async iterator of RequestOutput; leaving it early
(client disconnect, cancellation) aborts the request, which frees its slots before the next iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from model import HybridLM
from model.tokenizer import Tokenizer

from ..engine_io import EngineError, EngineOverloaded, GenerationRequest, RequestOutput
from .channel import DEFAULT_LIMIT, OutputChannel, deliver
from .core import CoreConfig, EngineCore, device_failed

log = logging.getLogger("aetheris.engine")


class Engine:
    def __init__(
        self,
        model: HybridLM,
        tokenizer: Tokenizer,
        cfg: CoreConfig,
        *,
        max_queue: int = 64,
        metrics=None,
        max_queue_tokens: int = 0,
        send_timeout: float = 30.0,
    ) -> None:
        self.core = EngineCore(model, tokenizer, cfg, metrics)
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.max_queue, self.max_queue_tokens, self.send_timeout = max_queue, max_queue_tokens, send_timeout
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queued = 0  # adds sent to the inbox and not yet taken by the loop
        self._queued_tokens = 0  # their prompt tokens
        self.beat = time.monotonic()  # the end of the loop's last pass: the watchdog's sign of progress
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._outbox: list[tuple] = []  # (loop, queue, output) emitted this iteration; engine thread only
        self._thread = threading.Thread(target=self._loop, name="aetheris-engine", daemon=True)
        # Called once the engine thread has ended for good (the server then exits, so an orchestrator restarts it).
        self.on_death: Callable[[], None] | None = None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> Engine:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(("wake",))
        self._thread.join(timeout=10)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stalled(self, seconds: float) -> bool:
        """The engine has work and has not finished a pass of its loop for `seconds` (0: never stalled)."""
        return bool(seconds) and self.core.has_work() and time.monotonic() - self.beat > seconds

    # ---------------------------------------------------------------- requests
    def submit(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Queue a request (EngineOverloaded past max_queue) and return the iterator of its outputs.

        Call from the event loop; iterate the result to the end or close it (aclose) to abort the request."""
        if not self.alive:
            raise EngineError("the engine has stopped; see the server log")
        loop = asyncio.get_running_loop()
        rid = req.request_id
        outputs = OutputChannel(rid, lambda: self.abort(rid), self.send_timeout, DEFAULT_LIMIT)
        with self._lock:
            self._check_queue(len(req.prompt_ids))
            self._queued += 1
            self._queued_tokens += len(req.prompt_ids)
        self._inbox.put(("add", req, lambda out: self._outbox.append((loop, outputs, out))))
        return self._outputs(rid, outputs)

    def _check_queue(self, prompt_tokens: int) -> None:
        """Refuse a request that would wait beyond the queue's bounds: requests (counting this one, so
        max_queue 0 still serves a free slot) and prompt tokens (a queue of 64 long prompts is hours)."""
        sched = self.core.scheduler
        if sched.blocked(self._queued + 1) > self.max_queue:
            raise EngineOverloaded(f"the server is busy: {self.max_queue} requests are already waiting")
        waiting = self._queued_tokens + sched.waiting_tokens + prompt_tokens
        if self.max_queue_tokens and sched.blocked(self._queued + 1) and waiting > self.max_queue_tokens:
            raise EngineOverloaded(
                f"the server is busy: over {self.max_queue_tokens} prompt tokens are already waiting"
            )

    async def _outputs(self, request_id: str, outputs: OutputChannel) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                if out.error is not None:
                    finished = True
                    raise EngineError(out.error)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    # ---------------------------------------------------------------- the scheduler thread
    def _loop(self) -> None:
        try:
            self._iterate()
        except BaseException as e:  # the thread is ending: nobody would ever answer the requests in flight
            log.critical("the engine thread stopped (%s: %s); /health answers 503", type(e).__name__, e)
            try:  # every request gets its error first; freeing their slots may fail on a failed device
                self.core.fail_all("the engine has stopped; see the server log")
            except Exception:
                log.exception("freeing the slots of the requests in flight failed")
            self._flush()
            if self.on_death is not None:
                self.on_death()
            raise

    def _iterate(self) -> None:
        while not self._stop.is_set():
            try:
                self._drain(block=not self.core.has_work())
                if self.core.has_work():
                    self.core.step()
            except Exception as e:  # keep serving: fail what was in flight, not the process
                if device_failed(e):  # ...unless the device itself failed: then every later step would too
                    raise
                log.exception("engine iteration failed")
                try:
                    self.core.fail_all(f"internal error in the engine: {type(e).__name__}")
                except Exception:
                    log.exception("failing the requests in flight failed too")
            self._flush()
            self.beat = time.monotonic()

    def _flush(self) -> None:
        """Hand the iteration's outputs to the event loop in one wake-up, not one per request."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for loop, outputs, out in self._outbox:
            by_loop.setdefault(loop, []).append((outputs, out))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that event loop has closed: nobody is listening
                loop.call_soon_threadsafe(deliver, items)

    def _drain(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if msg[0] == "add":
                with self._lock:
                    self._queued -= 1
                    self._queued_tokens -= len(msg[1].prompt_ids)
                    self.core.add(msg[1], msg[2])
            elif msg[0] == "abort":
                self.core.abort(msg[1])
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
        if self.metrics is not None:  # aborts change the gauges even when no step follows
            self.metrics.observe_core(self.core)
