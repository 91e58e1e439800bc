"""The scheduler: which requests run this iteration. It admits waiting requests while pool slots remain and
plans prompt chunks under the per-iteration prefill budget; it runs no model code.

Every running sequence decodes at each iteration (continuous batching), so the scheduler's choices are
admission and prefill. A request's computed-token count chases its prompt length (vLLM's framing).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from model import ModelState
from model.tokenizer import Tokenizer

from ..engine_io import GenerationRequest, RequestOutput, TokenLogprob
from .prefix_cache import PrefixCache, Snapshot
from .sequence import Sequence
from .state_pool import StatePool

Emit = Callable[[RequestOutput], None]


@dataclass
class RequestState:
    """A request inside the engine, from arrival to its last output."""

    req: GenerationRequest
    emit: Emit
    arrival: float = field(default_factory=time.perf_counter)
    seqs: list[Sequence] = field(default_factory=list)
    state: ModelState | None = None  # (one row) the prompt so far, while prefilling
    computed: int = 0  # prompt tokens already folded into `state`
    cached: int = 0  # of which restored from a snapshot
    last_logits: Tensor | None = None  # (V,) after the last computed prompt token
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    first_token_at: float | None = None
    points: set[int] = field(default_factory=set)  # prompt positions to snapshot at (besides the interval)
    follow: tuple[RequestState, int] | None = None  # (leader, n): wait until the leader has computed n tokens
    snapshot: Snapshot | None = None  # the last snapshot of this prompt made or restored: the next insert's start

    def __post_init__(self) -> None:
        self.points.update(p for p in self.req.snapshot_at if 0 < p < len(self.req.prompt_ids))

    @property
    def request_id(self) -> str:
        return self.req.request_id


@dataclass
class Admission:
    admitted: list[RequestState] = field(default_factory=list)  # hold slots from now on; need a start state
    rejected: list[tuple[RequestState, str]] = field(default_factory=list)  # invalid parameters: (request, why)


@dataclass
class PrefillChunk:
    request: RequestState
    start: int  # prompt positions [start, end); empty when the prompt is already computed (a full cache hit)
    end: int
    snapshot: bool = False  # keep a snapshot of the state after `end` (a message boundary or an interval)

    @property
    def tokens(self) -> list[int]:
        return self.request.req.prompt_ids[self.start : self.end]

    @property
    def completes(self) -> bool:
        return self.end == len(self.request.req.prompt_ids)


MIN_SHARED = 32  # tokens two prompts must share beyond the cache before the later one waits for the earlier


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    def __init__(
        self, pool: StatePool, prefill_budget: int, tokenizer: Tokenizer, cache: PrefixCache, interval: int = 256
    ) -> None:
        self.pool, self.prefill_budget, self.tokenizer = pool, prefill_budget, tokenizer
        self.cache, self.interval = cache, interval
        self.stop_ids = set(tokenizer.stop_token_ids)
        self.waiting: deque[RequestState] = deque()
        self.prefilling: list[RequestState] = []
        self.requests: dict[str, RequestState] = {}
        self.waiting_tokens = 0  # prompt tokens in `waiting`; the event loop reads it to bound the queue
        self._turn = 0  # which prefilling request goes first this iteration (round-robin)

    def add(self, r: RequestState) -> None:
        self.requests[r.request_id] = r
        self.waiting.append(r)
        self.waiting_tokens += len(r.req.prompt_ids)

    def remove(self, request_id: str) -> RequestState | None:
        """Forget a request wherever it is; its pool rows are the runner's to free."""
        r = self.requests.pop(request_id, None)
        if r is not None and r in self.waiting:
            self.waiting.remove(r)
            self.waiting_tokens -= len(r.req.prompt_ids)
        if r is not None and r in self.prefilling:
            self.prefilling.remove(r)
        return r

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.pool.used)

    def free_slots(self) -> int:
        """Slots neither running nor reserved by a prefilling request (a request with n choices needs n).
        The event loop reads this too, hence the copy of a list the engine thread changes."""
        return self.pool.size - self.pool.used - sum(r.req.params.n for r in list(self.prefilling))

    def free_blocks(self) -> int:
        """K/V blocks neither held by running sequences nor reserved by prefilling requests."""
        return self.pool.free_blocks - sum(self._blocks(r) for r in list(self.prefilling))

    def _blocks(self, r: RequestState) -> int:
        p = r.req.params
        return self.pool.blocks_needed(len(r.req.prompt_ids) + p.max_tokens, p.n)

    def fits(self, r: RequestState) -> bool:
        """Its n slots are free, and so are the K/V blocks for prompt + max_tokens of each choice."""
        return r.req.params.n <= self.free_slots() and self._blocks(r) <= self.free_blocks()

    def blocked(self, queued: int) -> int:
        """Requests that will not find a free slot at the next iteration, counting `queued` not yet added."""
        return max(0, queued + len(self.waiting) - max(0, self.free_slots()))

    def admit(self) -> Admission:
        """Move waiting requests, in arrival order, to prefilling while their slots and K/V blocks are free."""
        out = Admission()
        while self.waiting and self.fits(self.waiting[0]):
            r = self.waiting.popleft()
            self.waiting_tokens -= len(r.req.prompt_ids)
            p = r.req.params
            try:
                r.seqs = [Sequence.create(r.request_id, i, p, self.tokenizer, self.stop_ids) for i in range(p.n)]
            except (ValueError, RuntimeError, OverflowError) as e:  # this request's parameters, not the engine
                self.requests.pop(r.request_id, None)
                out.rejected.append((r, f"invalid request: {e}"))
                continue
            r.follow = self._leader(r)
            self.prefilling.append(r)
            out.admitted.append(r)
        return out

    def _leader(self, r: RequestState) -> tuple[RequestState, int] | None:
        """A prefilling request whose prompt shares more with r's than the cache holds, at a position it has
        not computed yet: r waits for its snapshot there (one prefill of a shared prefix, not two)."""
        if r.req.params.prompt_logprobs:  # starts from scratch whatever the cache holds
            return None
        have, best = self.cache.match_length(r.req.prompt_ids, r.req.tenant), None
        for other in self.prefilling:
            if other.req.tenant != r.req.tenant:  # never wait on (or learn from) another tenant's prompt
                continue
            n = common_prefix(other.req.prompt_ids, r.req.prompt_ids)
            if n - have >= MIN_SHARED and n > other.computed and other.follow is None and (not best or n > best[1]):
                best = (other, n)
        if best is not None:
            best[0].points.add(best[1])
        return best

    def released(self) -> list[RequestState]:
        """Followers whose leader has computed the shared prefix (its snapshot is in the cache) or is gone:
        they start now, from the deepest snapshot."""
        out = []
        for r in self.prefilling:
            if r.follow is not None:
                leader, n = r.follow
                if leader.computed >= n or leader.request_id not in self.requests:
                    r.follow = None
                    out.append(r)
        return out

    def plan_prefill(self) -> list[PrefillChunk]:
        """Prompt chunks for this iteration, each ending at the next snapshot point so a snapshot is a copy,
        never a recomputation. A prompt already computed (a full cache hit) completes at once, whatever the
        budget. The budget is shared fairly by the prompts still prefilling: the least needy first, each up to
        an equal share of what is left, so a short prompt behind a 50,000-token one is prefilled within an
        iteration or two; when there are more prompts than tokens, who goes first rotates. A request whose
        chunks complete its prompt leaves `prefilling`: the runner puts it in the pool this iteration."""
        chunks, active = [], []
        for r in list(self.prefilling):
            if r.follow is not None:
                continue
            if r.computed == len(r.req.prompt_ids):
                chunks.append(PrefillChunk(r, r.computed, r.computed))
                self.prefilling.remove(r)
            else:
                active.append(r)
        if not active:
            return chunks
        k = self._turn % len(active)
        self._turn += 1
        order = sorted(active[k:] + active[:k], key=lambda r: len(r.req.prompt_ids) - r.computed)
        budget = self.prefill_budget
        for i, r in enumerate(order):
            if budget <= 0:
                break
            share = max(1, budget // (len(order) - i))
            mine = self._chunks(r, share)
            chunks += mine
            budget -= sum(c.end - c.start for c in mine)
        return chunks

    def _chunks(self, r: RequestState, allowance: int) -> list[PrefillChunk]:
        """Up to `allowance` tokens of r's prompt, split at its snapshot points."""
        out, pos, total = [], r.computed, len(r.req.prompt_ids)
        stop = min(total, pos + allowance)
        while pos < stop:
            end = min(stop, self._next_point(r, pos))
            out.append(PrefillChunk(r, pos, end, snapshot=end in r.points or self._on_interval(end)))
            pos = end
        if pos == total:
            self.prefilling.remove(r)
        return out

    def _on_interval(self, pos: int) -> bool:
        return bool(self.interval) and pos % self.interval == 0

    def _next_point(self, r: RequestState, pos: int) -> int:
        """The first snapshot point after `pos`: a message boundary, a leader's share point or an interval."""
        interval = (pos // self.interval + 1) * self.interval if self.interval else len(r.req.prompt_ids)
        return min([p for p in r.points if p > pos] + [interval])
