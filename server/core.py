"""The engine core: one scheduler iteration at a time over a pool of recurrent-state slots.

Glossary: B running sequences in a decode step, V vocab size, S slots.

Each `step()`:
  1. admits waiting requests while slots remain (a request with n choices needs n), starting each from the
     longest cached snapshot of its prompt prefix if there is one;
  2. prefills prompts chunk by chunk under a per-iteration token budget, so a long prompt delays running
     streams by at most one chunk; when a prompt is complete its state is snapshotted, forked into n pool
     rows and the first tokens are sampled;
  3. runs ONE batched decode step over every running sequence (continuous batching), in place on the pool's
     running rows, and samples.
A request's computed-token count chases its prompt length (vLLM's framing); there are no phases to switch.
The core is synchronous and single-threaded; server/engine.py runs it in a thread and carries requests in
and outputs out. Outputs leave through each request's `emit` callback.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from model import HybridLM, ModelState
from model.sampling import SamplingBatch, apply_penalties, sample
from model.tokenizer import Tokenizer

from .sequence import Sequence
from .state_pool import PrefixCache, StatePool
from .types import ChoiceDelta, GenerationRequest, RequestOutput, TokenLogprob, Usage

Emit = Callable[[RequestOutput], None]


@dataclass
class CoreConfig:
    max_batch_size: int = 32  # state slots = the most sequences decoding at once
    prefill_budget: int = 512  # prompt tokens prefilled per iteration, over all requests
    state_cache_bytes: int = 256 << 20  # snapshot cache budget (0 disables prefix reuse)
    max_model_len: int = 0  # most tokens (prompt + output) a sequence may hold; 0 = unlimited (pure SSM models)


@dataclass
class _Request:
    req: GenerationRequest
    emit: Emit
    arrival: float
    seqs: list[Sequence] = field(default_factory=list)
    state: ModelState | None = None  # (one row) the prompt so far, while prefilling
    computed: int = 0  # prompt tokens already folded into `state`
    cached: int = 0  # of which restored from a snapshot
    last_logits: Tensor | None = None  # (V,) after the last computed prompt token
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    first_token_at: float | None = None


class EngineCore:
    def __init__(self, model: HybridLM, tokenizer: Tokenizer, cfg: CoreConfig, metrics=None) -> None:
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.device = model.embeddings.weight.device
        self.pool = StatePool(model, cfg.max_batch_size, self.device, cfg.max_model_len)
        self.cache = PrefixCache(cfg.state_cache_bytes)
        self.metrics = metrics
        self.waiting: deque[_Request] = deque()
        self.prefilling: list[_Request] = []
        self.requests: dict[str, _Request] = {}
        self.stop_ids = set(tokenizer.stop_token_ids)
        # Rows past the tokenizer's vocabulary (mamba_ssm pads 50277 -> 50280) are never sampled (pitfall 10).
        self.vocab = min(model.config.vocab_size, tokenizer.vocab_size)

    @property
    def running(self) -> list[Sequence]:
        """Decoding sequences, in pool row order."""
        return self.pool.rows

    # ---------------------------------------------------------------- requests in / out
    def add(self, req: GenerationRequest, emit: Emit) -> None:
        r = _Request(req, emit, time.perf_counter())
        self.requests[req.request_id] = r
        self.waiting.append(r)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is and free its slots at once."""
        r = self.requests.pop(request_id, None)
        if r is None:
            return
        if r in self.waiting:
            self.waiting.remove(r)
        if r in self.prefilling:
            self.prefilling.remove(r)
        for seq in r.seqs:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Give a sequence's pool row back, exactly once."""
        if seq.slot >= 0:
            self.pool.remove(seq)

    def fail_all(self, message: str) -> None:
        for request_id, r in list(self.requests.items()):
            self.abort(request_id)
            r.emit(RequestOutput(request_id, finished=True, error=message))

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    # ---------------------------------------------------------------- one iteration
    @torch.inference_mode()
    def step(self) -> None:
        self._admit()
        self._prefill()
        if self.running:
            self._decode()
        if self.metrics is not None:
            self.metrics.observe_core(self)

    def _admit(self) -> None:
        reserved = sum(r.req.params.n for r in self.prefilling)
        while self.waiting:
            r = self.waiting[0]
            p = r.req.params
            if self.pool.used + reserved + p.n > self.pool.size:
                return
            self.waiting.popleft()
            try:
                r.seqs = [Sequence.create(r.req.request_id, i, p, self.tokenizer, self.stop_ids) for i in range(p.n)]
            except (ValueError, RuntimeError, OverflowError) as e:  # this request's parameters, not the engine
                self.requests.pop(r.req.request_id, None)
                r.emit(RequestOutput(r.req.request_id, finished=True, error=f"invalid request: {e}"))
                continue
            reserved += p.n
            snap = None if p.prompt_logprobs else self.cache.lookup(r.req.prompt_ids)
            if snap is not None:
                r.state = snap.state
                r.computed = r.cached = len(snap.tokens)
                r.last_logits = snap.last_logits
            else:
                r.state = self.model.empty_state(1, self.device)
            if self.metrics is not None:
                self.metrics.observe_cache(snap is not None, r.cached)
            self.prefilling.append(r)

    def _prefill(self) -> None:
        budget = self.cfg.prefill_budget
        for r in list(self.prefilling):
            prompt = r.req.prompt_ids
            if r.computed < len(prompt):
                if budget <= 0:
                    break
                n = min(len(prompt) - r.computed, budget)
                self._prefill_chunk(r, prompt[r.computed : r.computed + n])
                budget -= n
            if r.computed == len(prompt):
                self.prefilling.remove(r)
                self._start_decoding(r)

    def _prefill_chunk(self, r: _Request, chunk: list[int]) -> None:
        tokens = torch.tensor([chunk], device=self.device)  # (1, n)
        want_all = r.req.params.prompt_logprobs
        logits, r.state = self.model.prefill(tokens, r.state, all_logits=want_all)
        if want_all:  # logprob of each prompt token given the tokens before it
            logits = logits[0, :, : self.vocab]  # (n, V)
            if r.last_logits is None:  # the first prompt token has no logprob
                r.prompt_logprobs.append(None)
                preds, targets = logits[:-1], chunk[1:]
            else:
                preds, targets = torch.cat([r.last_logits[None, : self.vocab], logits[:-1]]), chunk
            k = r.req.params.logprobs or 0
            r.prompt_logprobs += _logprobs(preds, torch.tensor(targets, device=self.device), k)
            r.last_logits = logits[-1]
        else:
            r.last_logits = logits[0]
        r.computed += len(chunk)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(chunk))

    def _start_decoding(self, r: _Request) -> None:
        """The prompt is in the state: snapshot it, fork it into n pool rows, sample the first tokens."""
        if r.cached < len(r.req.prompt_ids):
            self.cache.put(r.req.prompt_ids, r.state, r.last_logits)
        if r.req.params.prompt_logprobs:
            r.emit(RequestOutput(r.req.request_id, prompt_logprobs=r.prompt_logprobs))
        if r.req.params.max_tokens == 0:  # scoring only (echo + logprobs): done after the prompt
            for s in r.seqs:
                s.finish_reason = "length"
            self._emit(r, [ChoiceDelta(s.index, finish_reason="length") for s in r.seqs])
            return
        self.pool.add(r.seqs, r.state, len(r.req.prompt_ids))
        r.state = None
        logits = r.last_logits.unsqueeze(0).expand(len(r.seqs), -1)  # (n, V)
        self._sample_and_emit(list(r.seqs), logits)

    def _decode(self) -> None:
        seqs = list(self.running)  # row order
        tokens = torch.tensor([s.output_ids[-1] for s in seqs], device=self.device)  # (B,)
        t0 = time.perf_counter()
        rows = self.pool.view()
        logits, _ = self.model.decode(tokens, rows, out=rows)  # (B, V); the pool rows now hold the new state
        self.pool.advance()
        if self.metrics is not None:
            self.metrics.observe_decode(len(seqs), time.perf_counter() - t0)
        self._sample_and_emit(seqs, logits, from_decode=True)

    # ---------------------------------------------------------------- sampling and outputs
    def _sample_and_emit(self, seqs: list[Sequence], logits: Tensor, from_decode: bool = False) -> None:
        """Sample one token per sequence (seqs[i] <-> logits[i]), emit the deltas, retire finished sequences."""
        logits = logits[:, : self.vocab].float()  # (B, V)
        batch = self._sampling_batch(seqs, logits)
        chosen = sample(apply_penalties(logits, batch), batch).tolist()
        lps = self._chosen_logprobs(seqs, logits, chosen)
        by_request: dict[str, list[ChoiceDelta]] = {}
        finished = []
        for i, (seq, tok) in enumerate(zip(seqs, chosen)):
            by_request.setdefault(seq.request_id, []).append(seq.append(tok, lps[i]))
            if seq.finished:
                finished.append((i, seq))
        for i, seq in finished:
            if from_decode:  # its row summarises prompt + all outputs but the last: keep it for the next turn
                r = self.requests[seq.request_id]
                self.cache.put(r.req.prompt_ids + seq.output_ids[:-1], self.pool.row(seq.slot), logits[i])
            self._release(seq)
        for request_id, deltas in by_request.items():
            self._emit(self.requests[request_id], deltas)

    def _chosen_logprobs(self, seqs: list[Sequence], logits: Tensor, chosen: list[int]) -> list:
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(seqs)
        if rows:
            k = max(seqs[i].params.logprobs for i in rows)
            got = _logprobs(logits[rows], torch.tensor([chosen[i] for i in rows], device=logits.device), k)
            for i, lp in zip(rows, got):
                lp.top = lp.top[: seqs[i].params.logprobs]
                out[i] = lp
        return out

    def _sampling_batch(self, seqs: list[Sequence], logits: Tensor) -> SamplingBatch:
        dev = logits.device
        ps = [s.params for s in seqs]
        batch = SamplingBatch(
            temperature=torch.tensor([p.temperature for p in ps], device=dev),
            top_k=torch.tensor([min(p.top_k, self.vocab) for p in ps], device=dev),
            top_p=torch.tensor([p.top_p for p in ps], device=dev),
            generators=[s.generator for s in seqs],
        )
        if any(p.logit_bias for p in ps):
            batch.logit_bias = torch.zeros_like(logits)
            for i, p in enumerate(ps):
                for tok, bias in p.logit_bias.items():
                    if tok < self.vocab:
                        batch.logit_bias[i, tok] = bias
        if any(p.needs_penalties for p in ps):
            batch.token_counts = torch.zeros_like(logits)
            for i, s in enumerate(seqs):
                if s.output_ids:
                    ids = torch.tensor(s.output_ids, device=dev)
                    batch.token_counts[i].index_add_(0, ids, torch.ones(len(ids), device=dev))
            batch.presence_penalty = torch.tensor([p.presence_penalty for p in ps], device=dev)
            batch.frequency_penalty = torch.tensor([p.frequency_penalty for p in ps], device=dev)
        return batch

    def _emit(self, r: _Request, deltas: list[ChoiceDelta]) -> None:
        now = time.perf_counter()
        if r.first_token_at is None and any(d.token_ids or d.finish_reason for d in deltas):
            r.first_token_at = now
            if self.metrics is not None:
                self.metrics.ttft.observe(now - r.arrival)
        done = all(s.finished for s in r.seqs)
        out = RequestOutput(r.req.request_id, deltas=deltas, finished=done)
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(sum(len(d.token_ids) for d in deltas))
        if done:
            out.usage = Usage(len(r.req.prompt_ids), sum(len(s.output_ids) for s in r.seqs), r.cached)
            self.requests.pop(r.req.request_id, None)
        r.emit(out)


def _logprobs(logits: Tensor, targets: Tensor, k: int) -> list[TokenLogprob]:
    """Raw model log-probabilities (before temperature or penalties) of `targets`, with the top k."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = lp.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], lp[:, :0].long())
    return [
        TokenLogprob(int(t), c, list(zip(ids, vals)))
        for t, c, ids, vals in zip(targets.tolist(), chosen, top_i.tolist(), top_v.tolist())
    ]
