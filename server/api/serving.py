"""What the route handlers share: the loaded model's engine and tokenizer, and request-level helpers."""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator

from model.tokenizer import Tokenizer

from ..engine.async_engine import Engine
from ..engine_io import GenerationRequest, RequestOutput, Usage
from ..settings import Settings
from .errors import APIError
from .structured import Grammars

log = logging.getLogger("aetheris.api")


class Serving:
    def __init__(self, settings: Settings, engine: Engine, tokenizer: Tokenizer) -> None:
        self.settings, self.engine, self.tokenizer = settings, engine, tokenizer
        self.model_name = settings.model_name
        self.vocab = engine.core.vocab
        self.max_model_len = engine.core.cfg.max_model_len or None  # None: no context limit
        self.grammars = Grammars(tokenizer)
        # Logprobs name every token and its alternatives: each id is decoded once, not once per mention.
        self.token_text = functools.lru_cache(maxsize=1 << 17)(self._token_text)
        self.token_bytes = functools.lru_cache(maxsize=1 << 17)(self._token_bytes)

    def tenant(self, headers) -> str:
        """The prefix-cache namespace of a request: with --cache-isolation, a digest of its API key and
        X-Tenant-ID header (set by a trusted gateway); without, "" (one cache shared by every client)."""
        if not self.settings.cache_isolation:
            return ""
        who = headers.get("authorization", "") + "\0" + headers.get("x-tenant-id", "")
        return hashlib.sha256(who.encode()).hexdigest()[:32]

    def default_max_tokens(self, prompt_tokens: int) -> int:
        """max_tokens for a chat request that sets none: the server's default, within the context left."""
        if self.max_model_len is None:
            return self.settings.default_max_tokens
        return max(1, min(self.settings.default_max_tokens, self.max_model_len - prompt_tokens))

    def check_context(self, req: GenerationRequest) -> None:
        """A request longer than the context is refused as vLLM and OpenAI do, before it takes a slot; so is
        a prompt over --max-prompt-tokens, and, for a model without a context limit, max_tokens over
        --max-tokens-limit (a slot held for hours is a denial of service, not a long answer)."""
        prompt, new = len(req.prompt_ids), req.params.max_tokens
        cap = self.settings.max_prompt_tokens
        if cap and prompt > cap:
            raise APIError(
                400,
                f"the prompt has {prompt} tokens; this server accepts at most {cap} (--max-prompt-tokens)",
                "messages",
                "context_length_exceeded",
            )
        limit = self.settings.max_tokens_limit
        if self.max_model_len is None and new > limit:
            raise APIError(
                400,
                f"max_tokens is {new}; this server allows at most {limit} (--max-tokens-limit)",
                "max_tokens",
                "invalid_value",
            )
        if self.max_model_len is not None and prompt + new > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt + new} tokens ({prompt} in the messages, {new} in the completion). Please reduce the "
                "length of the messages or completion.",
                "messages",
                "context_length_exceeded",
            )
        pool = self.engine.core.pool
        if pool.paged and pool.blocks_needed(prompt + new, req.params.n) > pool.paged.n_blocks:
            raise APIError(
                400,
                f"{req.params.n} x ({prompt} + {new}) tokens do not fit the K/V cache "
                f"({pool.paged.n_blocks * pool.paged.block_size} tokens; see --kv-cache-mb)",
                "max_tokens",
                "context_length_exceeded",
            )

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )

    def check_n(self, n: int) -> None:
        if n > self.settings.max_batch_size:
            raise APIError(
                400,
                f"n={n} exceeds this server's --max-batch-size ({self.settings.max_batch_size})",
                "n",
                "invalid_value",
            )

    def logit_bias(self, bias: dict[str, float] | None) -> dict[int, float]:
        out = {}
        for key, value in (bias or {}).items():
            tok = int(key)
            if tok >= self.vocab:
                raise APIError(
                    400,
                    f"logit_bias: token id {tok} is outside the vocabulary (size {self.vocab})",
                    "logit_bias",
                    "invalid_value",
                )
            out[tok] = value
        return out

    def check_tokens(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab]
        if bad:
            raise APIError(
                400, f"{param}: token id {bad[0]} is outside the vocabulary (size {self.vocab})", param, "invalid_value"
            )

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _token_bytes(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id))

    async def start(self, req: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Submit to the engine; overload raises here, before a response has started."""
        if not req.prompt_ids:
            raise APIError(400, "the prompt is empty after tokenisation", "prompt", "invalid_value")
        self.check_n(req.params.n)
        self.check_context(req)
        if self.settings.request_timeout:
            req.deadline = time.monotonic() + self.settings.request_timeout
        return self.engine.submit(req)

    async def start_all(self, reqs: list[GenerationRequest]) -> list[AsyncIterator[RequestOutput]]:
        """Submit several requests; if one is refused, abort the ones already submitted."""
        streams = []
        try:
            for req in reqs:
                streams.append(await self.start(req))
        except BaseException:
            for req in reqs[: len(streams)]:
                self.engine.abort(req.request_id)
            raise
        return streams

    def log_request(self, req: GenerationRequest, content=None) -> None:
        p = req.params
        log.info(
            "%s: %d prompt tokens, n=%d, max_tokens=%d, temperature=%s",
            req.request_id,
            len(req.prompt_ids),
            p.n,
            p.max_tokens,
            p.temperature,
        )
        if self.settings.log_prompts and content is not None:
            log.info("%s prompt: %r", req.request_id, content)

    def log_done(self, req: GenerationRequest, usage: Usage | None, texts: list[str]) -> None:
        if usage is not None:
            log.info(
                "%s: done, %d completion tokens, %d cached prompt tokens",
                req.request_id,
                usage.completion_tokens,
                usage.cached_tokens,
            )
        if self.settings.log_prompts:
            log.info("%s output: %r", req.request_id, texts)
