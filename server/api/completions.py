"""POST /v1/completions: raw prompts (text or token ids, one or many) -> text_completion.

With echo + logprobs + max_tokens 0 the response scores a text: the logprob of every prompt token given
the ones before it (what lm-evaluation-harness's `local-completions` needs for loglikelihood tasks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

from fastapi import Request

from ..engine_io import GenerationRequest, TokenLogprob, Usage
from .errors import APIError
from .protocol import CompletionRequest
from .responses import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    include_usage,
    new_id,
    now,
    respond,
    usage_info,
)
from .serving import Serving
from .streaming import merge
from .structured import grammar_for


def _prompts(serving: Serving, prompt) -> list[tuple[str, list[int]]]:
    """(text, token ids) for every prompt in any of the four accepted forms."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "prompt must not be an empty list", "prompt", "invalid_value")
    out = []
    for p in prompts:
        if isinstance(p, str):
            ids = serving.tokenizer.encode(p)
            if not ids:  # an empty prompt starts a new document
                ids = [serving.tokenizer.eos_token_id or 0]
            out.append((p, ids))
        else:
            if not p:
                raise APIError(400, "a token-id prompt must not be empty", "prompt", "invalid_value")
            serving.check_tokens(p, "prompt")
            out.append((serving.tokenizer.decode(p, skip_special_tokens=False), list(p)))
    return out


async def build_requests(serving: Serving, body: CompletionRequest) -> tuple[str, list[tuple[str, GenerationRequest]]]:
    """The response id, and (prompt text, engine request) per prompt; request i of a response is `{id}-{i}`."""
    serving.check_model(body.model)
    if (bad := body.unsupported()) is not None:
        raise APIError(400, bad[1], bad[0], "unsupported_parameter")
    grammar = await grammar_for(serving.grammars, body)
    base = new_id("cmpl")
    reqs = []
    prompts = await asyncio.to_thread(_prompts, serving, body.prompt)  # long prompts tokenize off the event loop
    for i, (text, ids) in enumerate(prompts):
        params = body.to_sampling_params(
            max_tokens=body.max_new_tokens,
            logit_bias=serving.logit_bias(body.logit_bias),
            logprobs=body.logprobs,
            prompt_logprobs=body.echo and body.logprobs is not None,
        )
        params.grammar = grammar
        reqs.append((text, GenerationRequest(f"{base}-{i}", ids, params)))
    return base, reqs


class _Logprobs:
    """The legacy completions logprobs object of one choice, built from (token id, logprob) pairs; text
    offsets continue from one call to the next, so a stream builds one object per delta."""

    def __init__(self, serving: Serving, offset: int) -> None:
        self.serving, self.offset = serving, offset

    def build(self, pairs: Iterable[tuple[int, TokenLogprob | None]]) -> CompletionLogprobs:
        obj = CompletionLogprobs()
        for token_id, lp in pairs:
            text = self.serving.token_text(token_id)
            obj.tokens.append(text)
            obj.token_logprobs.append(None if lp is None else lp.logprob)
            obj.top_logprobs.append(None if lp is None else {self.serving.token_text(t): v for t, v in lp.top})
            obj.text_offset.append(self.offset)
            self.offset += len(text)
        return obj


async def create_completion(serving: Serving, body: CompletionRequest, request: Request):
    cid, reqs = await build_requests(serving, body)
    tenant = serving.tenant(request.headers)
    for text, req in reqs:
        req.tenant = tenant
        serving.log_request(req, text)
    streams = await serving.start_all([req for _, req in reqs])

    def abort() -> None:
        for _, req in reqs:
            serving.engine.abort(req.request_id)

    return await respond(
        serving,
        request,
        body.stream,
        lambda: _stream(serving, body, cid, reqs, streams, include_usage(body.stream_options)),
        lambda: _collect(serving, body, cid, reqs, streams),
        abort,
    )


async def _collect(serving: Serving, body: CompletionRequest, cid: str, reqs, streams: list[AsyncIterator]):
    n = body.n
    texts = [text if body.echo else "" for text, _ in reqs for _ in range(n)]
    finish: list[str | None] = [None] * len(texts)
    pairs: list[list[tuple[int, TokenLogprob | None]]] = [[] for _ in texts]  # (token id, logprob) per choice
    usage = Usage(0, 0, 0)
    async for p, out in merge(streams):
        if out.prompt_logprobs is not None:  # echo: the prompt's tokens lead each choice's logprobs
            for j in range(n):
                pairs[p * n + j] += zip(reqs[p][1].prompt_ids, out.prompt_logprobs)
        for d in out.deltas:
            k = p * n + d.index
            texts[k] += d.text
            pairs[k] += zip(d.token_ids, d.logprobs or [None] * len(d.token_ids))
            finish[k] = d.finish_reason or finish[k]
        if out.usage is not None:
            serving.log_done(reqs[p][1], out.usage, texts[p * n : (p + 1) * n])
            usage += out.usage
    return await asyncio.to_thread(_completion, serving, body, cid, reqs, (texts, finish, pairs), usage)


def _completion(serving: Serving, body: CompletionRequest, cid: str, reqs, got, usage: Usage) -> Completion:
    """The response, logprobs rendered (off the event loop: echo of a long prompt is many objects)."""
    texts, finish, pairs = got
    offsets = [0 if body.echo else len(text) for text, _ in reqs for _ in range(body.n)]
    choices = [
        CompletionChoice(
            index=k,
            text=texts[k],
            finish_reason=finish[k],
            logprobs=_Logprobs(serving, offsets[k]).build(pairs[k]) if body.logprobs is not None else None,
        )
        for k in range(len(texts))
    ]
    return Completion(
        id=cid,
        created=now(),
        model=serving.model_name,
        choices=choices,
        usage=usage_info(usage),
    )


async def _stream(serving: Serving, body: CompletionRequest, cid: str, reqs, streams, with_usage: bool):
    created, n = now(), body.n

    def chunk(choices: list[CompletionChoice], usage=None) -> dict:
        c = Completion(id=cid, created=created, model=serving.model_name, choices=choices, usage=usage)
        return c.model_dump(exclude=None if with_usage else {"usage"})

    if body.echo:
        for p, (text, _) in enumerate(reqs):
            for j in range(n):
                yield chunk([CompletionChoice(index=p * n + j, text=text, finish_reason=None)])
    lps = [_Logprobs(serving, len(text)) for text, _ in reqs for _ in range(n)]
    texts = [""] * len(lps)
    usage = Usage(0, 0, 0)
    async for p, out in merge(streams):
        for d in out.deltas:
            k = p * n + d.index
            texts[k] += d.text
            lp = None
            if body.logprobs is not None and d.token_ids:
                lp = lps[k].build(zip(d.token_ids, d.logprobs))
            if d.text or lp or d.finish_reason:
                yield chunk([CompletionChoice(index=k, text=d.text, logprobs=lp, finish_reason=d.finish_reason)])
        if out.usage is not None:
            serving.log_done(reqs[p][1], out.usage, texts[p * n : (p + 1) * n])
            usage += out.usage
    if with_usage:
        yield chunk([], usage_info(usage))
