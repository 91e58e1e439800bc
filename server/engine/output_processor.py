"""Output processing: sampled tokens into each sequence's bookkeeping, and the RequestOutput messages that
leave through each request's `emit` callback (deltas, prompt logprobs, usage at the end, errors)."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..engine_io import ChoiceDelta, RequestOutput, Usage
from .sampler import Sampled, token_logprobs
from .scheduler import RequestState
from .sequence import Sequence


class OutputProcessor:
    def __init__(self, metrics=None) -> None:
        self.metrics = metrics

    def append(self, seqs: list[Sequence], sampled: Sampled) -> tuple[dict[str, list[ChoiceDelta]], list[int]]:
        """Append each row's token to its sequence: the deltas by request id, and the rows that finished."""
        by_request: dict[str, list[ChoiceDelta]] = {}
        finished = []
        for i, (seq, tok) in enumerate(zip(seqs, sampled.tokens)):
            by_request.setdefault(seq.request_id, []).append(seq.append(tok, sampled.logprobs[i]))
            if seq.finished:
                finished.append(i)
        return by_request, finished

    def emit(self, r: RequestState, deltas: list[ChoiceDelta]) -> bool:
        """Send the deltas; the message after which every choice has finished carries usage. True then."""
        now = time.perf_counter()
        if r.first_token_at is None and any(d.token_ids or d.finish_reason for d in deltas):
            r.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - r.arrival)
        done = all(s.finished for s in r.seqs)
        out = RequestOutput(r.request_id, deltas=deltas, finished=done)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(sum(len(d.token_ids) for d in deltas))
        if done:
            out.usage = Usage(len(r.req.prompt_ids), sum(len(s.output_ids) for s in r.seqs), r.cached)
        r.emit(out)
        return done

    def finish_scoring(self, r: RequestState) -> None:
        """max_tokens 0 (echo + logprobs scores a text): every choice ends after the prompt."""
        for s in r.seqs:
            s.finish_reason = "length"
        self.emit(r, [ChoiceDelta(s.index, finish_reason="length") for s in r.seqs])

    def emit_prompt_logprobs(self, r: RequestState) -> None:
        r.emit(RequestOutput(r.request_id, prompt_logprobs=r.prompt_logprobs))

    @staticmethod
    def fail(r: RequestState, message: str) -> None:
        r.emit(RequestOutput(r.request_id, finished=True, error=message))

    @staticmethod
    def add_prompt_logprobs(r: RequestState, before: Tensor | None, logits: Tensor, chunk: list[int]) -> None:
        """Logprob of each prompt token given the ones before it. `before` (V,) are the logits ahead of the
        chunk, None at the start of the prompt, whose first token has no logprob; `logits` (n, V) the chunk's."""
        if before is None:
            r.prompt_logprobs.append(None)
            preds, targets = logits[:-1], chunk[1:]
        else:
            preds, targets = torch.cat([before[None], logits[:-1]]), chunk
        r.prompt_logprobs.extend(token_logprobs(preds, targets, r.req.params.logprobs or 0))
