"""Fair prefill and a responsive event loop, counted in scheduler iterations and decode calls, never in
seconds: a short prompt behind a long one starts within an iteration, a fully cached prompt at once, a
deadline ends a request as max_tokens would, and logprobs decode each token once.
(bench/fairness.py measures the time to first token behind a 50,000-token prefill.)"""

from __future__ import annotations

import time
from types import SimpleNamespace

from model import HybridLM
from server.api.chat import _chat_logprobs
from server.api.serving import Serving
from server.engine.core import CoreConfig, EngineCore
from server.engine_io import GenerationRequest, SamplingParams, TokenLogprob
from server.settings import Settings
from tests.helpers import tiny_config, toy_tokenizer


def _core(budget: int = 64, slots: int = 4) -> EngineCore:
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size)).eval()
    return EngineCore(
        model,
        tok,
        CoreConfig(
            max_batch_size=slots, prefill_budget=budget, state_cache_bytes=8 << 20, kv_block_size=8, snapshot_interval=0
        ),
    )


def _add(core: EngineCore, rid: str, prompt: list[int], **params) -> list:
    outs: list = []
    params = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, **params}
    core.add(GenerationRequest(rid, prompt, SamplingParams(**params)), outs.append)
    return outs


def _steps_to_first_token(core: EngineCore, outs: list, limit: int = 500) -> int:
    for step in range(1, limit + 1):
        core.step()
        if any(d.token_ids for o in outs for d in o.deltas):
            return step
    raise AssertionError("no first token")


def test_a_short_prompt_behind_a_long_prefill_starts_at_once():
    """A 4,000-token prompt prefills at 64 tokens per iteration; a 10-token prompt arriving while it does gets
    its share of the budget at the next iteration, not after the 60 iterations the long one still needs."""
    core = _core(budget=64)
    long_outs = _add(core, "long", [7 + i % 200 for i in range(4000)])
    for _ in range(3):
        core.step()
    short = _add(core, "short", list(range(20, 30)))
    assert _steps_to_first_token(core, short) == 1
    assert not any(d.token_ids for o in long_outs for d in o.deltas)  # the long one is still prefilling
    while core.has_work():
        core.step()
    assert core.pool.used == 0


def test_a_fully_cached_prompt_starts_decoding_while_a_long_prefill_takes_the_budget():
    core = _core(budget=64)
    cached = list(range(40, 90))
    done = _add(core, "first", cached)
    while core.has_work():
        core.step()
    assert done[-1].finished
    _add(core, "long", [7 + i % 200 for i in range(4000)])
    core.step()
    again = _add(core, "again", cached)
    assert _steps_to_first_token(core, again) == 1
    assert again[-1].usage is None or again[-1].usage.cached_tokens == len(cached)


def test_a_deadline_ends_the_request_with_length_and_usage():
    core = _core()
    outs = []
    req = GenerationRequest("r", [5, 6, 7], SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True))
    core.add(req, outs.append)
    for _ in range(5):
        core.step()
    req.deadline = time.monotonic()  # now past
    core.step()
    last = outs[-1]
    assert last.finished and last.deltas[-1].finish_reason == "length"
    assert last.usage.completion_tokens == sum(len(d.token_ids) for o in outs for d in o.deltas) >= 5
    assert core.pool.used == 0 and not core.has_work()


def test_logprobs_decode_each_token_once(monkeypatch):
    """Two choices whose tokens share their 5 alternatives: one decode per distinct token id in all."""
    tok = toy_tokenizer()
    engine = SimpleNamespace(core=SimpleNamespace(vocab=tok.vocab_size, cfg=SimpleNamespace(max_model_len=0)))
    serving = Serving(Settings(), engine, tok)
    calls = []
    real = tok.decode
    # toy_tokenizer() is shared by every test: patched for this test only
    monkeypatch.setattr(tok, "decode", lambda ids, *a, **kw: (calls.append(tuple(ids)), real(ids, *a, **kw))[1])
    top = [(i, -float(i)) for i in range(10, 15)]
    lps = [TokenLogprob(t, -1.0, top) for t in range(10, 15)] * 4
    for _ in range(2):  # two choices
        _chat_logprobs(serving, lps)
    distinct = {t for lp in lps for t in [lp.token_id, *(i for i, _ in lp.top)]}
    assert 0 < len(calls) <= len(distinct)
