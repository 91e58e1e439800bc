"""The model runner: prefill and decode calls on the state pool, and the snapshots that let a later prompt
skip a prefix it has already seen. Every access to recurrent state goes through here and StatePool.

Glossary: B running sequences, V sampleable vocab.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from model import HybridLM
from model.sampling import upload

from .cuda_graphs import capture
from .prefix_cache import PrefixCache, Snapshot
from .scheduler import RequestState
from .sequence import Sequence
from .snapshot_store import SnapshotStore
from .state_pool import StatePool

log = logging.getLogger("aetheris.engine")


class StepTimer:
    """How long decode steps take. On CPU the call is the work; on CUDA the call only launches kernels, so the
    step is timed by CUDA events, read once the GPU has passed them (a later step), never waited for."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[int, object, object]] = []  # (batch, start event, end event), oldest first

    def time(self, batch: int, step, observe) -> Tensor:
        """Run `step()` and hand `observe(batch, seconds)` every step whose time is known by now."""
        if not self.cuda:
            t0 = time.perf_counter()
            out = step()
            observe(batch, time.perf_counter() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = step()
        end.record()
        self.pending.append((batch, start, end))
        while self.pending and self.pending[0][2].query():
            n, a, b = self.pending.pop(0)
            observe(n, a.elapsed_time(b) / 1000)
        return out


class ModelRunner:
    def __init__(self, model: HybridLM, cfg, vocab: int, metrics=None) -> None:
        """`cfg` is the engine's CoreConfig: slots, context limit, K/V blocks, snapshot budget."""
        self.model, self.vocab, self.metrics = model, vocab, metrics
        self.device = model.embeddings.weight.device
        self.pool = StatePool(
            model, cfg.max_batch_size, self.device, cfg.max_model_len, cfg.kv_blocks, cfg.kv_block_size
        )
        if model.compiled:
            self._warm_up()
        self.graphs = capture(model, self.pool, cfg.max_batch_size) if cfg.cuda_graphs else None
        self.cache = PrefixCache(cfg.state_cache_bytes)
        self.timer = StepTimer(self.device)
        if cfg.state_cache_dir:
            self._restore_pinned(SnapshotStore(cfg.state_cache_dir, model, cfg.model_id))

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Decode on the free rows at batch sizes 1, 2 and 3 and three attention extents, so that the compiled
        step's graphs are built before /health turns 200, not inside the first requests (dynamo compiles a
        batch of 1 apart, and turns a size dynamic once it has seen it change). The rows' state is overwritten
        when they are handed out, free rows' paged K/V lands in the scratch block, and the routing counts
        are reset."""
        pool, t0 = self.pool, time.perf_counter()
        unit = pool.paged.block_size if pool.paged else 1
        # Two extents make it dynamic; the whole capacity too, where the block table's view is its full width
        # (its row stride then equals its width, which dynamo guards on apart).
        extents = (
            sorted({min(x, pool.capacity) for x in (unit + 1, 2 * unit + 1, pool.capacity)}) if pool.grows else [None]
        )
        for b in range(1, min(3, pool.size) + 1):
            for tokens in extents:
                rows = pool.view(b, tokens)
                self.model.decode(torch.zeros(b, dtype=torch.long, device=self.device), rows, out=rows)
        for moe in self.model.moe_layers().values():
            moe.reset_stats()
        log.info("decode step warmed up in %.1f s", time.perf_counter() - t0)

    def _restore_pinned(self, store: SnapshotStore) -> None:
        """Load the pinned snapshots an earlier run saved, then save each new one as it is made."""
        snaps = store.load()
        for tokens, state, logits in snaps:
            self.cache.put(list(tokens), state, logits, pinned=True)
        self.cache.on_pin = store.save
        log.info("state cache: %d pinned snapshots restored from %s", len(snaps), store.dir)

    @property
    def running(self) -> list[Sequence]:
        """Decoding sequences, in pool row order."""
        return self.pool.rows

    def begin(self, r: RequestState) -> Snapshot | None:
        """Start a prompt from its longest cached prefix, or from the empty state. Prompt logprobs need every
        prompt position's logits, which a snapshot does not keep, so those requests start from scratch."""
        snap = None if r.req.params.prompt_logprobs else self.cache.lookup(r.req.prompt_ids, r.req.tenant)
        if snap is not None:
            r.state, r.last_logits, r.snapshot = snap.state, snap.last_logits, snap
            r.computed = r.cached = snap.length
        else:
            r.state = self.model.empty_state(1, self.device)
        if self.metrics is not None:
            self.metrics.observe_cache(snap is not None, r.cached)
        return snap

    def prefill(self, r: RequestState, chunk: list[int]) -> Tensor | None:
        """Fold `chunk` into the request's state. Returns the chunk's (n, V) logits when the request wants
        prompt logprobs, else None; r.last_logits always ends as the logits after the chunk."""
        tokens = torch.tensor([chunk], device=self.device)  # (1, n)
        want_all = r.req.params.prompt_logprobs
        logits, r.state = self.model.prefill(tokens, r.state, all_logits=want_all)
        every = logits[0, :, : self.vocab] if want_all else None
        r.last_logits = every[-1] if want_all else logits[0]
        r.computed += len(chunk)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(chunk))
        return every

    def start_decoding(self, r: RequestState) -> Tensor:
        """The prompt is in the state: snapshot it, fork it into one pool row per choice; returns the logits
        (n, V) the first tokens are sampled from."""
        self.snapshot_prompt(r)
        prompt = len(r.req.prompt_ids)
        self.pool.add(r.seqs, r.state, prompt, reserve=prompt + r.req.params.max_tokens)
        r.state = None
        return self._sampleable(r.last_logits.unsqueeze(0).expand(len(r.seqs), -1))

    def snapshot_prompt(self, r: RequestState) -> None:
        """Keep the state after the prompt computed so far (unless it came whole from the cache)."""
        if r.cached < r.computed:
            tokens = r.req.prompt_ids[: r.computed]
            pinned = r.computed <= r.req.pinned_prefix
            hint = r.snapshot
            r.snapshot = self.cache.put(tokens, r.state, r.last_logits, pinned, hint, r.req.tenant) or hint

    def decode(self) -> tuple[list[Sequence], Tensor]:
        """ONE batched step over every running sequence, in place on the pool's rows: (seqs, logits (B, V))."""
        seqs = list(self.running)  # row order
        ids = [s.output_ids[-1] for s in seqs]
        observe = self.metrics.observe_decode if self.metrics is not None else lambda batch, seconds: None
        logits = self.timer.time(len(seqs), lambda: self._step(ids), observe)
        self.pool.advance()
        return seqs, self._sampleable(logits)

    def _step(self, ids: list[int]) -> Tensor:
        if self.graphs is not None:
            if (logits := self.graphs.decode(ids)) is not None:
                return logits
            self.graphs = None  # a graph it needed could not be captured (logged): decode without from now on
        rows = self.pool.view()  # CPU, or a model a graph cannot serve
        tokens = upload(torch.tensor(ids), self.device)  # (B,)
        logits, _ = self.model.decode(tokens, rows, out=rows)  # the pool rows now hold the new state
        return logits

    def finish(self, seq: Sequence, tokens: list[int], logits: Tensor | None, ns: str = "") -> None:
        """Free a finished sequence's row. After a decode step (`logits` given) the row summarises `tokens`
        (prompt + all outputs but the last): keep it, where the next turn of a chat resumes."""
        if logits is not None and seq.slot >= 0:
            self.cache.put(tokens, self.pool.row(seq.slot), logits, ns=ns)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Give a sequence's pool row back, exactly once."""
        if seq.slot >= 0:
            self.pool.remove(seq)

    def _sampleable(self, logits: Tensor) -> Tensor:
        return logits[:, : self.vocab].float()
