"""Batch invariance, fp32: a greedy request alone and the same request amid a busy batch (sampling requests
with n > 1 and stop strings, one aborted, and a long prompt being prefilled in chunks beside it) give the
same tokens, on the embedded model and on a randomly initialised mamba-130m-size model."""

from __future__ import annotations

import pytest
import torch

from aetheris.defaults import DEFAULT_MODEL_DIR
from model import HybridLM, preset
from model.checkpoint import load_model
from server.engine.core import CoreConfig, EngineCore
from server.engine_io import GenerationRequest, SamplingParams
from tests.helpers import toy_tokenizer

MAX_TOKENS = 12


def _model(name: str):
    if name == "default":
        model, tok = load_model(DEFAULT_MODEL_DIR, dtype=torch.float32)
        return model, tok
    torch.manual_seed(0)
    return HybridLM(preset("mamba-130m")).eval(), toy_tokenizer()


def _greedy(prompt: list[int]) -> GenerationRequest:
    return GenerationRequest("calm", prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))


def _tokens(core: EngineCore, target: GenerationRequest, others: list[GenerationRequest], abort: str = "") -> list:
    got: list[int] = []
    for r in others:
        core.add(r, lambda out: None)
    core.step()  # the others are admitted and prefilling / decoding before the target arrives
    core.add(target, lambda out: got.extend(t for d in out.deltas for t in d.token_ids))
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        if steps == 3 and abort:
            core.abort(abort)
    return got


@pytest.mark.parametrize("name", ["default", "mamba-130m"])
def test_greedy_alone_equals_greedy_amid_a_busy_batch(name):
    model, tok = _model(name)
    assert next(model.parameters()).dtype == torch.float32
    prompt = tok.encode("Once upon a time, a small robot")
    # No prefix cache: the target is computed, not restored, in both runs.
    core = lambda: EngineCore(
        model, tok, CoreConfig(max_batch_size=12, prefill_budget=128, state_cache_bytes=0, snapshot_interval=0)
    )  # noqa: E731
    alone = _tokens(core(), _greedy(prompt), [])
    busy = [
        GenerationRequest("long", [5 + i % 300 for i in range(800)], SamplingParams(max_tokens=2)),
        GenerationRequest("n3", tok.encode("The cat"), SamplingParams(max_tokens=20, n=3, seed=1, stop=["e"])),
        GenerationRequest("hot", tok.encode("Hello"), SamplingParams(max_tokens=30, temperature=1.5, seed=2)),
        GenerationRequest("gone", tok.encode("Bye"), SamplingParams(max_tokens=30, seed=3, ignore_eos=True)),
    ]
    amid = _tokens(core(), _greedy(prompt), busy, abort="gone")
    assert len(alone) == MAX_TOKENS and amid == alone
