"""Prometheus metrics (prometheus_client), in a registry of the app's own."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
EXPERTS_READ_S = 1.0  # the longest the expert-routing counters lag while sequences decode


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "aetheris_"
        self.running = Gauge(p + "requests_running", "Requests holding state slots", registry=r)
        self.waiting = Gauge(p + "requests_waiting", "Requests waiting for a slot", registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens prefilled (cache hits excluded)", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Arrival to first token", registry=r, buckets=LATENCY_BUCKETS
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Time between decode iterations", registry=r, buckets=LATENCY_BUCKETS
        )
        self.decode_step = Histogram(
            p + "decode_step_seconds", "Model time of one batched decode step", registry=r, buckets=LATENCY_BUCKETS
        )
        self.batch_size = Histogram(
            p + "batch_size", "Sequences per decode step", registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.slots_used = Gauge(p + "slots_used", "State slots in use", registry=r)
        self.slots_total = Gauge(p + "slots_total", "State slots preallocated", registry=r)
        self.cache_bytes = Gauge(p + "state_cache_bytes", "Bytes held by prefix state snapshots", registry=r)
        self.cache_entries = Gauge(p + "state_cache_entries", "Prefix state snapshots held", registry=r)
        self.cache_hits = Counter(p + "state_cache_hits", "Requests that resumed from a snapshot", registry=r)
        self.cache_misses = Counter(p + "state_cache_misses", "Requests with no usable snapshot", registry=r)
        self.cached_tokens = Counter(p + "cached_prompt_tokens", "Prompt tokens restored from snapshots", registry=r)
        self.cache_evictions = Counter(p + "state_cache_evictions", "Prefix state snapshots evicted", registry=r)
        self._evictions_seen = 0
        self.expert_tokens = Counter(
            p + "expert_tokens", "Token assignments per expert per MoE layer", ["layer", "expert"], registry=r
        )
        self.slot_bytes = Gauge(
            p + "slot_state_bytes",
            "Bytes of state one slot holds: kind=ssm fixed whatever the length (conv + SSM state), kind=kv the "
            "K/V cache at the context limit (attention layers only)",
            ["kind"],
            registry=r,
        )
        self.compiled = Gauge(
            p + "compiled", "1 when the torch.compile'd decode step and prefill scan serve", registry=r
        )
        self.max_model_len = Gauge(p + "max_model_len", "Context limit in tokens (0 = unlimited)", registry=r)
        self.kv_blocks_total = Gauge(p + "kv_blocks_total", "Paged K/V blocks preallocated", registry=r)
        self.kv_blocks_used = Gauge(p + "kv_blocks_used", "Paged K/V blocks held by running sequences", registry=r)
        self._last_decode_end: float | None = None
        self._experts_read = time.monotonic()

    def observe_layout(self, ssm_bytes: int, kv_bytes: int, max_model_len: int, kv_blocks: int) -> None:
        self.slot_bytes.labels("ssm").set(ssm_bytes)
        self.slot_bytes.labels("kv").set(kv_bytes)
        self.max_model_len.set(max_model_len)
        self.kv_blocks_total.set(kv_blocks)

    def observe_cache(self, hit: bool, cached_tokens: int) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()
        self.cached_tokens.inc(cached_tokens)

    def observe_decode(self, batch: int, seconds: float) -> None:
        self.batch_size.observe(batch)
        self.decode_step.observe(seconds)
        now = time.perf_counter()
        if self._last_decode_end is not None:
            self.itl.observe(now - self._last_decode_end)
        self._last_decode_end = now

    def observe_core(self, core) -> None:
        """Gauges after each scheduler iteration, and the MoE routing counts since they were last read."""
        sched = core.scheduler
        self.running.set(len({s.request_id for s in core.running} | {r.request_id for r in sched.prefilling}))
        self.waiting.set(len(sched.waiting))
        self.slots_used.set(core.pool.used)
        self.slots_total.set(core.pool.size)
        if core.pool.paged:
            self.kv_blocks_used.set(core.pool.paged.n_blocks - core.pool.free_blocks)
        self.cache_bytes.set(core.cache.bytes)
        self.cache_entries.set(core.cache.entries)
        self.cache_evictions.inc(core.cache.evictions - self._evictions_seen)
        self._evictions_seen = core.cache.evictions
        if not core.running:
            self._last_decode_end = None
        # Reading the routing counts waits for the device: once a second while sequences decode, and when they stop.
        now = time.monotonic()
        if not core.running or now - self._experts_read >= EXPERTS_READ_S:
            self._experts_read = now
            self._read_expert_counts(core.model)

    def _read_expert_counts(self, model) -> None:
        for layer, moe in model.moe_layers().items():
            counts = moe.expert_counts.tolist()
            for e, c in enumerate(counts):
                if c:
                    self.expert_tokens.labels(str(layer), str(e)).inc(c)
            moe.reset_stats()
