"""Prefix reuse: a radix tree of state snapshots keyed by the exact tokens they summarise.

Glossary: P a prompt's length in tokens, E an edge's tokens.

A recurrent layer's state cannot be truncated to a shorter prefix, so reuse keeps whole snapshots at the
places a later request is likely to branch: the end of each prompt and of each finished generation (the next
chat turn), the ends of chat messages inside a prompt (a shared system prompt, an edited last message), and
every --snapshot-interval tokens of a long prefill (a branch in the middle of a turn). A hybrid's snapshot
holds the fixed state and K/V only up to its own length.

The tree compresses runs of tokens into edges, so a lookup or an insert walks at most P tokens (tuple
compares, not per-token Python work): O(P) per request on the engine thread. A new prompt resumes from the
deepest snapshot on its path, whichever request made it. Memory is bounded in bytes; eviction takes the
least recently used snapshot among the leaves (snapshots with none below them) first, since an inner
snapshot serves every branch under it. Pinned snapshots (system prompts, when persisted) go last.

With --cache-isolation each tenant has a tree of its own (`ns`, a namespace), all under one byte budget: a
prompt can only resume from snapshots its own tenant made, so `cached_tokens` tells nothing about others.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import Tensor

from model import ModelState


@dataclass
class Snapshot:
    tokens: tuple[int, ...]  # the exact prefix this state summarises
    state: ModelState  # one row, exact length
    last_logits: Tensor  # (V,) logits after the last token, so a full hit needs no recompute
    nbytes: int
    pinned: bool = False


@dataclass(eq=False)
class _Node:
    edge: tuple[int, ...] = ()  # the tokens from the parent to this node
    parent: _Node | None = None
    children: dict[int, _Node] = field(default_factory=dict)  # first token of the child's edge -> child
    snap: Snapshot | None = None


class PrefixCache:
    def __init__(self, budget_bytes: int, on_pin=None) -> None:
        self.budget = budget_bytes
        self.on_pin = on_pin  # called with each newly pinned snapshot (SnapshotStore.save persists it)
        self.root = _Node()  # the shared namespace ""
        self.roots: dict[str, _Node] = {"": self.root}
        self.lru: OrderedDict[_Node, None] = OrderedDict()  # nodes holding a snapshot, least recent first
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def entries(self) -> int:
        return len(self.lru)

    # ---------------------------------------------------------------- lookup
    def _walk(self, tokens: list[int] | tuple[int, ...], ns: str = "") -> tuple[_Node, int, _Node | None, int]:
        """Follow `tokens` from the namespace's root: (last node reached exactly, tokens matched to it, the
        deepest node on the way holding a snapshot, its depth)."""
        return self._walk_from(self.roots.get(ns) or _Node(), tokens)

    @staticmethod
    def _walk_from(root: _Node, tokens) -> tuple[_Node, int, _Node | None, int]:
        node, depth, best, best_depth = root, 0, None, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None or tuple(tokens[depth : depth + len(child.edge)]) != child.edge:
                break
            node, depth = child, depth + len(child.edge)
            if node.snap is not None:
                best, best_depth = node, depth
        return node, depth, best, best_depth

    def match_length(self, tokens: list[int], ns: str = "") -> int:
        """How many leading tokens a lookup would restore (no statistics, no LRU touch)."""
        return self._walk(tokens, ns)[3]

    def lookup(self, tokens: list[int], ns: str = "") -> Snapshot | None:
        """The deepest snapshot whose tokens the prompt starts with (it may be all of them)."""
        _, _, best, _ = self._walk(tokens, ns)
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.lru.move_to_end(best)
        return best.snap

    # ---------------------------------------------------------------- insert
    def put(
        self, tokens: list[int], state: ModelState, last_logits: Tensor, pinned: bool = False, ns: str = ""
    ) -> bool:
        """Keep a copy of a one-row `state` summarising `tokens`; False when it does not fit the budget.
        Only the shared namespace's pinned snapshots persist (a tenant's prompt stays in memory)."""
        if not tokens or self.budget <= 0:
            return False
        pinned = pinned and ns == ""
        node = self._insert(tuple(tokens), self.roots.setdefault(ns, _Node()))
        if node.snap is not None:
            node.snap.pinned |= pinned
            self.lru.move_to_end(node)
            return True
        snap_state = state.trimmed(len(tokens))  # a copy; K/V only up to the prefix's length
        nbytes = snap_state.nbytes() + last_logits.numel() * last_logits.element_size() + 8 * len(tokens)
        if nbytes > self.budget:
            self._prune(node)
            return False
        node.snap = Snapshot(tuple(tokens), snap_state, last_logits.clone(), nbytes, pinned)
        self.lru[node] = None
        self.bytes += nbytes
        if pinned and self.on_pin is not None:
            self.on_pin(node.snap)
        while self.bytes > self.budget:
            self._evict_one(keep=node)
        return node.snap is not None

    def _insert(self, tokens: tuple[int, ...], root: _Node) -> _Node:
        """The node for exactly `tokens` under `root`, made by extending or splitting edges."""
        node, depth, _, _ = self._walk_from(root, tokens)
        if depth == len(tokens):
            return node
        child = node.children.get(tokens[depth])
        if child is not None:  # the edge diverges (or `tokens` ends) inside it: split it where they part
            common = 0
            rest = tokens[depth:]
            while common < min(len(child.edge), len(rest)) and child.edge[common] == rest[common]:
                common += 1
            mid = _Node(child.edge[:common], node)
            node.children[tokens[depth]] = mid
            child.edge, child.parent = child.edge[common:], mid
            mid.children[child.edge[0]] = child
            node, depth = mid, depth + common
            if depth == len(tokens):
                return node
        leaf = _Node(tokens[depth:], node)
        node.children[tokens[depth]] = leaf
        return leaf

    # ---------------------------------------------------------------- eviction
    def _evict_one(self, keep: _Node) -> None:
        """Drop one snapshot: the least recently used unpinned leaf, else the least recently used unpinned
        one, else the least recently used; never `keep` unless it is the only one."""
        order = [n for n in self.lru if n is not keep] or [keep]
        leaves = [n for n in order if not n.children]
        for pool in ([n for n in leaves if not n.snap.pinned], [n for n in order if not n.snap.pinned], order):
            if pool:
                victim = pool[0]
                break
        self.bytes -= victim.snap.nbytes
        victim.snap = None
        del self.lru[victim]
        self.evictions += 1
        self._prune(victim)

    def _prune(self, node: _Node) -> None:
        """Remove snapshot-less leaves upwards, and merge a snapshot-less node with its only child."""
        while node.parent is not None and node.snap is None and len(node.children) <= 1:
            parent = node.parent
            if node.children:  # one child: it takes this node's place, its edge extended
                (child,) = node.children.values()
                child.edge, child.parent = node.edge + child.edge, parent
                parent.children[node.edge[0]] = child
                return
            del parent.children[node.edge[0]]
            node = parent
        if node.parent is None and not node.children and node is not self.root:  # a tenant's tree is empty
            self.roots = {ns: root for ns, root in self.roots.items() if root is not node}

    def pinned(self) -> list[Snapshot]:
        return [n.snap for n in self.lru if n.snap.pinned]
