"""The Scheduler on its own, over a StatePool and PrefixCache of a tiny model as EngineCore builds them: who is
admitted, how the prefill budget is shared, where chunks end, and what removal forgets. No model runs: the
tests play the runner's part by advancing each request's computed count to the end of its chunks."""

from __future__ import annotations

import random

import pytest
import torch

from model import HybridLM
from server.engine.prefix_cache import PrefixCache
from server.engine.scheduler import MIN_SHARED, RequestState, Scheduler
from server.engine.state_pool import StatePool
from server.engine_io import GenerationRequest, SamplingParams
from tests.helpers import tiny_config, toy_tokenizer


class Row:
    slot = -1


@pytest.fixture(scope="module")
def model():
    return HybridLM(tiny_config(toy_tokenizer().vocab_size)).eval()


def _scheduler(model, slots=4, budget=64, interval=0) -> Scheduler:
    pool = StatePool(model, slots, torch.device("cpu"))
    return Scheduler(pool, budget, toy_tokenizer(), PrefixCache(1 << 20), interval)


def _req(rid: str, length: int = 0, n: int = 1, prompt: list[int] | None = None, **kw) -> RequestState:
    """A request for n choices; its prompt is `prompt`, or `length` tokens drawn from its id (no two alike)."""
    rng = random.Random(rid)
    prompt = prompt or [rng.randrange(5, 290) for _ in range(length)]
    return RequestState(GenerationRequest(rid, prompt, SamplingParams(n=n, max_tokens=4), **kw), emit=lambda out: None)


def _run(chunks) -> dict[str, tuple[int, int]]:
    """Play the runner: fold each chunk into its request; the span planned for each request."""
    spans = {}
    for c in chunks:
        assert c.start == c.request.computed  # chunks continue exactly where the prompt stands
        c.request.computed = c.end
        spans[c.request.request_id] = (spans.get(c.request.request_id, (c.start,))[0], c.end)
    return spans


def test_admission_while_slots_are_free_in_arrival_order(model):
    s = _scheduler(model, slots=3)
    a, b, c = _req("a", 5, n=2), _req("b", 5, n=2), _req("c", 7)
    for r in (a, b, c):
        s.add(r)
    assert [r.request_id for r in s.admit().admitted] == ["a"]  # a holds 2 slots; b needs 2 of the 1 left
    assert s.free_slots() == 1 and list(s.waiting) == [b, c] and s.waiting_tokens == 12
    assert len(a.seqs) == 2 and [q.index for q in a.seqs] == [0, 1]
    assert s.admit().admitted == []  # c would fit, but waits behind b: arrival order
    s.pool.add([Row()], model.empty_state(1), 0)  # one slot running a sequence counts too
    s.remove("a")
    assert s.free_slots() == 2 and s.blocked(queued=1) == 1  # b and c waiting, a third coming: one will wait
    assert [r.request_id for r in s.admit().admitted] == ["b"]
    assert s.free_slots() == 0 and list(s.waiting) == [c] and s.waiting_tokens == 7


def test_the_prefill_budget_goes_to_the_least_needy_first_each_up_to_an_equal_share(model):
    s = _scheduler(model, budget=40)
    for r in (_req("long", 100), _req("short", 10), _req("mid", 30)):
        s.add(r)
    s.admit()
    # shares of 40 over three prompts: short takes its 10 (< 13), mid 15 of the 30 left over two, long the 15 left
    assert _run(s.plan_prefill()) == {"short": (0, 10), "mid": (0, 15), "long": (0, 15)}
    assert [r.request_id for r in s.prefilling] == ["long", "mid"]  # a completed prompt leaves `prefilling`
    assert _run(s.plan_prefill()) == {"mid": (15, 30), "long": (15, 40)}
    assert _run(s.plan_prefill()) == {"long": (40, 80)}


@pytest.mark.parametrize("seed", range(5))
def test_the_budget_is_spent_whole_never_exceeded_and_every_prompt_gets_its_share(model, seed):
    rng = random.Random(seed)
    budget = rng.randrange(3, 60)
    s = _scheduler(model, slots=8, budget=budget, interval=rng.choice([0, 7]))
    reqs = [_req(f"r{i}", rng.randrange(1, 120)) for i in range(rng.randrange(1, 8))]
    for r in reqs:
        s.add(r)
    s.admit()
    while s.prefilling:
        need = {r.request_id: len(r.req.prompt_ids) - r.computed for r in s.prefilling}
        spans = _run(s.plan_prefill())
        got = {rid: end - start for rid, (start, end) in spans.items()}
        assert sum(got.values()) == min(budget, sum(need.values()))
        if len(need) <= budget:  # else one token each, the first ones in turn
            assert all(got[rid] >= min(n, budget // len(need)) for rid, n in need.items())
    assert all(r.computed == len(r.req.prompt_ids) for r in reqs)


def test_a_fully_cached_prompt_completes_at_once_whatever_the_budget(model):
    s = _scheduler(model, budget=8)
    long, cached = _req("long", 100), _req("cached", 20)
    for r in (long, cached):
        s.add(r)
    s.admit()
    cached.computed = cached.cached = 20  # what the runner's begin() sets after a full cache hit
    chunks = s.plan_prefill()
    hit = [c for c in chunks if c.request is cached]
    assert len(hit) == 1 and (hit[0].start, hit[0].end) == (20, 20) and hit[0].completes and hit[0].tokens == []
    assert sum(c.end - c.start for c in chunks if c.request is long) == 8  # the budget is all the long one's
    assert s.prefilling == [long]


def test_snapshot_points_split_chunks(model):
    """Chunks end at each message boundary and interval, so each snapshot is a copy of the state after one."""
    s = _scheduler(model, budget=100, interval=8)
    r = _req("r", 20, snapshot_at=(5, 12, 20, 0))  # 20 (the end) and 0 are no points inside the prompt
    s.add(r)
    s.admit()
    chunks = s.plan_prefill()
    assert [(c.start, c.end, c.snapshot) for c in chunks] == [
        (0, 5, True),
        (5, 8, True),
        (8, 12, True),
        (12, 16, True),
        (16, 20, False),
    ]
    assert [c.completes for c in chunks] == [False] * 4 + [True] and chunks[1].tokens == r.req.prompt_ids[5:8]


def test_a_budget_cut_chunk_snapshots_only_on_a_point(model):
    s = _scheduler(model, budget=6, interval=8)
    r = _req("r", 20, snapshot_at=(5,))
    s.add(r)
    s.admit()
    assert [(c.start, c.end, c.snapshot) for c in s.plan_prefill()] == [(0, 5, True), (5, 6, False)]
    r.computed = 6
    assert [(c.start, c.end, c.snapshot) for c in s.plan_prefill()] == [(6, 8, True), (8, 12, False)]


def test_a_prompt_sharing_a_long_prefix_with_a_prefilling_one_follows_it(model):
    """The later prompt waits for the earlier one's snapshot at the shared length (one prefill of the shared
    prefix, not two); it is released once the leader has computed that far, or is gone."""
    s = _scheduler(model, budget=16)
    base = _req("base", 60).req.prompt_ids
    shared = MIN_SHARED + 8
    lead, follow = _req("lead", prompt=base), _req("follow", prompt=base[:shared] + [3, 4])
    short = _req("short", prompt=base[: MIN_SHARED - 1] + [3])  # shares too little to wait
    for r in (lead, follow, short):
        s.add(r)
    s.admit()
    assert follow.follow == (lead, shared) and shared in lead.points and short.follow is None
    assert {c.request.request_id for c in s.plan_prefill()} == {"lead", "short"}  # the follower plans nothing
    lead.computed = shared - 1
    assert s.released() == []
    lead.computed = shared
    assert s.released() == [follow] and follow.follow is None


def test_a_follower_is_released_when_its_leader_is_removed(model):
    s = _scheduler(model)
    base = _req("base", 60).req.prompt_ids
    lead, follow = _req("lead", prompt=base), _req("follow", prompt=base[:50])
    s.add(lead)
    s.add(follow)
    s.admit()
    assert follow.follow == (lead, 50) and s.released() == []
    s.remove("lead")
    assert s.released() == [follow]


def test_removal_forgets_a_request_wherever_it_is(model):
    s = _scheduler(model, slots=2)
    a, b = _req("a", 9, n=2), _req("b", 4)
    s.add(a)
    s.add(b)
    s.admit()
    assert s.remove("b") is b and "b" not in s.requests and not s.waiting and s.waiting_tokens == 0
    assert s.remove("a") is a and s.prefilling == [] and s.free_slots() == 2 and not s.has_work()
    assert s.remove("a") is None
