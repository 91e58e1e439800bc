"""POST /v1/chat/completions: chat template -> engine -> chat.completion or chat.completion.chunk stream."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request

from .errors import APIError
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatTokenLogprob,
    ChoiceLogprobs,
    DeltaMessage,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
    new_id,
    now,
)
from .serving import Serving
from .streaming import sse_response, until_disconnect
from .types import GenerationRequest, TokenLogprob, Usage

log = logging.getLogger("aetheris.api")


def usage_info(u: Usage) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    )


def _chat_logprobs(serving: Serving, lps: list[TokenLogprob]) -> ChoiceLogprobs:
    def top(tok: int, lp: float) -> TopLogprob:
        return TopLogprob(token=serving.token_text(tok), logprob=lp, bytes=serving.token_bytes(tok))

    return ChoiceLogprobs(
        content=[
            ChatTokenLogprob(**top(lp.token_id, lp.logprob).model_dump(), top_logprobs=[top(t, v) for t, v in lp.top])
            for lp in lps
        ]
    )


def message_boundaries(tokenizer, messages: list[dict], prompt: list[int]) -> tuple[tuple[int, ...], int]:
    """Where each earlier message ends in the rendered prompt (a later request sharing the history but not the
    last turn resumes there), and how far the leading system messages reach (0: none). A boundary counts only
    where the history's own rendering is a prefix of the prompt's tokens: that is what a snapshot can serve."""
    points, pinned = [], 0
    for k in range(1, len(messages)):
        try:
            ids = tokenizer.encode_chat(messages[:k], add_generation_prompt=False)
        except Exception:  # a template may refuse a partial history (e.g. one that must end with a user turn)
            continue
        if 0 < len(ids) < len(prompt) and prompt[: len(ids)] == ids:
            points.append(len(ids))
            if all(m["role"] == "system" for m in messages[:k]):
                pinned = len(ids)
    return tuple(points), pinned


def build_request(serving: Serving, body: ChatCompletionRequest) -> GenerationRequest:
    serving.check_model(body.model)
    if (bad := body.unsupported()) is not None:
        raise APIError(400, bad[1], bad[0], "unsupported_parameter")
    messages = [m.to_template() for m in body.messages]
    try:
        prompt = serving.tokenizer.encode_chat(messages)
    except Exception as e:  # the checkpoint's chat template refused these messages
        raise APIError(400, f"messages: {e}", "messages", "invalid_value") from e
    params = body.to_sampling_params(
        max_tokens=body.max_new_tokens(serving.default_max_tokens(len(prompt))),
        logit_bias=serving.logit_bias(body.logit_bias),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    points, pinned = message_boundaries(serving.tokenizer, messages, prompt)
    return GenerationRequest(new_id("chatcmpl"), prompt, params, snapshot_at=points, pinned_prefix=pinned)


async def create_chat_completion(serving: Serving, body: ChatCompletionRequest, request: Request):
    req = await asyncio.to_thread(build_request, serving, body)  # a long prompt's template and tokens
    req.tenant = serving.tenant(request.headers)
    serving.log_request(req, body.messages)
    outputs = await serving.start(req)  # raises 503 before any byte is sent when overloaded
    abort = lambda: serving.engine.abort(req.request_id)  # noqa: E731
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(_stream(req, body, outputs, serving, include_usage), abort, serving.settings.send_timeout)
    return await until_disconnect(request, _collect(req, body, outputs, serving), abort)


async def _collect(req: GenerationRequest, body: ChatCompletionRequest, outputs: AsyncIterator, serving: Serving):
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
    return await asyncio.to_thread(_completion, req, body, serving, (texts, finish, lps), usage)


def _completion(req: GenerationRequest, body: ChatCompletionRequest, serving: Serving, got, usage) -> ChatCompletion:
    """The response, logprobs rendered (off the event loop: a long reply's logprobs are many objects)."""
    texts, finish, lps = got
    choices = [
        ChatChoice(
            index=i,
            message=AssistantMessage(content=texts[i]),
            finish_reason=finish[i],
            logprobs=_chat_logprobs(serving, lps[i]) if body.logprobs else None,
        )
        for i in range(req.params.n)
    ]
    return ChatCompletion(
        id=req.request_id, created=now(), model=serving.model_name, choices=choices, usage=usage_info(usage)
    )


async def _stream(
    req, body: ChatCompletionRequest, outputs: AsyncIterator, serving: Serving, include_usage: bool
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
    async for out in outputs:
        for d in out.deltas:
            texts[d.index] += d.text
            if d.text or d.logprobs:
                lp = _chat_logprobs(serving, d.logprobs) if body.logprobs else None
                yield chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text), logprobs=lp)])
            if d.finish_reason:
                yield chunk([ChatChunkChoice(index=d.index, delta=DeltaMessage(), finish_reason=d.finish_reason)])
        if out.usage is not None:
            serving.log_done(req, out.usage, texts)
            if include_usage:
                yield chunk([], usage_info(out.usage))
