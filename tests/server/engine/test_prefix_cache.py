"""PrefixCache: the radix tree of state snapshots. Deepest-prefix lookup whoever made the snapshot, edges split
and merged, LRU eviction by bytes that prefers leaves and keeps pinned snapshots longest, copies that outlive
the pool row."""

from __future__ import annotations

import torch

from model import HybridLM
from server.engine.prefix_cache import PrefixCache
from tests.helpers import tiny_config


def _state(model: HybridLM, fill: float):
    state = model.empty_state(1)
    for _, t, _ in state.items():
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
    assert cache.entries == 2 and cache.bytes == 2 * size


def test_snapshots_are_copies_and_oversized_ones_are_skipped():
    model = HybridLM(tiny_config())
    state = _state(model, 5.0)
    cache = PrefixCache(1 << 20)
    cache.put([7], state, torch.zeros(10))
    for _, t, _ in state.items():
        t.fill_(0.0)  # the pool row changes after the snapshot
    snap = cache.lookup([7])
    tensors = [t for _, t, _ in snap.state.items()]
    assert tensors and all(bool((t == 5.0).all()) for t in tensors)
    tiny_budget = PrefixCache(_snapshot_bytes(model, 1) - 1)
    tiny_budget.put([7], state, torch.zeros(10))
    assert not tiny_budget.entries and tiny_budget.bytes == 0


def test_deepest_snapshot_on_the_path_wins_across_branches():
    model = HybridLM(tiny_config())
    cache = PrefixCache(1 << 20)
    system = list(range(100, 140))
    cache.put(system, _state(model, 1.0), torch.zeros(10))  # end of a shared system prompt
    cache.put(system + [1, 2, 3], _state(model, 2.0), torch.zeros(10))  # user A's prompt
    cache.put(system + [7, 8], _state(model, 3.0), torch.zeros(10))  # user B's prompt: splits the edge
    assert cache.lookup(system + [7, 8, 9]).tokens == tuple(system + [7, 8])
    assert cache.lookup(system + [1, 2, 4]).tokens == tuple(system)  # diverges inside A's edge
    assert cache.lookup(system[:-1]) is None  # shorter than any snapshot
    assert cache.match_length(system + [1, 2, 3, 4]) == len(system) + 3
    assert cache.entries == 3 and (cache.hits, cache.misses) == (2, 1)


def test_eviction_prefers_leaves_and_keeps_pinned_longest():
    model = HybridLM(tiny_config())
    size = _snapshot_bytes(model, 3)
    cache = PrefixCache(3 * size + size // 2)  # room for three three-token snapshots
    cache.put([1, 2, 3], _state(model, 1.0), torch.zeros(10), pinned=True)
    cache.put([1, 2, 4], _state(model, 2.0), torch.zeros(10))
    cache.put([5, 6, 7], _state(model, 3.0), torch.zeros(10))
    cache.lookup([1, 2, 3])
    cache.lookup([1, 2, 4])
    cache.put([5, 6, 8], _state(model, 4.0), torch.zeros(10))  # over budget: the LRU unpinned leaf is [5, 6, 7]
    assert cache.lookup([5, 6, 7]) is None and cache.evictions == 1
    cache.put([9, 9, 9], _state(model, 5.0), torch.zeros(10))  # [1, 2, 3] is older but pinned: [1, 2, 4] goes
    assert cache.lookup([1, 2, 4]) is None and cache.lookup([1, 2, 3]) is not None
    assert [s.tokens for s in cache.pinned()] == [(1, 2, 3)]


def test_inner_snapshot_outlives_its_leaves_and_the_tree_is_pruned():
    model = HybridLM(tiny_config())
    size = _snapshot_bytes(model, 4)
    cache = PrefixCache(2 * size + size // 2)
    cache.put([1, 2], _state(model, 1.0), torch.zeros(10))  # inner: a prefix of the next two
    cache.put([1, 2, 3, 4], _state(model, 2.0), torch.zeros(10))
    cache.lookup([1, 2])  # the inner one is now the most recent; still a leaf goes first
    cache.put([1, 2, 5, 6], _state(model, 3.0), torch.zeros(10))
    assert cache.lookup([1, 2, 3, 4]).tokens == (1, 2)  # its leaf went, the inner one stayed
    assert set(cache.root.children) == {1}
    node = cache.root.children[1]
    assert node.edge == (1, 2) and set(node.children) == {5}  # the evicted branch is gone from the tree


def test_random_inserts_evictions_and_hints_agree_with_brute_force():
    """Random prompts over a 3-token alphabet (so edges split and merge all the time), each inserted as a chain
    of snapshots with hints, under a budget that evicts: every lookup equals the longest stored prefix."""
    import random

    model = HybridLM(tiny_config())
    state = _state(model, 1.0)
    rng = random.Random(0)
    size = _snapshot_bytes(model, 1) - 8  # bytes of a snapshot besides its 8 bytes per token
    for trial in range(30):
        cache = PrefixCache(budget_bytes=12 * size + 8 * 200)
        for _ in range(25):
            prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
            hint = None
            for end in sorted(rng.sample(range(1, len(prompt) + 1), k=min(3, len(prompt)))):
                hint = cache.put(prompt[:end], state, torch.zeros(10), hint=hint) or hint
            stored = {n.snap.tokens for n in cache.lru}
            query = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
            want = max((len(s) for s in stored if tuple(query[: len(s)]) == s), default=0)
            assert cache.match_length(query) == want, (trial, query)
            assert cache.bytes == sum(n.snap.nbytes for n in cache.lru) <= cache.budget
        assert cache.evictions > 0
