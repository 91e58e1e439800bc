"""Structured outputs and tool calling through a real server on the embedded model with the official SDK:
sampled at temperature 1 over several seeds and n > 1, every finished output parses and fits its schema."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from aetheris.serverproc import ServerProcess

MODEL = "aetheris-hybrid"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "mood": {"enum": ["happy", "sad"]},
        "friends": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
    },
    "required": ["name", "age", "mood"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": -999, "maximum": 999},
        "b": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "a + b", "parameters": ADD}},
]
ASK = [{"role": "user", "content": "Tell me about Lily."}]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(None, "--max-batch-size", "16")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _json_schema(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_always_validates(client, seed):
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=_json_schema(SCHEMA), n=3, seed=seed, temperature=1.0,
        max_tokens=120,
    )  # fmt: skip
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    again = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=_json_schema(SCHEMA), n=3, seed=seed, max_tokens=120
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seed holds


def test_json_schema_streamed(client):
    for seed in (3, 4):
        stream = client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=_json_schema(SCHEMA), n=2, seed=seed, max_tokens=120,
            stream=True,
        )  # fmt: skip
        texts, finish = ["", ""], [None, None]
        for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.delta.content or ""
                finish[c.index] = c.finish_reason or finish[c.index]
        assert finish == ["stop", "stop"]
        for t in texts:
            jsonschema.validate(json.loads(t), SCHEMA)


def test_max_tokens_cuts_json_with_length(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=_json_schema(SCHEMA), max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")


def test_json_object_parses(client):
    finished = 0
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, response_format={"type": "json_object"}, n=2, seed=seed, max_tokens=200
        )
        for c in r.choices:
            assert c.message.content.startswith("{")
            if c.finish_reason == "stop":  # else it ran out of tokens inside a string, as OpenAI's does
                assert isinstance(json.loads(c.message.content), dict)
                finished += 1
    assert finished >= 2


def _check_calls(choice, names, finished=True):
    assert choice.message.tool_calls, choice.message
    assert choice.finish_reason == "tool_calls" if finished else choice.finish_reason in ("tool_calls", "length")
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        schema = {"get_weather": WEATHER, "add": ADD}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema)


@pytest.mark.parametrize("seed", [0, 1])
def test_named_and_required_tool_choice_give_valid_calls(client, seed):
    named = {"type": "function", "function": {"name": "add"}}
    for choice, names, parallel in ((named, {"add"}, False), ("required", {"add", "get_weather"}, False)):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, n=3, seed=seed, max_tokens=120,
            parallel_tool_calls=parallel,
        )  # fmt: skip
        for c in r.choices:
            _check_calls(c, names)
            assert len(c.message.tool_calls) == 1


def test_parallel_tool_calls(client):
    """With parallel calls (the default) the grammar allows call after call: this seed's choices make several,
    each valid with its own id, and a choice cut by max_tokens still returns every call it closed."""
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", n=4, seed=0, max_tokens=250
    )
    for c in r.choices:
        _check_calls(c, {"add", "get_weather"}, finished=False)
        assert len({call.id for call in c.message.tool_calls}) == len(c.message.tool_calls)
    assert any(len(c.message.tool_calls) >= 2 and c.finish_reason == "tool_calls" for c in r.choices)


def test_streamed_tool_calls_accumulate_in_the_sdk_helper(client):
    with client.chat.completions.stream(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=5, max_tokens=120,
        parallel_tool_calls=False,
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    _check_calls(final.choices[0], {"add", "get_weather"})
    assert len(final.choices[0].message.tool_calls) == 1


def test_conversation_with_a_tool_result_renders_and_continues(client, server):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3, "sky": "snow"}'},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=20, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    shorter = client.chat.completions.create(model=MODEL, messages=history[:1], tools=TOOLS, max_tokens=1)
    # The call and its result are in the prompt: more tokens than the question alone.
    assert r.usage.prompt_tokens > shorter.usage.prompt_tokens + 20
    # The SDK's own message object goes back as history, as client code does after a call.
    first = client.chat.completions.create(
        model=MODEL, messages=history[:1], tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=2,
        max_tokens=80,
    )  # fmt: skip
    call = first.choices[0].message.tool_calls[0]
    turn = [*history[:1], first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "{}"}]
    again = client.chat.completions.create(model=MODEL, messages=turn, tools=TOOLS, max_tokens=5)
    assert again.usage.prompt_tokens > shorter.usage.prompt_tokens + 20


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    name: str = Field(max_length=10)
    legs: int = Field(ge=0, le=4)


def test_sdk_parse_with_a_pydantic_model(client):
    for seed in range(3):
        r = client.chat.completions.parse(
            model=MODEL, messages=ASK, response_format=Pet, seed=seed, max_tokens=80, temperature=1.0
        )
        pet = r.choices[0].message.parsed
        assert isinstance(pet, Pet) and 0 <= pet.legs <= 4


def test_completions_guided_extensions(client):
    r = client.completions.create(
        model=MODEL, prompt="Is the cat happy?", max_tokens=10, n=4, seed=0, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert {c.text for c in r.choices} <= {"yes", "no"} and all(c.finish_reason == "stop" for c in r.choices)
    r = client.completions.create(
        model=MODEL, prompt="A date:", max_tokens=20, seed=0, extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]"}
    )
    assert len(r.choices[0].text) == 7 and r.choices[0].text.startswith("20")
    r = client.completions.create(
        model=MODEL, prompt="Lily", max_tokens=120, seed=1, extra_body={"structured_outputs": {"json": SCHEMA}}
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def test_bad_requests_are_400_and_the_server_keeps_serving(client):
    bad = [
        dict(response_format=_json_schema({"type": "array", "uniqueItems": True})),
        dict(response_format=_json_schema({"type": "object", "properties": {"a": {"type": "strng"}}})),
        dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        dict(tool_choice="required"),
        dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a+"}),
    ]
    for kw in bad:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, **kw)
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="uniqueItems"):
        client.chat.completions.create(model=MODEL, messages=ASK, **bad[0])
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, response_format=_json_schema(SCHEMA))
    assert r.choices[0].message.content.startswith("{")
