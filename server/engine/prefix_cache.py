"""Prefix reuse: a radix tree of state snapshots keyed by the exact tokens they summarise.

Glossary: P a prompt's length in tokens, E an edge's tokens.

A recurrent layer's state cannot be truncated to a shorter prefix, so reuse keeps whole snapshots at the
places a later request is likely to branch: the end of each prompt and of each finished generation (the next
chat turn), the ends of chat messages inside a prompt (a shared system prompt, an edited last message), and
every --snapshot-interval tokens of a long prefill (a branch in the middle of a turn). A hybrid's snapshot
holds the fixed state and K/V only up to its own length.

The tree compresses runs of tokens into edges, so a lookup walks at most P tokens (tuple compares, not
per-token Python work), and a request's successive snapshots each continue from the node of the one before
(`hint`): O(P) per request on the engine thread, however many snapshots its prompt makes. A snapshot keeps no
copy of its tokens; its node's path from the root spells them. A new prompt resumes from the
deepest snapshot on its path, whichever request made it. Memory is bounded in bytes; eviction takes the
least recently used snapshot among the leaves (snapshots with none below them) first, since an inner
snapshot serves every branch under it. Pinned snapshots (system prompts, when persisted) go last.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from torch import Tensor

from model import ModelState


@dataclass(eq=False)
class _Node:
    edge: tuple[int, ...] = ()  # the tokens from the parent to this node
    parent: _Node | None = None  # None for the root, and for a node no longer in the tree
    depth: int = 0  # tokens from the root to here (splits and merges keep it)
    children: dict[int, _Node] = field(default_factory=dict)  # first token of the child's edge -> child
    snap: Snapshot | None = None


@dataclass(eq=False)
class Snapshot:
    node: _Node  # where it sits in the tree: the path from the root spells its tokens
    state: ModelState  # one row, exact length
    last_logits: Tensor  # (V,) logits after the last token, so a full hit needs no recompute
    nbytes: int
    pinned: bool = False

    @property
    def length(self) -> int:
        return self.node.depth

    @property
    def tokens(self) -> tuple[int, ...]:
        """The exact prefix this state summarises (O(P): for persisting and tests, not the hot path)."""
        edges, node = [], self.node
        while node.parent is not None:
            edges.append(node.edge)
            node = node.parent
        return tuple(t for edge in reversed(edges) for t in edge)


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
    def _walk(self, tokens: list[int], node: _Node | None = None) -> tuple[_Node, _Node | None]:
        """Follow `tokens` from `node` (default: the root; else a node whose path `tokens` starts with): (last node
        reached exactly, the deepest node on the way holding a snapshot)."""
        node = node or self.root
        depth, best = node.depth, node if node.snap is not None else None
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None or tuple(tokens[depth : depth + len(child.edge)]) != child.edge:
                break
            node, depth = child, depth + len(child.edge)
            if node.snap is not None:
                best = node
        return node, best

    def match_length(self, tokens: list[int], ns: str = "") -> int:
        """How many leading tokens a lookup would restore (no statistics, no LRU touch)."""
        best = self._walk(tokens, self.roots.get(ns) or _Node())[1]
        return 0 if best is None else best.depth

    def lookup(self, tokens: list[int], ns: str = "") -> Snapshot | None:
        """The deepest snapshot of the namespace whose tokens the prompt starts with (it may be all of them)."""
        best = self._walk(tokens, self.roots.get(ns) or _Node())[1]
        if best is None:
            self.misses += 1
            return None
        self.hits += 1
        self.lru.move_to_end(best)
        return best.snap

    # ---------------------------------------------------------------- insert
    def put(
        self,
        tokens: list[int],
        state: ModelState,
        last_logits: Tensor,
        pinned: bool = False,
        hint: Snapshot | None = None,
        ns: str = "",
    ) -> Snapshot | None:
        """Keep a copy of a one-row `state` summarising `tokens` in namespace `ns`; returns the snapshot (None
        when it does not fit the budget). `hint`, an earlier snapshot of a prefix of `tokens` in the same
        namespace (the same request's last one), lets the insert walk only the tokens after it. Only the
        shared namespace's pinned snapshots persist (a tenant's prompt stays in memory)."""
        if not tokens or self.budget <= 0:
            return None
        pinned = pinned and ns == ""
        root = self.roots.setdefault(ns, _Node())
        start = hint.node if hint is not None and self._attached(hint.node, root) else root
        node = self._insert(tokens, start)
        if node.snap is not None:
            node.snap.pinned |= pinned
            self.lru.move_to_end(node)
            return node.snap
        snap_state = state.trimmed(len(tokens))  # a copy; K/V only up to the prefix's length
        nbytes = snap_state.nbytes() + last_logits.numel() * last_logits.element_size() + 8 * len(tokens)
        if nbytes > self.budget:
            self._prune(node)
            return None
        node.snap = snap = Snapshot(node, snap_state, last_logits.clone(), nbytes, pinned)
        self.lru[node] = None
        self.bytes += nbytes
        if pinned and self.on_pin is not None:
            self.on_pin(snap)
        while self.bytes > self.budget:
            self._evict_one(keep=node)
        return snap if node.snap is snap else None

    @staticmethod
    def _attached(node: _Node, root: _Node) -> bool:
        while node.parent is not None:
            node = node.parent
        return node is root

    def _insert(self, tokens: list[int], start: _Node) -> _Node:
        """The node for exactly `tokens`, made by extending or splitting edges below `start`."""
        node, _ = self._walk(tokens, start)
        depth = node.depth
        if depth == len(tokens):
            return node
        child = node.children.get(tokens[depth])
        if child is not None:  # the edge diverges (or `tokens` ends) inside it: split it where they part
            rest = tokens[depth : depth + len(child.edge)]
            common = next((i for i, (a, b) in enumerate(zip(child.edge, rest)) if a != b), len(rest))
            mid = _Node(child.edge[:common], node, depth + common)
            node.children[tokens[depth]] = mid
            child.edge, child.parent = child.edge[common:], mid
            mid.children[child.edge[0]] = child
            node, depth = mid, depth + common
            if depth == len(tokens):
                return node
        leaf = _Node(tuple(tokens[depth:]), node, len(tokens))
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
            node.parent = None  # out of the tree: a hint pointing here is stale
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
