"""The fixed-size recurrent state of a batch of sequences.

Glossary: nL Mamba layers, B batch (or pool slots), Di d_inner, K d_conv, N d_state.

A sequence's whole memory of its past is one row of these two tensors, whatever its length: there is no
cache that grows. An engine preallocates a `ModelState` with one row per slot (a pool) and gathers or
writes rows by slot id; the model only ever sees the gathered batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ModelState:
    conv: Tensor  # (nL, B, Di, K) last K pre-conv inputs per layer, in the model dtype
    ssm: Tensor  # (nL, B, Di, N) SSM state h per layer, always fp32

    @classmethod
    def zeros(
        cls,
        n_layers: int,
        batch: int,
        d_inner: int,
        d_conv: int,
        d_state: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> ModelState:
        conv = torch.zeros(n_layers, batch, d_inner, d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(n_layers, batch, d_inner, d_state, device=device, dtype=torch.float32)
        return cls(conv, ssm)

    @property
    def batch(self) -> int:
        return self.conv.shape[1]

    def select(self, rows: Tensor | list[int]) -> ModelState:
        """A copy of the given rows (B' = len(rows))."""
        rows = torch.as_tensor(rows, device=self.conv.device)
        return ModelState(self.conv.index_select(1, rows), self.ssm.index_select(1, rows))

    def bytes_per_sequence(self) -> int:
        per_row = lambda t: t[:, 0].numel() * t.element_size()  # noqa: E731
        return per_row(self.conv) + per_row(self.ssm)
