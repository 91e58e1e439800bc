"""Prefix reuse through the engine core: a request that resumes from a snapshot gives the same greedy tokens as a
cold run (no cache), on the embedded model, a mamba-130m-size model and a hybrid with attention, in every way a
chat shares prefixes: a shared system prompt, regenerate, edit-the-last-message, a branch in the middle of a
turn (the nearest interval snapshot), eviction under a tiny budget, and two requests arriving together."""

from __future__ import annotations

import pytest
import torch

from aetheris.defaults import DEFAULT_MODEL_DIR
from model import HybridLM, preset
from model.checkpoint import load_model
from server.api.prompts import ChatPrompt, message_boundaries
from server.engine.core import CoreConfig, EngineCore
from server.engine_io import GenerationRequest, SamplingParams
from tests.helpers import tiny_config, toy_tokenizer

INTERVAL = 32


def _model(name: str):
    if name == "default":
        return load_model(DEFAULT_MODEL_DIR)
    tok = toy_tokenizer()
    if name == "mamba-130m":
        torch.manual_seed(0)
        return HybridLM(preset("mamba-130m")).eval(), tok
    return HybridLM(tiny_config(tok.vocab_size, "hybrid")).eval(), tok


@pytest.fixture(scope="module", params=["default", "mamba-130m", "hybrid"])
def setup(request):
    model, tok = _model(request.param)
    return request.param, model, tok


def _core(model, tok, cache_bytes=64 << 20, **kw) -> EngineCore:
    cfg = CoreConfig(
        max_batch_size=4,
        prefill_budget=64,
        state_cache_bytes=cache_bytes,
        max_model_len=1024,
        kv_blocks=256,
        snapshot_interval=INTERVAL,
        **kw,
    )
    return EngineCore(model, tok, cfg)


def run(core: EngineCore, *reqs: GenerationRequest) -> dict[str, tuple[list[int], int]]:
    """Add the requests together, step until done: {id: (tokens of choice 0, cached prompt tokens)}."""
    out: dict[str, list] = {r.request_id: [[], 0] for r in reqs}

    def emit(o):
        for d in o.deltas:
            out[o.request_id][0] += d.token_ids
        if o.usage is not None:
            out[o.request_id][1] = o.usage.cached_tokens

    for r in reqs:
        core.add(r, emit)
    while core.has_work():
        core.step()
    return {k: (v[0], v[1]) for k, v in out.items()}


def chat(tok, rid: str, messages: list[dict], max_tokens: int = 6) -> GenerationRequest:
    prompt = tok.encode_chat(messages)
    points, pinned = message_boundaries(tok, ChatPrompt(messages), prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return GenerationRequest(rid, prompt, params, snapshot_at=points, pinned_prefix=pinned)


def resume_point(earlier: GenerationRequest, later: GenerationRequest) -> int:
    """Where `later` should resume after `earlier` ran: the deepest snapshot `earlier` left (a message boundary,
    an interval multiple or its whole prompt) within the prefix the two share."""
    shared = next((i for i, (x, y) in enumerate(zip(earlier.prompt_ids, later.prompt_ids)) if x != y), None)
    shared = min(len(earlier.prompt_ids), len(later.prompt_ids)) if shared is None else shared
    points = {*earlier.snapshot_at, len(earlier.prompt_ids), *range(INTERVAL, len(earlier.prompt_ids), INTERVAL)}
    return max((p for p in points if p <= shared), default=0)


def cold(model, tok, req: GenerationRequest) -> list[int]:
    return run(_core(model, tok, cache_bytes=0), req)[req.request_id][0]


SYSTEM = {"role": "system", "content": "You are a storyteller. " * 12}
HISTORY = [
    SYSTEM,
    {"role": "user", "content": "Tell me about a cat named Tom."},
    {"role": "assistant", "content": "Tom was a little cat who liked to play with a red ball."},
]


def test_shared_system_prompt_regenerate_and_edit(setup):
    _, model, tok = setup
    core = _core(model, tok)
    a = chat(tok, "a", [SYSTEM, {"role": "user", "content": "A story about a dog."}])
    b = chat(tok, "b", [SYSTEM, {"role": "user", "content": "A story about the sun."}])
    system_end = a.snapshot_at[0]
    assert a.pinned_prefix == system_end and b.prompt_ids[:system_end] == a.prompt_ids[:system_end]
    got = run(core, a)
    assert got["a"] == (cold(model, tok, a), 0)
    got = run(core, b)  # a second user: the system prompt's snapshot (or a deeper one), whoever made it
    assert got["b"] == (cold(model, tok, b), resume_point(a, b)) and resume_point(a, b) >= system_end
    again = chat(tok, "b2", b_messages := [SYSTEM, {"role": "user", "content": "A story about the sun."}])
    assert run(core, again)["b2"] == (got["b"][0], len(again.prompt_ids))  # regenerate: the whole prompt
    first = chat(tok, "t1", [*HISTORY, {"role": "user", "content": "What did Tom do next?"}])
    run(core, first)
    edited = chat(tok, "t2", [*HISTORY, {"role": "user", "content": "Where did Tom live?"}])
    turn_end = edited.snapshot_at[-1]  # the end of the assistant's reply: where the edit branches
    assert run(core, edited)["t2"] == (cold(model, tok, edited), resume_point(first, edited))
    assert resume_point(first, edited) >= turn_end
    assert b_messages and core.cache.hits >= 3


def test_branch_in_the_middle_of_a_turn_resumes_at_the_nearest_interval(setup):
    _, model, tok = setup
    core = _core(model, tok)
    text = "Once upon a time there was a little cat named Tom. " * 6
    a = chat(tok, "a", [{"role": "user", "content": text + "He liked fish."}])
    b = chat(tok, "b", [{"role": "user", "content": text + "She liked milk."}])
    shared = next(i for i, (x, y) in enumerate(zip(a.prompt_ids, b.prompt_ids)) if x != y)
    assert shared > INTERVAL and not [p for p in a.snapshot_at if p > INTERVAL]  # one message: no boundary helps
    run(core, a)
    got = run(core, b)["b"]
    assert got == (cold(model, tok, b), shared // INTERVAL * INTERVAL) == (got[0], resume_point(a, b))


def test_eviction_under_a_tiny_budget_keeps_results_exact(setup):
    name, model, tok = setup
    probe = _core(model, tok)
    run(probe, chat(tok, "p", [{"role": "user", "content": "x"}], 1))
    one = max(n.snap.nbytes for n in probe.cache.lru)
    core = _core(model, tok, cache_bytes=3 * one)
    reqs = [chat(tok, f"r{i}", [SYSTEM, {"role": "user", "content": f"Story {i} about a frog."}]) for i in range(4)]
    for r in reqs:
        assert run(core, r)[r.request_id][0] == cold(model, tok, r)
    assert core.cache.evictions > 0 and core.cache.bytes <= 3 * one


def test_requests_sharing_a_prefix_arriving_together_prefill_it_once(setup):
    _, model, tok = setup
    core = _core(model, tok)
    a = chat(tok, "a", [SYSTEM, {"role": "user", "content": "A story about a dog."}])
    b = chat(tok, "b", [SYSTEM, {"role": "user", "content": "A story about a dog and a ball."}])
    shared = next(i for i, (x, y) in enumerate(zip(a.prompt_ids, b.prompt_ids)) if x != y)
    prefilled = []
    real = core.runner.prefill
    core.runner.prefill = lambda r, chunk: (prefilled.append((r.request_id, len(chunk))), real(r, chunk))[1]
    got = run(core, a, b)
    assert got["a"][0] == cold(model, tok, a) and got["b"][0] == cold(model, tok, b)
    assert got["b"][1] == shared  # b resumed from the snapshot a made where they part
    total = {rid: sum(n for r, n in prefilled if r == rid) for rid in ("a", "b")}
    assert total == {"a": len(a.prompt_ids), "b": len(b.prompt_ids) - shared}
