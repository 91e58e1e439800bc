"""Request models mirroring the OpenAI API reference (https://platform.openai.com/docs/api-reference); what we
answer is in responses.py.

Requests accept and ignore unknown fields (the SDK sends fields such as `store` or `metadata`); what we
cannot honour (legacy `functions`, images, suffix, best_of != n) is rejected with a 400 by `unsupported()`,
never silently dropped. Non-OpenAI extensions are marked as such.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from model.chat_template import RESERVED

from ..engine_io import DEFAULT_MAX_TOKENS, SamplingParams

MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries

MAX_STOP = 4
MAX_STOP_CHARS = 256
MAX_N = 16


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")


def _stop_list(v: str | list[str] | None) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(s == "" for s in stops):
        raise ValueError("stop sequences must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
    return stops


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class JSONSchemaFormat(OpenAIModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(OpenAIModel):
    """vLLM's `structured_outputs` extension: exactly one of these."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions, in the reference's order."""

    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    user: str | None = None
    # Extensions (vLLM-compatible names).
    top_k: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    # Extensions: vLLM's constrained-decoding fields (structured.py turns them into one grammar).
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        _stop_list(v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v):
        if v is not None and len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries (got {len(v)})")
        for key in v or {}:
            if not key.lstrip("-").isdigit() or int(key) < 0:
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
        return v

    @property
    def stop_list(self) -> list[str]:
        return _stop_list(self.stop)

    def to_sampling_params(
        self, max_tokens: int, logit_bias: dict[int, float], logprobs: int | None, prompt_logprobs: bool = False
    ) -> SamplingParams:
        """The engine's view of the shared fields; the endpoint decides max_tokens and logprobs."""
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=logit_bias,
            stop=self.stop_list,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            n=self.n,
        )


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class FunctionDefinition(OpenAIModel):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class FunctionCall(OpenAIModel):
    name: str
    arguments: str  # a JSON object, as text (OpenAI's convention)


class ToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call this is the result of

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates take it; templates know no "developer" role, which is OpenAI's
        newer name for "system". Tool calls carry their arguments as a dict, as HF templates expect; a null
        content is left out, as transformers leaves out every null field."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        if self.content is not None:
            out["content"] = self.text()
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _args(c)}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _args(call: ToolCall) -> Any:
    try:
        return json.loads(call.function.arguments)
    except json.JSONDecodeError:
        return call.function.arguments


class ChatTemplateFields(OpenAIModel):
    """What a chat template gets beside the messages: tools (kept as the client sent them, key order and all,
    which is what transformers hands a template), and vLLM's extensions `documents` and `chat_template_kwargs`
    (variables of the template, e.g. enable_thinking)."""

    tools: list[ToolDefinition] | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    _raw_tools: list[dict[str, Any]] | None = PrivateAttr(default=None)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _not_reserved(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and (taken := sorted(set(v) & set(RESERVED))):
            raise ValueError(f"{taken} are set by the request itself, not through chat_template_kwargs")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw_tools(cls, data: Any, handler):
        model = handler(data)
        if isinstance(data, dict) and isinstance(data.get("tools"), list) and data["tools"]:
            model._raw_tools = data["tools"]
        return model

    def template_tools(self) -> list[dict[str, Any]] | None:
        if not self.tools:
            return None
        return self._raw_tools or [t.model_dump(exclude_none=True) for t in self.tools]


class ChatCompletionRequest(ChatTemplateFields, SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str
    logprobs: bool = False
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # deprecated by OpenAI, still sent by many clients
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    functions: list[Any] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def max_new_tokens(self, default: int) -> int:
        """max_completion_tokens, else the deprecated max_tokens, else the server's default."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return default if self.max_tokens is None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for a feature we cannot provide, else None."""
        if self.functions:
            return "functions", "the legacy functions field is not supported; use tools"
        names = [t.function.name for t in self.tools or []]
        if self.tool_choice not in (None, "none", "auto") and not names:
            return "tool_choice", "tool_choice requires tools"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            return "tool_choice", f"tool_choice names '{self.tool_choice.function.name}', which is not in tools"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs requires logprobs to be true"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: Annotated[int, Field(ge=1)] | None = None
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = DEFAULT_MAX_TOKENS
    suffix: str | None = None

    @property
    def max_new_tokens(self) -> int:
        return DEFAULT_MAX_TOKENS if self.max_tokens is None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported by this server"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of must equal n (server-side best-of is not supported)"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        if self.echo and self.stream and self.logprobs is not None:
            return "echo", "echo with logprobs is only supported without streaming"
        return None
