"""The engine core: one scheduler iteration at a time over a pool of recurrent-state slots.

Each `step()`:
  1. the scheduler admits waiting requests while slots remain (a request with n choices needs n); the model
     runner starts each from the longest cached snapshot of its prompt prefix if there is one;
  2. the scheduler plans prompt chunks under a per-iteration token budget, so a long prompt delays running
     streams by at most one chunk; the runner prefills them, and a completed prompt is snapshotted, forked
     into n pool rows, and its first tokens sampled;
  3. the runner runs ONE batched decode step over every running sequence (continuous batching), in place
     on the pool's rows; the sampler draws the next tokens and the output processor emits them.
The core is synchronous and single-threaded; async_engine.py runs it in a thread and carries requests in
and outputs out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from model import HybridLM
from model.sampling import sampleable_vocab
from model.tokenizer import Tokenizer

from ..engine_io import ChoiceDelta, GenerationRequest
from . import faults
from .model_runner import ModelRunner
from .output_processor import OutputProcessor
from .prefix_cache import PrefixCache
from .sampler import Sampled, sample_next
from .scheduler import Emit, PrefillChunk, RequestState, Scheduler
from .sequence import Sequence
from .state_pool import StatePool

log = logging.getLogger("aetheris.engine")


def device_failed(e: BaseException) -> bool:
    """An error of the device itself (a CUDA error such as a device-side assert): the context is poisoned, so
    every later request would fail too. It is not one request's failure; the engine stops on it."""
    return isinstance(e, torch.AcceleratorError) or (isinstance(e, RuntimeError) and "CUDA error" in str(e))


@dataclass(kw_only=True)
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
    cuda_graphs: bool = True  # on a GPU, replay the decode step as CUDA graphs where it can (cuda_graphs.py)


class EngineCore:
    def __init__(self, model: HybridLM, tokenizer: Tokenizer, cfg: CoreConfig, metrics=None) -> None:
        if model.config.attention_layers and not cfg.max_model_len:
            raise ValueError("a model with attention layers needs a context limit (CoreConfig.max_model_len)")
        self.model, self.tokenizer, self.cfg, self.metrics = model, tokenizer, cfg, metrics
        self.vocab = sampleable_vocab(model.config.vocab_size, tokenizer.vocab_size)
        self.runner = ModelRunner(model, cfg, self.vocab, metrics)
        self.scheduler = Scheduler(
            self.runner.pool, cfg.prefill_budget, tokenizer, self.runner.cache, cfg.snapshot_interval
        )
        self.output = OutputProcessor(metrics)
        self.sample_next = sample_next  # a collaborator like the runner, so that faults.py can wrap it
        faults.install(self)  # tests only: nothing is installed unless AETHERIS_FAULTS is set

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

    def fail(self, r: RequestState, message: str) -> None:
        """End one request with an error (500 / an error event) and free its slots; the others carry on."""
        self.output.fail(r, message)  # first: freeing the slots touches the device, which may have failed
        self.abort(r.request_id)

    def fail_all(self, message: str) -> None:
        requests = list(self.scheduler.requests.values())
        for r in requests:
            self.output.fail(r, message)
        for r in requests:
            self.abort(r.request_id)

    def _fail_rows(self, seqs: list[Sequence], bad: list[int], why: str) -> None:
        for rid in dict.fromkeys(seqs[i].request_id for i in bad):
            if (r := self.scheduler.requests.get(rid)) is not None:
                log.error("%s: %s; failing this request only", rid, why)
                self.fail(r, f"internal error while serving this request: {why}")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------- one iteration
    @torch.inference_mode()
    def step(self) -> None:
        self._expire()
        admission = self.scheduler.admit()
        for r, why in admission.rejected:
            self.output.fail(r, why)
        for r in [r for r in admission.admitted if r.follow is None] + self.scheduler.released():
            self.runner.begin(r)
        for chunk in self.scheduler.plan_prefill():
            if chunk.request.request_id in self.scheduler.requests:  # not failed by an earlier chunk
                self._guarded(chunk.request, self._prefill, chunk)
        if self.runner.running:
            self._decode()
        if self.metrics is not None:
            self.metrics.observe_core(self)

    def _guarded(self, r: RequestState, work, *args) -> None:
        """Run one request's own work (its prefill, its first tokens); a failure fails that request alone."""
        try:
            work(*args)
        except Exception as e:
            if device_failed(e):
                raise
            log.exception("%s: failed while prefilling", r.request_id)
            self.fail(r, f"internal error while serving this request: {type(e).__name__}")

    def _decode(self) -> None:
        """The batched step. If it fails, the requests in it fail; waiting and prefilling ones carry on."""
        try:
            seqs, logits = self.runner.decode()
        except Exception as e:
            if device_failed(e):
                raise
            log.exception("the decode step failed; failing the %d sequences in it", len(self.runner.running))
            seqs = list(self.runner.running)
            self._fail_rows(seqs, list(range(len(seqs))), f"the decode step failed ({type(e).__name__})")
            return
        self._sample_and_emit(seqs, logits, from_decode=True)

    def _expire(self) -> None:
        """End the requests past their deadline as if they had reached max_tokens: the text so far, finish
        reason "length", and usage."""
        now = time.monotonic()
        for r in [r for r in self.scheduler.requests.values() if r.req.deadline is not None]:
            if now < r.req.deadline:
                continue
            if not r.seqs:  # still waiting: no choice has started
                deltas = [ChoiceDelta(i, finish_reason="length") for i in range(r.req.params.n)]
            else:
                deltas = [s.finish_early("length") for s in r.seqs if not s.finished]
            self.abort(r.request_id)
            self.output.emit(r, deltas)

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
        """Sample one token per sequence (seqs[i] <-> logits[i]), emit the deltas, retire finished sequences.
        A row that cannot be sampled (NaN logits, a sampler error, an id outside the vocabulary) fails its
        request alone."""
        seqs, logits, sampled = self._sample(seqs, logits)
        deltas, finished = self.output.append(seqs, sampled)
        for i in finished:
            seq = seqs[i]
            r = self.scheduler.requests[seq.request_id]
            tokens = r.req.prompt_ids + seq.output_ids[:-1]
            self.runner.finish(seq, tokens, logits[i] if from_decode else None, r.req.tenant)
        for request_id, ds in deltas.items():
            if self.output.emit(self.scheduler.requests[request_id], ds):
                self.scheduler.requests.pop(request_id, None)

    def _sample(self, seqs: list[Sequence], logits: Tensor) -> tuple[list[Sequence], Tensor, Sampled]:
        """The rows that could be sampled, their logits and their tokens; the others' requests are failed."""
        try:
            sampled = self.sample_next(seqs, logits)
        except Exception as e:  # find the rows at fault by sampling them one at a time
            if device_failed(e):
                raise
            log.exception("sampling a batch of %d failed; sampling row by row", len(seqs))
            sampled, bad = self._sample_rows(seqs, logits)
            self._fail_rows(seqs, bad, "the sampler failed")
            seqs, logits = self._keep(seqs, logits, bad)
        toks = sampled.tokens
        nan = [i for i, x in enumerate(sampled.nan or []) if x]
        self._fail_rows(seqs, nan, "the model produced NaN logits")
        outside = [i for i, t in enumerate(toks) if i not in nan and not 0 <= t < self.vocab]
        self._fail_rows(seqs, outside, "the sampler returned a token id outside the vocabulary")
        # The grammar's mask and its parser can disagree (llguidance on added tokens): a rejected token fails
        # its request rather than ending the choice as if the grammar were complete.
        done = set(nan + outside)
        rejected = [i for i, (s, t) in enumerate(zip(seqs, toks)) if i not in done and not _accepts(s, t)]
        self._fail_rows(seqs, rejected, "the output grammar rejected the sampled token")
        bad = nan + outside + rejected
        keep = [i for i in range(len(seqs)) if i not in bad]
        sampled = Sampled([toks[i] for i in keep], [sampled.logprobs[i] for i in keep])
        seqs, logits = self._keep(seqs, logits, bad)
        return seqs, logits, sampled

    def _sample_rows(self, seqs: list[Sequence], logits: Tensor) -> tuple[Sampled, list[int]]:
        tokens, lps, nan, bad = [], [], [], []
        for i, s in enumerate(seqs):
            try:
                one = self.sample_next([s], logits[i : i + 1])
            except Exception as e:
                if device_failed(e):
                    raise
                bad.append(i)
                continue
            tokens += one.tokens
            lps += one.logprobs
            nan += one.nan or [False]
        return Sampled(tokens, lps, nan), bad

    @staticmethod
    def _keep(seqs: list[Sequence], logits: Tensor, bad: list[int]) -> tuple[list[Sequence], Tensor]:
        if not bad:
            return seqs, logits
        drop = set(bad)
        keep = [i for i in range(len(seqs)) if i not in drop]
        return [seqs[i] for i in keep], logits[keep]


def _accepts(seq: Sequence, token: int) -> bool:
    return seq.grammar is None or seq.grammar.done or seq.grammar.accepts(token)
