"""The engine core: one scheduler iteration at a time over a pool of recurrent-state slots.

Each `step()`:
  1. the scheduler admits waiting requests while slots remain (a request with n choices needs n); the model
     runner starts each from the longest cached snapshot of its prompt prefix if there is one;
  2. the scheduler plans prompt chunks under a per-iteration token budget, so a long prompt delays running
     streams by at most one chunk; the runner prefills them, and a completed prompt is snapshotted, forked
     into n pool rows, and its first tokens sampled;
  3. the runner runs ONE batched decode step over every running sequence (continuous batching), in place
     on the pool's rows; the sampler draws the next tokens and the output processor emits them.
The core is synchronous and single-threaded; server/engine.py runs it in a thread and carries requests in
and outputs out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model import HybridLM
from model.sampling import sampleable_vocab
from model.tokenizer import Tokenizer

from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .prefix_cache import PrefixCache
from .sampler import sample_next
from .scheduler import Emit, PrefillChunk, RequestState, Scheduler
from .sequence import Sequence
from .state_pool import StatePool
from .types import GenerationRequest


@dataclass
class CoreConfig:
    max_batch_size: int = 32  # state slots = the most sequences decoding at once
    prefill_budget: int = 512  # prompt tokens prefilled per iteration, over all requests
    state_cache_bytes: int = 256 << 20  # snapshot cache budget (0 disables prefix reuse)
    max_model_len: int = 0  # most tokens (prompt + output) a sequence may hold; 0 = unlimited (pure SSM models)
    kv_blocks: int = 0  # paged K/V blocks for attention layers (0: a contiguous max_model_len cache per slot)
    kv_block_size: int = 16  # tokens per K/V block
    snapshot_interval: int = 256  # prompt tokens between state snapshots during a long prefill (0 = none)
    state_cache_dir: str | None = None  # where pinned snapshots (system prompts) persist across restarts
    model_id: str = ""  # names the model in persisted snapshots


class EngineCore:
    def __init__(self, model: HybridLM, tokenizer: Tokenizer, cfg: CoreConfig, metrics=None) -> None:
        self.model, self.tokenizer, self.cfg, self.metrics = model, tokenizer, cfg, metrics
        self.vocab = sampleable_vocab(model.config.vocab_size, tokenizer.vocab_size)
        self.runner = ModelRunner(model, cfg, self.vocab, metrics)
        self.scheduler = Scheduler(
            self.runner.pool, cfg.prefill_budget, tokenizer, self.runner.cache, cfg.snapshot_interval
        )
        self.output = OutputProcessor(metrics)

    # What metrics, tests and benchmarks look at.
    @property
    def pool(self) -> StatePool:
        return self.runner.pool

    @property
    def cache(self) -> PrefixCache:
        return self.runner.cache

    @property
    def running(self) -> list[Sequence]:
        return self.runner.running

    @property
    def requests(self) -> dict[str, RequestState]:
        return self.scheduler.requests

    # ---------------------------------------------------------------- requests in / out
    def add(self, req: GenerationRequest, emit: Emit) -> None:
        self.scheduler.add(RequestState(req, emit))

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is and free its slots at once."""
        r = self.scheduler.remove(request_id)
        for seq in r.seqs if r is not None else ():
            self.runner.release(seq)

    def fail_all(self, message: str) -> None:
        for request_id, r in list(self.scheduler.requests.items()):
            self.abort(request_id)
            self.output.fail(r, message)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------- one iteration
    @torch.inference_mode()
    def step(self) -> None:
        admission = self.scheduler.admit()
        for r, why in admission.rejected:
            self.output.fail(r, why)
        for r in [r for r in admission.admitted if r.follow is None] + self.scheduler.released():
            self.runner.begin(r)
        for chunk in self.scheduler.plan_prefill():
            self._prefill(chunk)
        if self.runner.running:
            seqs, logits = self.runner.decode()
            self._sample_and_emit(seqs, logits, from_decode=True)
        if self.metrics is not None:
            self.metrics.observe_core(self)

    def _prefill(self, chunk: PrefillChunk) -> None:
        r = chunk.request
        if chunk.tokens:
            before = r.last_logits
            logits = self.runner.prefill(r, chunk.tokens)
            if logits is not None:
                self.output.add_prompt_logprobs(r, before, logits, chunk.tokens)
            if chunk.snapshot and not chunk.completes:
                self.runner.snapshot_prompt(r)
        if chunk.completes:
            self._start_decoding(r)

    def _start_decoding(self, r: RequestState) -> None:
        if r.req.params.prompt_logprobs:
            self.output.emit_prompt_logprobs(r)
        if r.req.params.max_tokens == 0:  # scoring only: done after the prompt
            self.runner.snapshot_prompt(r)
            self.output.finish_scoring(r)
            self.scheduler.requests.pop(r.request_id, None)
            return
        self._sample_and_emit(list(r.seqs), self.runner.start_decoding(r))

    def _sample_and_emit(self, seqs: list[Sequence], logits: Tensor, from_decode: bool = False) -> None:
        """Sample one token per sequence (seqs[i] <-> logits[i]), emit the deltas, retire finished sequences."""
        deltas, finished = self.output.append(seqs, sample_next(seqs, logits))
        for i in finished:
            seq = seqs[i]
            tokens = self.scheduler.requests[seq.request_id].req.prompt_ids + seq.output_ids[:-1]
            self.runner.finish(seq, tokens, logits[i] if from_decode else None)
        for request_id, ds in deltas.items():
            if self.output.emit(self.scheduler.requests[request_id], ds):
                self.scheduler.requests.pop(request_id, None)
