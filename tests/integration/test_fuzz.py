"""Schemathesis against the served OpenAPI schema: every endpoint, generated bodies valid and invalid.
No answer is a 5xx, every error has the OpenAI shape, and afterwards a normal request is answered right.

Generation is capped (--max-tokens-limit, --request-timeout) so a fuzzed max_tokens or n costs milliseconds,
and the examples per operation are few, so CI runs it in seconds; `AETHERIS_FUZZ_EXAMPLES` raises them."""

from __future__ import annotations

import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from aetheris.serverproc import ServerProcess
from model.checkpoint import load_model
from tests.helpers import greedy, make_tiny_checkpoint

MODEL = "tiny"
EXAMPLES = int(os.environ.get("AETHERIS_FUZZ_EXAMPLES", "25"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / MODEL)


@pytest.fixture(scope="module")
def fuzzed_server(ckpt):
    s = ServerProcess(
        ckpt,
        *("--max-tokens-limit", "32", "--request-timeout", "2", "--max-batch-size", "16", "--max-queue", "64"),
        *("--served-model-name", MODEL),
    )
    yield s
    s.stop()


def operations(url: str) -> list:
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [op.ok() for op in schema.get_all_operations()]


def openai_error_shape(ctx, response, case) -> None:
    """An error body is {"error": {"message", "type", "param", "code"}}, code a string or null."""
    if response.status_code < 400:
        return
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["code"] is None or isinstance(err["code"], str), err


def test_no_5xx_and_openai_errors(fuzzed_server):
    """Each operation of the served schema with generated cases (schemathesis's strategies driven by
    hypothesis directly: its pytest plugin does not support this pytest)."""
    ops = operations(fuzzed_server.url)
    assert {"/v1/chat/completions", "/v1/completions", "/tokenize", "/health"} <= {op.path for op in ops}
    # Invalid cases where there is something to get wrong: a body or a path parameter.
    plan = [(op, GenerationMode.POSITIVE) for op in ops]
    plan += [(op, GenerationMode.NEGATIVE) for op in ops if len(op.body) or "{" in op.path]
    statuses = []
    for op, mode in plan:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=fuzzed_server.url, timeout=30)
            statuses.append(response.status_code)
            case.validate_response(response, checks=(not_a_server_error, openai_error_shape))

        try:
            check()
        except Unsatisfiable:  # every value of this operation's parameters is valid: no invalid case exists
            assert mode is GenerationMode.NEGATIVE, op.path
    assert 200 in statuses and 400 in statuses  # both valid and invalid requests were made


def test_a_normal_request_is_answered_right_after_the_fuzzing(fuzzed_server, ckpt):
    model, tok = load_model(ckpt)
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    r = httpx.post(fuzzed_server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == greedy(model, tok, tok.encode("Once upon a time"), 6)
    assert httpx.get(fuzzed_server.url + "/health").status_code == 200
