"""PrefixCache: longest-prefix lookup, LRU eviction by bytes, and copies that outlive the pool row."""

from __future__ import annotations

import torch

from model import HybridLM
from server.state_pool import PrefixCache
from tests.helpers import tiny_config


def _state(model: HybridLM, fill: float):
    state = model.empty_state(1)
    for t in vars(state).values():
        if isinstance(t, torch.Tensor):
            t.fill_(fill)
    return state


def _snapshot_bytes(model: HybridLM, n_tokens: int) -> int:
    probe = PrefixCache(1 << 30)
    probe.put(list(range(n_tokens)), model.empty_state(1), torch.zeros(10))
    return probe.bytes


def test_longest_prefix_wins_and_mismatches_miss():
    model = HybridLM(tiny_config())
    cache = PrefixCache(1 << 20)
    cache.put([1, 2], _state(model, 2.0), torch.zeros(10))
    cache.put([1, 2, 3, 4], _state(model, 4.0), torch.ones(10))
    assert cache.lookup([1, 2, 3, 4, 5]).tokens == (1, 2, 3, 4)
    assert cache.lookup([1, 2, 3]).tokens == (1, 2)
    assert cache.lookup([2, 1]) is None and (cache.hits, cache.misses) == (2, 1)


def test_eviction_is_least_recently_used_within_the_byte_budget():
    model = HybridLM(tiny_config())
    size = _snapshot_bytes(model, 2)
    cache = PrefixCache(2 * size)  # room for two snapshots of two tokens
    cache.put([1, 1], _state(model, 1.0), torch.zeros(10))
    cache.put([2, 2], _state(model, 2.0), torch.zeros(10))
    assert cache.lookup([1, 1]) is not None  # [1, 1] is now the most recently used
    cache.put([3, 3], _state(model, 3.0), torch.zeros(10))
    assert cache.lookup([2, 2]) is None  # the least recently used went
    assert cache.lookup([1, 1]) is not None and cache.lookup([3, 3]) is not None
    assert len(cache.entries) == 2 and cache.bytes == 2 * size


def test_snapshots_are_copies_and_oversized_ones_are_skipped():
    model = HybridLM(tiny_config())
    state = _state(model, 5.0)
    cache = PrefixCache(1 << 20)
    cache.put([7], state, torch.zeros(10))
    for t in vars(state).values():
        if isinstance(t, torch.Tensor):
            t.fill_(0.0)  # the pool row changes after the snapshot
    snap = cache.lookup([7])
    assert all(bool((t == 5.0).all()) for t in vars(snap.state).values() if isinstance(t, torch.Tensor))
    tiny_budget = PrefixCache(_snapshot_bytes(model, 1) - 1)
    tiny_budget.put([7], state, torch.zeros(10))
    assert not tiny_budget.entries and tiny_budget.bytes == 0
