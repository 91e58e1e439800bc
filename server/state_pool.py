"""Where recurrent state lives: the slot pool, and the snapshot cache for prefix reuse.

Glossary: S slots, nL layers, Di d_inner, K d_conv, N d_state, B a batch of slot ids.

StatePool  one preallocated ModelState with S rows (conv (nL, S, Di, K), ssm (nL, S, Di, N)); a sequence
           owns a slot while it runs. Every write to the pool goes through `write`.
PrefixCache  snapshots of single rows, keyed by the exact token prefix they summarise, in an LRU bounded
           by bytes. A prompt that extends a cached prefix restores the snapshot and prefills only the rest:
           a recurrent state cannot be truncated, so we keep states at the ends of prompts and of finished
           generations, where the next turn of a chat resumes (llama.cpp's context checkpoints, vLLM's
           hybrid prefix caching, at request granularity).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from model import HybridLM, ModelState


class StatePool:
    def __init__(self, model: HybridLM, slots: int, device: torch.device) -> None:
        self.state = model.empty_state(slots, device)
        self.free: list[int] = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.size = slots

    @property
    def used(self) -> int:
        return self.size - len(self.free)

    def allocate(self, n: int = 1) -> list[int] | None:
        if len(self.free) < n:
            return None
        return [self.free.pop() for _ in range(n)]

    def release(self, slots: list[int]) -> None:
        self.free.extend(slots)

    def read(self, slots: list[int]) -> ModelState:
        """A gathered copy of the rows `slots` (B = len(slots))."""
        return self.state.select(slots)

    def write(self, slots: list[int], state: ModelState) -> None:
        """The one place the pool is written: rows `slots` <- state's rows."""
        idx = torch.as_tensor(slots, device=self.state.conv.device)
        self.state.conv.index_copy_(1, idx, state.conv.to(self.state.conv.dtype))
        self.state.ssm.index_copy_(1, idx, state.ssm)

    def zero(self, slots: list[int]) -> None:
        idx = torch.as_tensor(slots, device=self.state.conv.device)
        self.state.conv.index_fill_(1, idx, 0)
        self.state.ssm.index_fill_(1, idx, 0)


def prefix_hashes(tokens: list[int]) -> list[int]:
    """h[i] identifies tokens[:i+1]: a hash chain, so every prefix is hashed in one pass."""
    out, h = [], 0
    for t in tokens:
        h = hash((h, t))
        out.append(h)
    return out


@dataclass
class Snapshot:
    tokens: tuple[int, ...]  # the exact prefix this state summarises (checked on a hit)
    state: ModelState  # one row
    last_logits: Tensor  # (V,) logits after the last token, so a full hit needs no recompute
    nbytes: int


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: OrderedDict[int, Snapshot] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def put(self, tokens: list[int], state: ModelState, last_logits: Tensor) -> None:
        if not tokens or self.budget <= 0:
            return
        key = prefix_hashes(tokens)[-1]
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        snap_state = ModelState(state.conv.clone(), state.ssm.clone())
        nbytes = sum(t.numel() * t.element_size() for t in (snap_state.conv, snap_state.ssm, last_logits))
        nbytes += 8 * len(tokens)
        if nbytes > self.budget:
            return
        self.entries[key] = Snapshot(tuple(tokens), snap_state, last_logits.clone(), nbytes)
        self.bytes += nbytes
        while self.bytes > self.budget:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes

    def lookup(self, tokens: list[int]) -> Snapshot | None:
        """The longest snapshot whose prefix the tokens start with (it may be all of them)."""
        hashes = prefix_hashes(tokens)
        for n in range(len(tokens), 0, -1):
            snap = self.entries.get(hashes[n - 1])
            if snap is not None and snap.tokens == tuple(tokens[:n]):
                self.entries.move_to_end(hashes[n - 1])
                self.hits += 1
                return snap
        self.misses += 1
        return None
