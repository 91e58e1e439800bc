"""Structured outputs at the API: which grammar a request asks for, and compiling it off the event loop.

Accepted, on both endpoints: OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema"})
and vLLM's extensions `structured_outputs` ({"json" | "regex" | "choice" | "json_object"}), `guided_json`,
`guided_regex` and `guided_choice`. A request names at most one of them; chat's tool_choice "required" or a
named function sets the grammar itself (tools.py) and cannot be combined with another.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from model.tokenizer import Tokenizer

from ..engine.grammar import CompiledGrammar, GrammarCompiler, GrammarError, GrammarSpec
from .errors import APIError
from .protocol import SamplingFields


def _schema_text(schema: dict[str, Any] | str, param: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise APIError(400, f"{param}: the schema is not valid JSON: {e}", param, "invalid_value") from e
    return json.dumps(schema, sort_keys=True)  # one cache entry per schema, whatever its key order


def _from_response_format(body: SamplingFields) -> GrammarSpec | None:
    rf = body.response_format
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return GrammarSpec("json_object", "")
    if rf.json_schema is None or rf.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema", "response_format", "invalid_value")
    return GrammarSpec("json_schema", _schema_text(rf.json_schema.schema_, "response_format"))


def _from_extensions(body: SamplingFields) -> list[tuple[str, GrammarSpec]]:
    found = []
    so = body.structured_outputs
    if so is not None:
        kinds = [k for k in ("json_", "regex", "choice", "json_object") if getattr(so, k)]
        if len(kinds) != 1:
            raise APIError(400, "structured_outputs needs exactly one of json, regex, choice, json_object",
                           "structured_outputs", "invalid_value")  # fmt: skip
        found.append(("structured_outputs", _spec(kinds[0].rstrip("_"), getattr(so, kinds[0]), "structured_outputs")))
    for param, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice")):
        if (value := getattr(body, param)) is not None:
            found.append((param, _spec(kind, value, param)))
    return found


def _spec(kind: str, value: Any, param: str) -> GrammarSpec:
    if kind == "json":
        return GrammarSpec("json_schema", _schema_text(value, param))
    if kind == "json_object":
        return GrammarSpec("json_object", "")
    if kind == "choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise APIError(400, f"{param}: give a non-empty list of non-empty strings", param, "invalid_value")
        return GrammarSpec("choice", json.dumps(value))
    return GrammarSpec("regex", value)


def requested_grammar(body: SamplingFields, tools_spec: GrammarSpec | None = None) -> tuple[str, GrammarSpec] | None:
    """(param, spec) of the one grammar the request asks for, else None; two at once is a 400."""
    found = _from_extensions(body)
    if (rf := _from_response_format(body)) is not None:
        found.append(("response_format", rf))
    if tools_spec is not None:
        found.append(("tool_choice", tools_spec))
    if len(found) > 1:
        names = ", ".join(p for p, _ in found)
        raise APIError(400, f"only one output constraint per request, got {names}", found[1][0], "invalid_value")
    return found[0] if found else None


class Grammars:
    """The server's grammar compiler, built on first use (llguidance reads the whole vocabulary, about a
    second for 128k tokens) in a worker thread, like every compile: the event loop never waits on one."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()

    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(self.tokenizer)
            return self._compiler

    async def compile(self, param: str, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar; a grammar or schema llguidance cannot take is a 400 naming the feature."""
        try:
            return await asyncio.to_thread(lambda: self.compiler().compile(spec))
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param, "invalid_value") from e


async def grammar_for(grammars: Grammars, body: SamplingFields, tools_spec: GrammarSpec | None = None):
    """The request's compiled grammar, or None when its output is free."""
    found = requested_grammar(body, tools_spec)
    return None if found is None else await grammars.compile(*found)
