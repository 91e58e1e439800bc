"""Paged storage for the growing part of the state (attention K/V): fixed-size blocks from one preallocated pool.

Glossary: S slots, nB blocks in the pool, bs tokens per block, mB most blocks one slot can hold, T tokens.

A slot's K/V lives in the blocks its row of the block table lists, in order: token t of the slot is at
position t % bs of block table[slot, t // bs]. So K/V memory follows the tokens sequences actually hold
(bounded by --kv-cache-mb), not slots x context. Blocks are reserved when a sequence enters the pool, for its
prompt plus max_tokens: a running sequence never runs out, and admission waits while too few are free
(reservation, not vLLM's preempt-and-recompute: a recurrent layer's state cannot be rolled back cheaply).

Each growing tensor a mixer declares (StateSpec with a seq_axis, per-sequence shape (..., T, ...)) is stored as
(nB, ..., bs, ...): the declared shape with the seq axis cut to one block. The mixer reads it through the
`block_table` entry added to its layer's state (model/attention.py); everything else goes through `write` and
`read`, which convert between the paged layout and a one-row state of exact length.

One block past the n_blocks usable ones is scratch: every table entry a sequence does not own points at it,
so the rows of a padded decode step (a CUDA graph's, past the running ones) write there and nowhere else.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from model import HybridLM, ModelState


class PagedKV:
    def __init__(self, model: HybridLM, n_blocks: int, block_size: int, slots: int, max_tokens: int, device) -> None:
        dtype = model.embeddings.weight.dtype
        self.specs = model.state_specs()
        self.block_size, self.n_blocks = block_size, n_blocks
        # per layer: {name: (nB, ..., bs, ...)} for its growing tensors
        self.layers = [
            {k: s.zeros(n_blocks + 1, block_size, device, dtype) for k, s in spec.items() if s.seq_axis is not None}
            for spec in self.specs
        ]  # fmt: skip
        self.scratch = n_blocks
        self.table = torch.full((slots, math.ceil(max_tokens / block_size)), n_blocks, dtype=torch.long, device=device)
        self.owned: list[list[int]] = [[] for _ in range(slots)]
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # a stack: low ids first

    @staticmethod
    def block_bytes(model: HybridLM, block_size: int) -> int:
        return model.empty_state(1, "meta").bytes_per_sequence(block_size)["growing"]

    def blocks_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self.free)

    # ---------------------------------------------------------------- slots
    def allocate(self, slot: int, tokens: int) -> None:
        """Give `slot` blocks for `tokens` tokens (its prompt plus what it may generate)."""
        n = self.blocks_for(tokens)
        if n > len(self.free) or n > self.table.shape[1]:
            raise RuntimeError(f"K/V cache: {n} blocks needed, {len(self.free)} free")
        self.owned[slot] = [self.free.pop() for _ in range(n)]
        self.table[slot, :n] = torch.tensor(self.owned[slot], device=self.table.device)

    def release(self, slot: int) -> None:
        self.free.extend(reversed(self.owned[slot]))
        self.owned[slot] = []
        self.table[slot] = self.scratch

    def move(self, dst: int, src: int) -> None:
        """The sequence in `src` now lives in row `dst`: only its table row moves, never its K/V."""
        self.table[dst] = self.table[src]
        self.table[src] = self.scratch
        self.owned[dst], self.owned[src] = self.owned[src], []

    # ---------------------------------------------------------------- contents
    def write(self, slot: int, state: ModelState, tokens: int) -> None:
        """Scatter the first `tokens` positions of a one-row state's growing tensors into the slot's blocks."""
        nb = self.blocks_for(tokens)
        blocks = self.table[slot, :nb]
        for i, pages in enumerate(self.layers):
            for name, paged in pages.items():
                axis = self.specs[i][name].seq_axis
                src = state.layers[i][name][0].narrow(axis, 0, tokens)  # (..., tokens, ...)
                pad = [0, 0] * (src.dim() - 1 - axis) + [0, nb * self.block_size - tokens]
                src = torch.nn.functional.pad(src, pad).unflatten(axis, (nb, self.block_size))  # (.., nb, bs, ..)
                paged[blocks] = src.movedim(axis, 0).to(paged.dtype)  # (nb, ..., bs, ...)

    def read(self, slot: int, tokens: int) -> list[dict[str, Tensor]]:
        """The slot's growing tensors as exact one-row tensors of `tokens` positions (copies)."""
        blocks = self.table[slot, : self.blocks_for(tokens)]
        out = []
        for i, pages in enumerate(self.layers):
            layer = {}
            for name, paged in pages.items():
                axis = self.specs[i][name].seq_axis
                t = paged[blocks].movedim(0, axis).flatten(axis, axis + 1)  # (..., nb * bs, ...)
                layer[name] = t.narrow(axis, 0, tokens).unsqueeze(0)  # (1, ..., tokens, ...)
            out.append(layer)
        return out

    def view_layers(self, n: int, tokens: int) -> list[dict[str, Tensor]]:
        """What the first n rows' decode step reads for each layer: the paged tensors and the table's blocks
        for `tokens` positions (a view: the table's own memory)."""
        table = self.table[:n, : self.blocks_for(tokens)]
        return [{**pages, "block_table": table} if pages else {} for pages in self.layers]
