"""Tool calling without a model: calls parsed out of canned text in the template's format (whole and in
every split a stream can make), the messages a template gets, and the call grammar accepting exactly calls."""

from __future__ import annotations

import json

import pytest

from server.api.protocol import ChatMessage, NamedToolChoice, ToolDefinition
from server.api.tools import CallParsing, ToolCallStream, parse_tool_calls, template_messages, tool_grammar
from server.engine.grammar import GrammarCompiler
from tests.helpers import toy_tokenizer

NAMES = {"get_weather", "add"}
TEXT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
)
TOOLS = [
    ToolDefinition(
        type="function",
        function={
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"enum": ["Paris", "Rome"]}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    ),
    ToolDefinition(type="function", function={"name": "add", "description": "a + b"}),
]


def test_parse_whole_reply():
    content, calls = parse_tool_calls(TEXT, NAMES)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("add", {"a": 1, "b": 2}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


@pytest.mark.parametrize(
    "text",
    [
        "no calls here, just < and <tool and text",
        '<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "add", "arguments": [1]}</tool_call>',
        '<tool_call>{"name": "add", "arguments": {"a": 1',  # cut off by max_tokens
    ],
)
def test_text_that_is_not_a_call_stays_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_every_stream_split_gives_the_same_calls_and_content():
    want_content, want_calls = parse_tool_calls(TEXT, NAMES)
    for cut in range(1, len(TEXT)):
        for step in (1, 3, 7):
            stream = ToolCallStream(NAMES)
            pieces = [TEXT[:cut]] + [TEXT[i : i + step] for i in range(cut, len(TEXT), step)]
            events = [e for p in pieces for e in stream.push(p)] + stream.finish()
            content = "".join(e for e in events if isinstance(e, str))
            calls = [(e.name, e.arguments) for e in events if not isinstance(e, str)]
            assert content.strip() == want_content and calls == [(c.name, c.arguments) for c in want_calls]
            assert "<tool" not in content  # partial tags are held back, never leaked


def _conversation():
    return [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[
                {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            ],
        ),
        ChatMessage(role="tool", tool_call_id="call_1", content='{"temp": 21}'),
    ]


def _dicts(tools):
    return [t.model_dump(exclude_none=True) for t in tools]


def test_messages_for_a_template_without_tools():
    messages, tools = template_messages(_conversation(), _dicts(TOOLS), "{{ messages }}")
    assert tools is None
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert messages[3] == {"role": "user", "content": '<tool_response>\n{"temp": 21}\n</tool_response>'}


def test_messages_for_a_template_with_tools():
    messages, tools = template_messages(_conversation(), _dicts(TOOLS), "{% for t in tools %}{% endfor %}")
    assert [t["function"]["name"] for t in tools] == ["get_weather", "add"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # a dict, as HF expects
    assert messages[2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}


def _accepts(compiled, text: str) -> bool:
    tok = toy_tokenizer()
    m = compiled.matcher()
    return all(m.consume(t) for t in tok.encode(text, add_special_tokens=False)) and m.m.is_accepting()


def test_call_grammar_accepts_calls_only():
    compiler = GrammarCompiler(toy_tokenizer())
    required = compiler.compile(tool_grammar(TOOLS, "required", parallel=True))
    one = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Rome"}}\n</tool_call>'
    two = one + '\n<tool_call>\n{"name":"add","arguments":{"a":1}}\n</tool_call>'
    assert _accepts(required, one) and _accepts(required, two)
    assert not _accepts(required, '<tool_call>\n{"name":"get_weather","arguments":{"city":"Oslo"}}\n</tool_call>')
    assert not _accepts(required, "Sure! " + one)
    named = compiler.compile(tool_grammar(TOOLS, NamedToolChoice(type="function", function={"name": "add"}), True))
    assert not _accepts(named, one) and not _accepts(named, two)
    assert _accepts(named, '<tool_call>\n{"name":"add","arguments":{"a":1}}\n</tool_call>')
    assert tool_grammar(TOOLS, "auto", True) is None and tool_grammar(TOOLS, "none", True) is None


def test_a_forced_reply_has_no_content_even_when_cut():
    forced, auto = CallParsing(frozenset(NAMES), forced=True), CallParsing(frozenset(NAMES))
    cut = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa'
    assert forced.parse(cut) == (None, []) and auto.parse(cut) == (cut, [])
    stream = forced.stream()
    assert stream.push(cut[:15]) + stream.push(cut[15:]) + stream.finish() == []


def test_null_contents_for_a_template_without_tools():
    """A tool result or a system turn with `content: null` (left out of the template's message) still renders."""
    messages = [ChatMessage(role="system", content=None), ChatMessage(role="tool", tool_call_id="c", content=None)]
    out, _ = template_messages(messages, _dicts(TOOLS), "{{ messages }}")
    assert out[0]["content"].startswith("\n\n# Tools") and out[1]["content"] == "<tool_response>\n\n</tool_response>"
