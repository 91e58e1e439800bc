"""Real chat templates through a real server: random checkpoints of each family with its published template
and its special tokens (tests/helpers.py CHAT_FAMILIES). The prompt a client sees through /tokenize is
transformers' own; a forced tool call (required and named) returns a call valid against its schema, also where
the call tags are special tokens of the vocabulary, whole or streamed; one that max_tokens cuts says "length"."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from aetheris.serverproc import ServerProcess
from tests.helpers import CHAT_FAMILIES, save_chat_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")

CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}
CITY |= {"additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a"]}
ADD |= {"additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": CITY}},
    {"type": "function", "function": {"name": "add", "description": "Add a number", "parameters": ADD}},
]
SCHEMAS = {"get_weather": CITY, "add": ADD}
ASK = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture(scope="module", params=list(CHAT_FAMILIES))
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_chat_checkpoint(request.param, directory)
    server = ServerProcess(directory, "--served-model-name", request.param, "--max-model-len", "2048")
    yield request.param, directory, server
    server.stop()


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _check(choice) -> None:
    assert choice.finish_reason == "tool_calls", choice
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert "<tool_call>" not in (choice.message.content or "")


@pytest.mark.parametrize("seed", [0, 1])
def test_forced_calls_are_valid(family, seed):
    name, _, server = family
    named = {"type": "function", "function": {"name": "add"}}
    for choice in ("required", named):
        r = _client(server).chat.completions.create(
            model=name, messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, n=2, seed=seed,
            max_tokens=160, temperature=1.0,
        )  # fmt: skip
        for c in r.choices:
            _check(c)
            assert choice == "required" or c.message.tool_calls[0].function.name == "add"


def test_a_streamed_forced_call_accumulates(family):
    name, _, server = family
    with _client(server).chat.completions.stream(
        model=name, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=3,
        max_tokens=160,
    ) as stream:  # fmt: skip
        _check(stream.get_final_completion().choices[0])


def test_a_forced_call_cut_by_max_tokens_says_length(family):
    name, _, server = family
    r = _client(server).chat.completions.create(
        model=name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=3, seed=1
    )
    message = r.choices[0].message  # a forced reply holds calls only: the cut call is not shown as text either
    assert r.choices[0].finish_reason == "length" and not message.tool_calls and message.content is None


def test_tokenize_shows_the_prompt_transformers_renders(family):
    name, directory, server = family
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 4}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}]  # fmt: skip
    body = {"messages": messages, "tools": TOOLS, "add_generation_prompt": True}
    got = httpx.post(server.url + "/tokenize", json=body, timeout=30).json()["tokens"]
    if CHAT_FAMILIES[name][0] is None:  # Bamba publishes no template: ours, with the Hermes tool prompt written in
        text = httpx.post(server.url + "/detokenize", json={"tokens": got}, timeout=30).json()["prompt"]
        assert text.startswith("<|system|>\nUse the tools.\n\n# Tools\n") and '"name": "add"' in text
        assert text.endswith("<tool_response>\n4\n</tool_response><|end|>\n<|assistant|>\n")
        return
    call = {**messages[2]["tool_calls"][0], "function": {"name": "add", "arguments": {"a": 4}}}  # as HF expects
    hf_messages = [*messages[:2], {**messages[2], "tool_calls": [call]}, messages[3]]
    want = transformers.AutoTokenizer.from_pretrained(directory).apply_chat_template(
        hf_messages, tools=TOOLS, add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert got == want
