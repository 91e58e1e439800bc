"""The request models' validators and the checks that refuse what the server cannot honour."""

from __future__ import annotations

import pytest

from server.api.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.engine_io import DEFAULT_MAX_TOKENS

MSG = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    "field,param",
    [
        ({"stop": ["a"] * 5}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": "s" * 257}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {str(i): 1.0 for i in range(301)}}, "logit_bias"),  # OpenAI's limit is 300 entries
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": -1}, "max_tokens"),
    ],
)
def test_invalid_fields_are_refused(app_client, field, param):
    """Each refusal is a 400 whose error object names the field the request broke, as the client sees it."""
    r = app_client().post("/v1/chat/completions", json={"model": "m", "messages": MSG, **field})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and error["message"].startswith(param + ":")
    assert error["code"] == "invalid_value"


def test_valid_fields_and_their_engine_view():
    body = ChatCompletionRequest(model="m", messages=MSG, stop="end", logit_bias={"5": -100}, seed=2**64 - 1)
    assert body.stop_list == ["end"] and body.unsupported() is None
    params = body.to_sampling_params(max_tokens=body.max_new_tokens(512), logit_bias={5: -100.0}, logprobs=None)
    assert params.stop == ["end"] and params.max_tokens == 512 and params.seed == 2**64 - 1
    assert ChatCompletionRequest(model="m", messages=MSG, max_tokens=7).max_new_tokens(512) == 7
    both = ChatCompletionRequest(model="m", messages=MSG, max_tokens=7, max_completion_tokens=3)
    assert both.max_new_tokens(512) == 3
    assert CompletionRequest(model="m", prompt="x", max_tokens=None).max_new_tokens == DEFAULT_MAX_TOKENS


@pytest.mark.parametrize(
    "field,param",
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_chat_unsupported(field, param):
    assert ChatCompletionRequest(model="m", messages=MSG, **field).unsupported()[0] == param


@pytest.mark.parametrize(
    "field,param",
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 2}, "best_of"),
        ({"echo": True, "stream": True, "logprobs": 1}, "echo"),
    ],
)
def test_completion_unsupported(field, param):
    assert CompletionRequest(model="m", prompt="x", **field).unsupported()[0] == param


def test_developer_is_system_to_templates_and_parts_are_joined():
    m = ChatMessage(role="developer", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert m.to_template() == {"role": "system", "content": "ab"}
    assert ChatMessage(role="user", content="").to_template() == {"role": "user", "content": ""}
    assert ChatMessage(role="user", content=None).to_template() == {"role": "user"}  # null fields are left out
