"""Constrained decoding in the engine: the vectorised mask equals the per-token loop, grammars compile once
per spec and refuse unsupported features by name, and sampled output through the engine core always matches
its grammar (random tiny model, temperature 1, several seeds, n > 1)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from model import HybridLM
from server.engine.core import CoreConfig, EngineCore
from server.engine.grammar import (
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    allowed_tokens,
    allowed_tokens_reference,
    apply_masks,
    apply_masks_reference,
    constrain,
)
from server.engine_io import GenerationRequest, SamplingParams
from tests.helpers import tiny_config, toy_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(toy_tokenizer())


def test_unpacked_bitmask_equals_per_token_loop():
    g = torch.Generator().manual_seed(0)
    for vocab in (1, 31, 32, 33, 300):
        words = (vocab + 31) // 32
        bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=g, dtype=torch.int64).to(torch.int32)
        assert torch.equal(allowed_tokens(bitmask, vocab), allowed_tokens_reference(bitmask, vocab))


def test_vectorised_masks_equal_row_loop_and_leave_other_rows():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 70, generator=g)
    before = logits.clone()
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 3), generator=g, dtype=torch.int64).to(torch.int32)
    got = apply_masks(logits, [1, 3], bitmask)
    assert torch.equal(got, apply_masks_reference(logits, [1, 3], bitmask))
    assert torch.equal(logits, before)  # the runner's logits feed logprobs and the prefix cache
    assert torch.equal(got[[0, 2, 4]], logits[[0, 2, 4]])
    assert torch.isinf(got[1]).any() and torch.isinf(got[3]).any()


def test_rows_without_grammar_pay_nothing():
    logits = torch.randn(3, 40)
    assert constrain(logits, [None, None, None]) is logits


def test_compile_cache_and_errors(compiler):
    spec = GrammarSpec("json_schema", json.dumps(SCHEMA))
    before = compiler.compiled
    a, b = compiler.compile(spec), compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    assert a is b and compiler.compiled == before + 1
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.compile(GrammarSpec("json_schema", json.dumps({"type": "array", "uniqueItems": True})))
    with pytest.raises(GrammarError, match="not valid JSON"):
        compiler.compile(GrammarSpec("json_schema", "{nope"))
    with pytest.raises(GrammarError):
        compiler.compile(GrammarSpec("regex", "(unclosed"))


def test_matcher_mask_follows_the_grammar(compiler):
    tok = toy_tokenizer()
    m = compiler.compile(GrammarSpec("choice", json.dumps(["yes", "no"]))).matcher()
    logits = torch.zeros(1, tok.vocab_size)
    allowed = ~torch.isinf(constrain(logits, [m]))[0]
    firsts = {tok.decode([t]) for t in allowed.nonzero().flatten().tolist()}
    assert firsts and all("yes".startswith(f) or "no".startswith(f) for f in firsts)
    for t in tok.encode("no", add_special_tokens=False):
        assert m.consume(t)
    assert m.done


def _generate(core: EngineCore, params: SamplingParams, prompts: list[list[int]]) -> list[list[tuple[str, str]]]:
    """Run requests to the end; (text, finish_reason) of each choice of each request."""
    texts: dict[tuple[int, int], str] = {}
    finish: dict[tuple[int, int], str] = {}

    def emit_for(p):
        def emit(out):
            assert out.error is None, out.error
            for d in out.deltas:
                texts[(p, d.index)] = texts.get((p, d.index), "") + d.text
                if d.finish_reason:
                    finish[(p, d.index)] = d.finish_reason

        return emit

    for p, ids in enumerate(prompts):
        core.add(GenerationRequest(f"r{p}", ids, params), emit_for(p))
    while core.has_work():
        core.step()
    return [[(texts.get((p, i), ""), finish[(p, i)]) for i in range(params.n)] for p in range(len(prompts))]


@pytest.fixture(scope="module")
def core():
    tok = toy_tokenizer()
    torch.manual_seed(0)
    model = HybridLM(tiny_config(tok.vocab_size)).eval()
    return EngineCore(model, tok, CoreConfig(max_batch_size=12, prefill_budget=64, state_cache_bytes=0))


def test_sampled_json_always_fits_the_schema(core, compiler):
    grammar = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    prompts = [core.tokenizer.encode("Once upon a time"), core.tokenizer.encode("The cat")]
    finished = 0
    for seed in range(4):
        params = SamplingParams(max_tokens=120, temperature=1.0, seed=seed, n=3, grammar=grammar)
        for choices in _generate(core, params, prompts):
            for text, reason in choices:
                if reason == "stop":
                    jsonschema.validate(json.loads(text), SCHEMA)
                    finished += 1
                else:  # ran out of tokens: a prefix of valid JSON, never anything else
                    assert reason == "length" and text.startswith("{")
    assert finished >= 20  # of 24 choices; the schema bounds every string and array


def test_mixed_batch_unconstrained_rows_unchanged(core, compiler):
    """A constrained request in the batch does not change what an unconstrained one samples."""
    prompt = [core.tokenizer.encode("Lily went")]
    plain = SamplingParams(max_tokens=10, temperature=1.0, seed=5, ignore_eos=True)
    alone = _generate(core, plain, prompt)
    regex = compiler.compile(GrammarSpec("regex", r"[a-z]{3,6}@[a-z]{2,5}\.com"))
    out: dict[str, list] = {}
    core.add(
        GenerationRequest("c", prompt[0], SamplingParams(max_tokens=40, temperature=1.0, grammar=regex)),
        lambda o: out.setdefault("c", []).append(o),
    )
    together = _generate(core, plain, prompt)
    assert together == alone
    text = "".join(d.text for o in out["c"] for d in o.deltas)
    assert re.fullmatch(r"[a-z]{3,6}@[a-z]{2,5}\.com", text), text
