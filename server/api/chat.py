"""POST /v1/chat/completions: chat template -> engine -> chat.completion or chat.completion.chunk stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request

from ..engine_io import GenerationRequest, TokenLogprob
from .errors import APIError
from .prompts import ChatPrompt, render_chat
from .protocol import ChatCompletionRequest, FunctionCall, ToolCall
from .responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatTokenLogprob,
    ChoiceLogprobs,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    TopLogprob,
    UsageInfo,
    include_usage,
    new_id,
    now,
    respond,
    usage_info,
)
from .serving import Serving
from .structured import grammar_for
from .tools import CallParsing, ParsedCall, ToolCallStream, tag_tokens, tool_grammar

log = logging.getLogger("aetheris.api")


def _chat_logprobs(serving: Serving, lps: list[TokenLogprob]) -> ChoiceLogprobs:
    def top(tok: int, lp: float) -> TopLogprob:
        return TopLogprob(token=serving.token_text(tok), logprob=lp, bytes=serving.token_bytes(tok))

    return ChoiceLogprobs(
        content=[
            ChatTokenLogprob(**top(lp.token_id, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
            for lp in lps
        ]
    )


async def build_request(serving: Serving, body: ChatCompletionRequest) -> tuple[GenerationRequest, CallParsing | None]:
    """The engine request, and how calls are parsed out of the reply (None: no parsing)."""
    serving.check_model(body.model)
    if (bad := body.unsupported()) is not None:
        raise APIError(400, bad[1], bad[0], "unsupported_parameter")
    tools = body.tools or None
    chat = ChatPrompt.of(serving.tokenizer, body.messages, body)
    prompt, (points, pinned) = await render_chat(serving.tokenizer, chat)
    tags = tag_tokens(serving.tokenizer) if tools else {}
    tools_spec = tool_grammar(tools, body.tool_choice, body.parallel_tool_calls, tags) if tools else None
    params = body.to_sampling_params(
        max_tokens=body.max_new_tokens(serving.default_max_tokens(len(prompt))),
        logit_bias=serving.logit_bias(body.logit_bias),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    params.grammar = await grammar_for(serving.grammars, body, tools_spec)
    parsing = None
    if tools and body.tool_choice != "none":
        parsing = CallParsing(frozenset(t.function.name for t in tools), forced=tools_spec is not None)
        # The parser reads the call tags, which skipping special tokens would take out of the text.
        params.keep_token_ids = frozenset(tags.values()) & serving.tokenizer.special_ids
    req = GenerationRequest(new_id("chatcmpl"), prompt, params, snapshot_at=points, pinned_prefix=pinned)
    return req, parsing


async def create_chat_completion(serving: Serving, body: ChatCompletionRequest, request: Request):
    req, parsing = await build_request(serving, body)
    req.tenant = serving.tenant(request.headers)
    serving.log_request(req, body.messages)
    outputs = await serving.start(req)  # raises 503 before any byte is sent when overloaded
    return await respond(
        serving,
        request,
        body.stream,
        lambda: _stream(req, body, outputs, serving, include_usage(body.stream_options), parsing),
        lambda: _collect(req, body, outputs, serving, parsing),
        lambda: serving.engine.abort(req.request_id),
    )


def _message(text: str, finish: str | None, parsing: CallParsing | None) -> tuple[AssistantMessage, str | None]:
    """The reply as a message: calls taken out of the text when tools are on; finish_reason "tool_calls" when
    a choice that ended by itself made calls."""
    if parsing is None:
        return AssistantMessage(content=text), finish
    content, calls = parsing.parse(text)
    tool_calls = [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]
    return AssistantMessage(content=content, tool_calls=tool_calls or None), _finish(finish, bool(calls))


def _finish(finish: str | None, called: bool) -> str | None:
    return "tool_calls" if called and finish == "stop" else finish


async def _collect(
    req: GenerationRequest,
    body: ChatCompletionRequest,
    outputs: AsyncIterator,
    serving: Serving,
    parsing: CallParsing | None,
):
    n = req.params.n
    texts, finish, lps = [""] * n, [None] * n, [[] for _ in range(n)]
    usage = None
    async for out in outputs:
        for d in out.deltas:
            texts[d.index] += d.text
            lps[d.index] += d.logprobs
            finish[d.index] = d.finish_reason or finish[d.index]
        usage = out.usage or usage
    serving.log_done(req, usage, texts)
    return await asyncio.to_thread(_completion, req, body, serving, (texts, finish, lps, parsing), usage)


def _completion(req: GenerationRequest, body: ChatCompletionRequest, serving: Serving, got, usage) -> ChatCompletion:
    """The response, tool calls parsed and logprobs rendered (off the event loop: a long reply's logprobs are
    many objects)."""
    texts, finish, lps, parsing = got
    choices = []
    for i in range(req.params.n):
        message, reason = _message(texts[i], finish[i], parsing)
        lp = _chat_logprobs(serving, lps[i]) if body.logprobs else None
        choices.append(ChatChoice(index=i, message=message, finish_reason=reason, logprobs=lp))
    return ChatCompletion(
        id=req.request_id, created=now(), model=serving.model_name, choices=choices, usage=usage_info(usage)
    )


async def _stream(
    req,
    body: ChatCompletionRequest,
    outputs: AsyncIterator,
    serving: Serving,
    include_usage: bool,
    parsing: CallParsing | None = None,
) -> AsyncIterator[dict]:
    created, model = now(), serving.model_name

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> dict:
        c = ChatCompletionChunk(id=req.request_id, created=created, model=model, choices=choices, usage=usage)
        out = c.model_dump(exclude=None if include_usage else {"usage"})
        for choice in out["choices"]:  # deltas carry only what changed: {"role"...} first, {} at the end
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return out

    for i in range(req.params.n):  # the first chunk of each choice carries the role
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
    texts = [""] * req.params.n
    calls = [None if parsing is None else parsing.stream() for _ in range(req.params.n)]
    async for out in outputs:
        for d in out.deltas:
            texts[d.index] += d.text
            lp = _chat_logprobs(serving, d.logprobs) if body.logprobs and d.logprobs else None
            for delta in _deltas(d.text, calls[d.index], d.finish_reason is not None):
                yield chunk([ChatChunkChoice(index=d.index, delta=delta, logprobs=lp)])
                lp = None
            if lp is not None:
                yield chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=""), logprobs=lp)])
            if d.finish_reason:
                reason = _finish(d.finish_reason, bool(calls[d.index] and calls[d.index].calls))
                yield chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(), finish_reason=reason)])
        if out.usage is not None:
            serving.log_done(req, out.usage, texts)
            if include_usage:
                yield chunk([], usage_info(out.usage))


def _deltas(text: str, calls: ToolCallStream | None, last: bool) -> list[DeltaMessage]:
    """The stream deltas for new text: content as it comes, or with tools on, content outside calls and each
    call whole once closed (id, type, name and arguments in one fragment, which the SDK accumulates)."""
    if calls is None:
        return [DeltaMessage(content=text)] if text else []
    events = calls.push(text) + (calls.finish() if last else [])
    out = []
    for e in events:
        if isinstance(e, ParsedCall):
            fn = DeltaFunctionCall(name=e.name, arguments=e.arguments)
            out.append(
                DeltaMessage(tool_calls=[DeltaToolCall(index=calls.calls_sent, id=e.id, type="function", function=fn)])
            )
            calls.calls_sent += 1
        else:
            out.append(DeltaMessage(content=e))
    return out
