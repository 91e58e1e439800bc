"""Where per-sequence state lives while sequences decode: the slot pool.

Glossary: S slots, T token capacity of a slot's growing state (K/V), B a batch of slot ids.

StatePool  one preallocated ModelState with S rows (each layer's tensors as its mixer declares them, growing
           ones with room for T tokens); a running sequence owns a row. Rows change only through `add`,
           `remove` and the decode step's in-place write. The pool never names a tensor: it moves rows through
           ModelState's generic operations.
"""

from __future__ import annotations

import torch

from model import HybridLM, ModelState

from .kv_blocks import PagedKV


class StatePool:
    """S preallocated rows of state. The n running sequences always occupy rows [0, n): a decode step works on a
    view of the pool and writes the new state back in place, with no gather or scatter. When a sequence
    leaves, the last row moves into its place (one row copied, once per sequence).

    Growing state (attention K/V) is paged when `kv_blocks` > 0 (kv_blocks.py: memory follows the tokens held,
    blocks reserved on entry for prompt + max_tokens); with kv_blocks = 0 each row has a contiguous cache of
    `capacity` tokens, the simple reference layout."""

    def __init__(
        self, model: HybridLM, slots: int, device: torch.device, capacity: int = 0, kv_blocks: int = 0, block_size=16
    ) -> None:
        self.grows = any(s.seq_axis is not None for spec in model.state_specs() for s in spec.values())
        self.paged = (
            PagedKV(model, kv_blocks, block_size, slots, capacity, device) if self.grows and kv_blocks else None
        )
        self.state = model.empty_state(slots, device, 0 if self.paged else capacity)
        self.size, self.capacity = slots, capacity
        # The smallest extent a view shows: two positions, or two K/V blocks. Dynamo compiles a dimension of
        # size 1 apart from the others, so a step that never meets one needs one graph fewer.
        self.least_extent = min((self.paged.block_size if self.paged else 1) + 1, capacity)
        self.rows: list = []  # the sequence in each occupied row, in row order
        self.held: list[int] = []  # tokens each row's state holds (the positions a move copies)

    @property
    def used(self) -> int:
        return len(self.rows)

    def blocks_needed(self, tokens: int, n: int = 1) -> int:
        """K/V blocks n sequences of up to `tokens` tokens reserve (0 when nothing is paged)."""
        return n * self.paged.blocks_for(tokens) if self.paged else 0

    @property
    def free_blocks(self) -> int:
        return self.paged.free_blocks if self.paged else 0

    def view(self, n: int | None = None, tokens: int | None = None) -> ModelState:
        """Rows [0, n) (default: the running ones) as a view: what decode reads and writes, in place. Growing
        state shows `tokens` positions (default: the longest row's after this step), so the step's shapes come
        from here and not from lengths read back from the device; paged layers carry their block pool and
        the first blocks of the table instead of per-row tensors."""
        n = len(self.rows) if n is None else n
        tokens = max(max(self.held, default=0) + 1 if tokens is None else tokens, self.least_extent)
        if not self.paged:
            return self.state.rows(slice(0, n)).narrowed(tokens)
        rows = self.state.rows(slice(0, n))
        rows.layers = [{**fixed, **paged} for fixed, paged in zip(rows.layers, self.paged.view_layers(n, tokens))]
        return rows

    def row(self, slot: int) -> ModelState:
        """One row (B = 1) holding exactly its tokens: a view of fixed tensors (copy it before the pool changes,
        as PrefixCache.put does) and, when paged, copies of its K/V."""
        row = self.state.rows(slice(slot, slot + 1))
        if self.paged:
            row.layers = [{**f, **g} for f, g in zip(row.layers, self.paged.read(slot, self.held[slot]))]
        return row

    def add(self, seqs: list, state: ModelState, tokens: int, reserve: int = 0) -> None:
        """Append sequences as new rows, each starting from the one-row `state` that holds `tokens` tokens
        (n > 1 forks it); paged K/V gets blocks for `reserve` tokens per sequence."""
        start, k = len(self.rows), len(seqs)
        if start + k > self.size:
            raise RuntimeError(f"state pool full: {start} + {k} > {self.size} rows")
        if self.blocks_needed(max(reserve, tokens), k) > self.free_blocks:
            raise RuntimeError(f"K/V cache full: {k} sequences of {reserve} tokens do not fit")
        # Broadcasts over the k rows; paged K/V goes to blocks below instead (the rows have no room for it).
        self.state.copy_rows_(slice(start, start + k), state, tokens)
        for i, seq in enumerate(seqs):
            seq.slot = start + i
            if self.paged:
                self.paged.allocate(seq.slot, max(reserve, tokens))
                self.paged.write(seq.slot, state, tokens)
            self.rows.append(seq)
            self.held.append(tokens)

    def advance(self) -> None:
        """Every running row took one more token (a decode step)."""
        self.held = [n + 1 for n in self.held]

    def remove(self, seq) -> None:
        """Free a sequence's row, moving the last row into it to keep [0, n) dense."""
        slot, last = seq.slot, len(self.rows) - 1
        if self.paged:
            self.paged.release(slot)
        if slot != last:
            self.state.copy_rows_(slot, self.state.rows(slice(last, last + 1)), self.held[last])
            if self.paged:
                self.paged.move(slot, last)
            moved = self.rows[last]
            moved.slot = slot
            self.rows[slot], self.held[slot] = moved, self.held[last]
        self.rows.pop()
        self.held.pop()
        seq.slot = -1
