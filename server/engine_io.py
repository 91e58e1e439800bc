"""Plain dataclasses exchanged between the API layer and the engine (no FastAPI, no pydantic here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine.grammar import CompiledGrammar

DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy completions default; chat uses the server's --default-max-tokens


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the API answers 503 with Retry-After."""


class EngineError(RuntimeError):
    """A request failed inside the engine (the message is safe to show to the client)."""


@dataclass
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; else how many top alternatives per token (0..20)
    prompt_logprobs: bool = False  # completions echo + logprobs: logprob of every prompt token
    n: int = 1
    grammar: CompiledGrammar | None = None  # constrained decoding: each choice's output matches it
    keep_token_ids: frozenset[int] = frozenset()  # special tokens whose text stays in the output (call tags)

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Prompt positions where a later request is likely to branch (the ends of chat messages): the engine keeps
    # a state snapshot there. Up to `pinned_prefix` tokens (a system prompt) the snapshot is pinned.
    snapshot_at: tuple[int, ...] = ()
    pinned_prefix: int = 0
    # Whose prefix snapshots this request may use and make ("" = the cache every client shares).
    tenant: str = ""
    # time.monotonic() past which the request ends with finish_reason "length" (None = no deadline).
    deadline: float | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        """Several prompts' usage as one (a completions request with a list of prompts)."""
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass
class ChoiceDelta:
    """New output of one choice: text (stop strings already held back / cut), tokens, and maybe the end."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" / "length" on the last delta of the choice


@dataclass
class RequestOutput:
    """One message from the engine to a request's consumer: choice deltas, and at the end usage."""

    request_id: str
    deltas: list[ChoiceDelta] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with params.prompt_logprobs, first message
    usage: Usage | None = None  # set on the final message
    finished: bool = False
    error: str | None = None
