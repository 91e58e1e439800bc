"""Per-choice generation bookkeeping: output tokens, incremental text, stop strings and stop tokens.

Stop strings are held back while they might still be completing: text is released only up to the point
where no stop string could start, so a stop string never reaches the client, even when it arrives split
over several tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from model.tokenizer import IncrementalDetokenizer, Tokenizer

from ..engine_io import ChoiceDelta, SamplingParams, TokenLogprob
from .grammar import GrammarMatcher


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass
class Sequence:
    request_id: str
    index: int  # choice index within the request
    params: SamplingParams
    stop_ids: set[int]
    detok: IncrementalDetokenizer
    generator: torch.Generator | None = None
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    pending: str = ""  # decoded text not yet released (a stop string may be forming)
    finish_reason: str | None = None
    grammar: GrammarMatcher | None = None  # where this choice is in its request's grammar, if it has one
    # Built by the sampler the first time it needs them, then kept: the logit bias as (ids, values) tensors,
    # and, for presence / frequency penalties, how often each token was generated (V,), counted as they come.
    bias: tuple[torch.Tensor, torch.Tensor] | None = None
    counts: torch.Tensor | None = None

    @classmethod
    def create(
        cls, request_id: str, index: int, params: SamplingParams, tokenizer: Tokenizer, stop_ids: set[int]
    ) -> Sequence:
        gen = None
        if params.seed is not None:
            gen = torch.Generator().manual_seed((params.seed + index) % 2**64)
        grammar = params.grammar.matcher() if params.grammar is not None else None
        return cls(
            request_id,
            index,
            params,
            set() if params.ignore_eos else stop_ids,
            IncrementalDetokenizer(tokenizer, keep=params.keep_token_ids),
            gen,
            grammar=grammar,
        )

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, logprob: TokenLogprob | None) -> ChoiceDelta:
        """Record a sampled token and return what the client may see now."""
        delta = ChoiceDelta(self.index)
        self.output_ids.append(token_id)
        if self.counts is not None:
            self.counts[token_id] += 1
        if token_id in self.stop_ids:  # a stop token ends the choice and is not shown
            self.pending += self.detok.flush()
            self.finish_reason = "stop"
        else:
            delta.token_ids.append(token_id)
            if logprob is not None:
                delta.logprobs.append(logprob)
            self.pending += self.detok.push(token_id)
            if self.grammar is not None and (not self.grammar.consume(token_id) or self.grammar.done):
                self.pending += self.detok.flush()  # the grammar is complete: nothing may follow
                self.finish_reason = "stop"
            elif len(self.output_ids) >= self.params.max_tokens:
                self.pending += self.detok.flush()
                self.finish_reason = "length"
        delta.text = self._release()
        delta.finish_reason = self.finish_reason
        return delta

    def finish_early(self, reason: str) -> ChoiceDelta:
        """End the choice now (a deadline): release all the text held back, with `reason`."""
        self.pending += self.detok.flush()
        self.finish_reason = reason
        return ChoiceDelta(self.index, text=self._release(), finish_reason=self.finish_reason)

    def _release(self) -> str:
        """Text safe to show: up to a stop string (which ends the choice), minus a possible stop prefix."""
        stops = self.params.stop
        cut = min((i for s in stops if (i := self.pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.finish_reason = "stop"
            out, self.pending = self.pending[:cut], ""
            return out
        keep = 0 if self.finished else _held_back(self.pending, stops)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out
