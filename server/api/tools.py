"""Tool calling in the `<tool_call>{"name": ..., "arguments": ...}</tool_call>` convention that Granite,
Qwen and Hermes templates use: the messages and tools as the chat template takes them, the grammar that
holds "required" and named tool_choice to that format with schema-valid arguments, and the parser that
takes calls out of the model's text (whole, or as it streams).

A template that reads `tools` gets them as HF templates expect. A template that does not (ours, the
embedded model's) gets the Hermes system prompt listing them, assistant calls written back in the call
format, and tool results as user turns in `<tool_response>` tags, so any checkpoint can be asked.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from model.tokenizer import Tokenizer

from ..engine.grammar import JSON_OPTIONS, GrammarSpec, lark_literal
from .protocol import ChatMessage, NamedToolChoice, ToolDefinition

OPEN, CLOSE = "<tool_call>", "</tool_call>"

SYSTEM_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}'
    "\n</tool_call>"
)


@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON object as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


def template_messages(
    messages: list[ChatMessage], tools: list[dict[str, Any]] | None, template: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for the chat template, tools as the client sent them. A template that names `tools`
    renders tools, tool calls and tool results itself; for one that does not, they are written into the
    messages here."""
    if "tools" in template:
        return [m.to_template() for m in messages], tools or None
    out = []
    for m in messages:
        d = m.to_template()
        if m.tool_calls:
            calls = "\n".join(_call_text(c["function"]["name"], c["function"]["arguments"]) for c in d["tool_calls"])
            d = {"role": "assistant", "content": "\n".join(x for x in (d.get("content"), calls) if x)}
        elif m.role == "tool":
            d = {"role": "user", "content": f"<tool_response>\n{d.get('content', '')}\n</tool_response>"}
        out.append(d)
    if tools:
        listing = "\n".join(json.dumps(t) for t in tools)
        prompt = SYSTEM_PROMPT.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content', '')}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _call_text(name: str, arguments: Any) -> str:
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': arguments})}\n{CLOSE}"


def call_schema(tool: ToolDefinition) -> dict[str, Any]:
    """The JSON of one call: this tool's name and arguments valid against its parameters."""
    params = tool.function.parameters or {"type": "object"}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.function.name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def tag_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """The call tags that are one added token of this vocabulary (Granite and Qwen add `<tool_call>` and
    `</tool_call>`): {tag: token id}. The model writes such a tag as that token, never as its characters."""
    ids = {tag: tokenizer.added_token_id(tag) for tag in (OPEN, CLOSE)}
    return {tag: i for tag, i in ids.items() if i is not None}


def _tag(tag: str, tokens: dict[str, int]) -> str:
    """The tag in the call grammar: its token by id where it is one added token (a text literal would have
    llguidance ask for the characters, which the model never writes), else its text."""
    return f"<[{tokens[tag]}]>" if tag in tokens else lark_literal(tag)


def tool_grammar(
    tools: list[ToolDefinition],
    choice: str | NamedToolChoice | None,
    parallel: bool,
    tag_ids: dict[str, int] | None = None,
) -> GrammarSpec | None:
    """The grammar for tool_choice "required" (one of the tools) or a named function (that one); None for
    "auto" / "none", where the model chooses and the text is parsed afterwards. `tag_ids`: the tags that
    are one token of the vocabulary (`tag_tokens`)."""
    if isinstance(choice, NamedToolChoice):
        schema = call_schema(next(t for t in tools if t.function.name == choice.function.name))
        parallel = False  # OpenAI: a named choice calls that function, once
    elif choice == "required":
        schemas = [call_schema(t) for t in tools]
        schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    else:
        return None
    schema = {**schema, "x-guidance": JSON_OPTIONS}  # compact JSON, as for response_format
    repeat = ' ("\\n" call)*' if parallel else ""
    tags = tag_ids or {}
    lark = (
        f"start: call{repeat}\n"
        f'call: {_tag(OPEN, tags)} "\\n" body "\\n" {_tag(CLOSE, tags)}\n'
        f"body: %json {json.dumps(schema)}\n"
    )
    return GrammarSpec("lark", lark)


def parse_call(block: str, names: set[str]) -> ParsedCall | None:
    """One call from the JSON between the tags; None when it is not a call of a known tool."""
    try:
        obj = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


@dataclass(frozen=True)
class CallParsing:
    """How a reply's calls are taken out of its text: which tools, and whether the reply was held to calls
    (tool_choice "required" or named), in which case no text of it is content, not even a call that
    max_tokens cut short."""

    names: frozenset[str]
    forced: bool = False

    def stream(self) -> ToolCallStream:
        return ToolCallStream(set(self.names), keep_text=not self.forced)

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        return parse_tool_calls(text, set(self.names), keep_text=not self.forced)


def parse_tool_calls(text: str, names: set[str], keep_text: bool = True) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole reply: the text outside well-formed call blocks, and the calls."""
    stream = ToolCallStream(names, keep_text)
    events = stream.push(text) + stream.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [e for e in events if isinstance(e, ParsedCall)]
    if calls or not keep_text:
        content = content.strip() or None
    return content, calls


class ToolCallStream:
    """Splits text arriving piece by piece into content and calls: text that may be the start of a call tag
    is held back until it is known, a call is released when its closing tag arrives, and a block that is not
    a call of a known tool is released as plain text."""

    def __init__(self, names: set[str], keep_text: bool = True) -> None:
        self.names, self.keep_text = names, keep_text  # keep_text False: only calls come out
        self.buf = ""
        self.calls = 0  # calls parsed so far
        self.calls_sent = 0  # of which the API has streamed (their index in the choice's tool_calls)

    def push(self, text: str) -> list[str | ParsedCall]:
        self.buf += text
        events: list[str | ParsedCall] = []
        while True:
            start = self.buf.find(OPEN)
            if start < 0:
                keep = _partial_tag(self.buf)
                self._content(events, self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                return events
            end = self.buf.find(CLOSE, start)
            if end < 0:  # a call is being written: wait for its end
                self._content(events, self.buf[:start])
                self.buf = self.buf[start:]
                return events
            self._content(events, self.buf[:start])
            call = parse_call(self.buf[start + len(OPEN) : end].strip(), self.names)
            if call is None:
                events.append(self.buf[start : end + len(CLOSE)])
            else:
                events.append(call)
                self.calls += 1
            self.buf = self.buf[end + len(CLOSE) :]

    def finish(self) -> list[str | ParsedCall]:
        """What is left at the end (an unclosed call, cut by max_tokens or a stop, is plain text)."""
        rest, self.buf = self.buf, ""
        return [rest] if rest and self.keep_text else []

    def _content(self, events: list, text: str) -> None:
        if text and self.keep_text and not (self.calls and text.isspace()):  # newlines between calls are not
            events.append(text)


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the opening tag."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0
