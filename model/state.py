"""Per-sequence model state as data: each mixer declares what it keeps, one container holds it for a batch.

Glossary: nL layers, B batch (or pool slots), T token capacity of a growing state (K/V), S the per-sequence
shape a mixer declares.

A mixer declares its state with `state_spec() -> {name: StateSpec}`:
    Mamba-1    conv (Di, K) in the weight dtype, ssm (Di, N) fp32: fixed size whatever the length;
    attention  k, v (nKV, T, hd) growing along T (`seq_axis`), len () int64: the tokens held so far.
`ModelState` is one dict of tensors per layer, each (B, *S). Everything that moves state around (the engine's
pool, forks, prefix snapshots, byte accounting) goes through the generic operations below and never names a
tensor: a new mixer only declares its spec.

Growing tensors come in two sizes. A state made during prefill or kept as a snapshot is exact: its T is the
number of tokens it holds. A pool row has a fixed capacity T (the engine's context limit) and only the first
`len` positions are meaningful; copies between the two move just those positions.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StateSpec:
    shape: tuple[int, ...]  # per sequence, without the batch axis; a growing axis holds 0 here
    dtype: torch.dtype | None = None  # None: the model's weight dtype
    seq_axis: int | None = None  # the axis of `shape` that grows with the tokens (K/V), else None

    def zeros(self, batch: int, capacity: int, device, dtype: torch.dtype) -> Tensor:
        shape = list(self.shape)
        if self.seq_axis is not None:
            shape[self.seq_axis] = capacity
        return untouched_zeros((batch, *shape), self.dtype or dtype, device)


def untouched_zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """Zeros whose memory is committed only where written: on CPU an anonymous mapping, whose pages the kernel
    hands out zeroed on first touch. A state pool sized for --max-batch-size slots, or a K/V cache sized for the
    longest context, then costs the sequences and tokens it holds, not its size (torch.zeros writes every page
    at once: 32 slots of a Granite 4.0-H-tiny-size model's SSM state are 1.8 GiB)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if torch.device(device).type != "cpu" or nbytes < 1 << 20:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8).view(dtype).view(shape)


Specs = list[dict[str, StateSpec]]  # one dict per layer


class ModelState:
    """The state of B sequences: `layers[i][name]` is a (B, *S) tensor. Growing tensors have their position
    axis at 1 + spec.seq_axis."""

    def __init__(self, specs: Specs, layers: list[dict[str, Tensor]]) -> None:
        self.specs, self.layers = specs, layers

    @classmethod
    def zeros(cls, specs: Specs, batch: int, device=None, dtype=torch.float32, capacity: int = 0) -> ModelState:
        layers = [{k: s.zeros(batch, capacity, device, dtype) for k, s in spec.items()} for spec in specs]
        return cls(specs, layers)

    # ---------------------------------------------------------------- iteration
    def items(self) -> Iterator[tuple[StateSpec, Tensor, int]]:
        """(spec, tensor, layer index) for every tensor."""
        for i, (spec, layer) in enumerate(zip(self.specs, self.layers)):
            for name, t in layer.items():
                yield spec[name], t, i

    def map(self, fn: Callable[[StateSpec, Tensor], Tensor]) -> ModelState:
        layers = [{k: fn(spec[k], t) for k, t in layer.items()} for spec, layer in zip(self.specs, self.layers)]
        return ModelState(self.specs, layers)

    @property
    def batch(self) -> int:
        return next(t for _, t, _ in self.items()).shape[0]

    # ---------------------------------------------------------------- rows
    def rows(self, rows: slice | Tensor | list[int]) -> ModelState:
        """The given rows: a view for a slice, a copy for a list or tensor of indices."""
        if isinstance(rows, slice):
            return self.map(lambda s, t: t[rows])
        idx = torch.as_tensor(rows, device=next(t for _, t, _ in self.items()).device)
        return self.map(lambda s, t: t.index_select(0, idx))

    def clone(self) -> ModelState:
        return self.map(lambda s, t: t.clone())

    def narrowed(self, tokens: int) -> ModelState:
        """A view whose growing tensors show only their first `tokens` positions."""
        return self.map(lambda s, t: _narrow(s, t, tokens))

    def trimmed(self, tokens: int) -> ModelState:
        """A copy whose growing tensors hold exactly the first `tokens` positions (what a snapshot keeps)."""
        return self.narrowed(tokens).clone()

    def with_capacity(self, capacity: int) -> ModelState:
        """A copy whose growing tensors have room for `capacity` positions (the first ones kept)."""

        def grow(s: StateSpec, t: Tensor) -> Tensor:
            if s.seq_axis is None:
                return t.clone()
            out = s.zeros(t.shape[0], capacity, t.device, t.dtype)
            _narrow(s, out, min(capacity, t.shape[1 + s.seq_axis])).copy_(_narrow(s, t, capacity))
            return out

        return self.map(grow)

    def copy_rows_(self, dst: slice | int, src: ModelState, tokens: int | None = None) -> None:
        """Write `src` into rows `dst` of this state (a one-row src broadcasts over them). Growing tensors copy
        their first positions: as many as both hold, and at most `tokens` (a pool row without room for K/V, as
        a paged pool's, gets none)."""
        for (spec, d, _), (_, s, _) in zip(self.items(), src.items()):
            d = d[dst : dst + 1] if isinstance(dst, int) else d[dst]
            if spec.seq_axis is not None:
                axis = 1 + spec.seq_axis
                n = min(s.shape[axis], d.shape[axis], s.shape[axis] if tokens is None else tokens)
                d, s = d.narrow(axis, 0, n), s.narrow(axis, 0, n)
            d.copy_(s.to(d.dtype))

    # ---------------------------------------------------------------- accounting
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t, _ in self.items())

    def bytes_per_sequence(self, tokens: int = 0) -> dict[str, int]:
        """Bytes one sequence holding `tokens` tokens needs: {'fixed': recurrent state, 'growing': K/V}."""
        out = {"fixed": 0, "growing": 0}
        for spec, t, _ in self.items():
            per_position = math.prod(n for i, n in enumerate(spec.shape) if i != spec.seq_axis) * t.element_size()
            out["fixed" if spec.seq_axis is None else "growing"] += per_position * (
                1 if spec.seq_axis is None else tokens
            )
        return out


def _narrow(spec: StateSpec, t: Tensor, tokens: int) -> Tensor:
    """The first `tokens` positions of a growing tensor (all of a fixed one)."""
    if spec.seq_axis is None:
        return t
    return t.narrow(1 + spec.seq_axis, 0, min(tokens, t.shape[1 + spec.seq_axis]))
