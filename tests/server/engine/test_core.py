"""The engine core without HTTP: continuous batching over pool rows equals each request decoded alone,
rows stay dense and are all returned, the prefix cache only ever skips work."""

from __future__ import annotations

import random

import pytest
import torch

from model import HybridLM
from model.gemv import use_gemv
from server.engine.core import CoreConfig, EngineCore
from server.engine_io import GenerationRequest, SamplingParams
from tests.helpers import tiny_config, toy_tokenizer

# (model layout, context limit, paged K/V blocks): Mamba + MoE; Mamba + attention + MoE with a contiguous K/V
# cache per slot (the reference layout); the same with paged K/V.
ENGINES = {"mamba": (None, 0, 0), "hybrid-contiguous": ("hybrid", 64, 0), "hybrid-paged": ("hybrid", 64, 40)}


def _setup(slots=4, budget=7, cache=1 << 20, engine="mamba"):
    layout, max_len, kv_blocks = ENGINES[engine]
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size, layout)).eval()
    cfg = CoreConfig(
        max_batch_size=slots,
        prefill_budget=budget,
        state_cache_bytes=cache,
        max_model_len=max_len,
        kv_blocks=kv_blocks,
        kv_block_size=8,
    )
    return model, tok, EngineCore(model, tok, cfg)


def _alone(model, tok, prompt, n, stop=True):
    logits, state = model.prefill(torch.tensor([prompt]), model.empty_state(1))
    out = []
    for _ in range(n):
        t = int(logits[0, : tok.vocab_size].argmax())
        out.append(t)
        if stop and t in tok.stop_token_ids:
            break
        logits, state = model.decode(torch.tensor([t]), state)
    return out


def _run(core, requests, abort_after: dict | None = None):
    tokens: dict[str, dict[int, list[int]]] = {}
    finished = set()
    for req in requests:
        tokens[req.request_id] = {}
        core.add(
            req,
            lambda out: (
                [tokens[out.request_id].setdefault(d.index, []).extend(d.token_ids) for d in out.deltas],
                out.finished and finished.add(out.request_id),
            ),
        )
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        for rid, at in (abort_after or {}).items():
            if steps == at:
                core.abort(rid)
        rows = core.pool.rows
        assert all(seq.slot == i for i, seq in enumerate(rows))  # rows stay dense and in order
    return tokens, finished


@pytest.mark.parametrize("engine", ENGINES)
def test_continuous_batching_equals_alone(engine):
    model, tok, core = _setup(slots=4, budget=7, engine=engine)
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randrange(1, 30))] for _ in range(10)]
    lengths = [rng.randrange(1, 20) for _ in prompts]
    reqs = [
        GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0))
        for i, (p, n) in enumerate(zip(prompts, lengths))
    ]
    tokens, finished = _run(core, reqs)
    assert finished == {r.request_id for r in reqs}
    for r, p, n in zip(reqs, prompts, lengths):
        want = [t for t in _alone(model, tok, p, n) if t not in tok.stop_token_ids]
        assert tokens[r.request_id][0] == want
    assert core.pool.used == 0 and not core.requests


@pytest.mark.parametrize("engine", ENGINES)
def test_n_choices_aborts_and_cache_hits(engine):
    model, tok, core = _setup(slots=5, budget=4, engine=engine)
    prompt = list(range(20, 45))
    reqs = [
        GenerationRequest("a", prompt, SamplingParams(max_tokens=12, temperature=0, n=3)),
        GenerationRequest("b", prompt[:10], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)),
        GenerationRequest("c", prompt[:5], SamplingParams(max_tokens=8, temperature=0)),
    ]
    tokens, finished = _run(core, reqs, abort_after={"b": 9})
    assert finished == {"a", "c"} and core.pool.used == 0
    want = [t for t in _alone(model, tok, prompt, 12) if t not in tok.stop_token_ids]
    assert tokens["a"][0] == tokens["a"][1] == tokens["a"][2] == want  # greedy forks agree
    # The same prompt again restores the snapshot: nothing left to prefill, same tokens.
    again, _ = _run(core, [GenerationRequest("a2", prompt, SamplingParams(max_tokens=12, temperature=0))])
    assert again["a2"][0] == want and core.cache.hits >= 1


def test_admission_waits_for_kv_blocks_and_running_sequences_never_lack_them():
    """40 blocks of 8 tokens; each choice reserves ceil((20 + 40) / 8) = 8 blocks. The fourth request waits
    while the first three (8 + 8 + 24 blocks, one has n = 3) run; every output equals its request alone."""
    model, tok, core = _setup(slots=6, budget=64, engine="hybrid-paged")
    prompts = [list(range(10 + i, 30 + i)) for i in range(4)]
    reqs = [
        GenerationRequest(
            f"r{i}", p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, n=3 if i == 2 else 1)
        )
        for i, p in enumerate(prompts)
    ]
    got: dict[str, dict[int, list[int]]] = {r.request_id: {} for r in reqs}
    for r in reqs:
        core.add(r, lambda out: [got[out.request_id].setdefault(d.index, []).extend(d.token_ids) for d in out.deltas])
    core.step()
    assert [r.request_id for r in core.scheduler.waiting] == ["r3"] and core.pool.free_blocks == 0
    while core.has_work():
        core.step()
        assert core.pool.free_blocks >= 0
    assert core.pool.free_blocks == 40 and core.pool.used == 0
    for r, p in zip(reqs, prompts):
        want = _alone(model, tok, p, 40, stop=False)
        assert all(got[r.request_id][i] == want for i in range(r.params.n))


def test_attention_model_without_a_context_limit_is_refused():
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size, "hybrid")).eval()
    with pytest.raises(ValueError, match="needs a context limit"):
        EngineCore(model, tok, CoreConfig(max_batch_size=2, prefill_budget=16, state_cache_bytes=0))


@pytest.mark.parametrize("kv_blocks", [0, 64], ids=["contiguous", "paged"])
@pytest.mark.parametrize("layout", ["hybrid", "mamba2-hybrid", "nemotron-h"])
def test_the_compiled_model_serves_what_the_eager_one_does(layout, kv_blocks):
    """The server's CPU fast path: few-row kernels, MoE through moe_decode, and every layer (attention included)
    in a compiled run. Through the engine, where the batch and the attention extent change from
    step to step, its greedy tokens equal the eager model's, no run falls back to eager (dynamo's recompile
    limit, which would raise here), and nothing compiles while serving: the runner's warm-up built every
    graph."""
    tok = toy_tokenizer()
    eager = HybridLM(tiny_config(tok.vocab_size, layout)).eval()
    fast = HybridLM(tiny_config(tok.vocab_size, layout)).eval()
    fast.load_state_dict(eager.state_dict())
    assert use_gemv(fast)
    fast.compile_inference()
    assert all(step is not None for *_, step in fast._runs)
    rng = random.Random(1)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randrange(1, 20))] for _ in range(7)]
    cfg = CoreConfig(max_batch_size=4, prefill_budget=32, max_model_len=64, kv_blocks=kv_blocks, kv_block_size=4)
    compiles = torch._dynamo.utils.counters["stats"]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        want = _greedy(EngineCore(eager, tok, cfg), prompts)
        core = EngineCore(fast, tok, cfg)
        before = compiles["unique_graphs"]
        got = _greedy(core, prompts)
    assert got == want and compiles["unique_graphs"] == before


def test_a_full_batch_filling_the_context_compiles_nothing_while_serving():
    """Eight sequences decoding to the last position of the context, with K/V blocks for exactly that: the block
    table's view reaches its full width (its row stride then equals its width, a case dynamo guards apart),
    which the runner's warm-up compiles before serving."""
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size, "nemotron-h")).eval()
    assert use_gemv(model)
    model.compile_inference()
    cfg = CoreConfig(max_batch_size=8, prefill_budget=128, max_model_len=64, kv_blocks=32, kv_block_size=16)
    compiles = torch._dynamo.utils.counters["stats"]
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        core = EngineCore(model, tok, cfg)
        before = compiles["unique_graphs"]
        got = _greedy(core, [[5 + i] * 16 for i in range(8)], max_tokens=48)
    assert all(len(t) == 48 for t in got.values()) and compiles["unique_graphs"] == before


def _greedy(core: EngineCore, prompts: list[list[int]], max_tokens: int | None = None) -> dict[str, list[int]]:
    """Greedy tokens per request; each asks `max_tokens`, or 8 + 3i for the i-th."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens or 8 + 3 * i, temperature=0, ignore_eos=True)
        core.add(GenerationRequest(f"r{i}", p, params), lambda o: out.setdefault(o.request_id, []).extend(
            t for d in o.deltas for t in d.token_ids))  # fmt: skip
    while core.has_work():
        core.step()
    return out
