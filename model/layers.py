"""Small building blocks: RMSNorm and the dense SwiGLU and relu² feed-forwards.

Glossary: T tokens (any leading dims), D d_model, F feed-forward hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (Zhang & Sennrich 2019; HF MambaRMSNorm / JambaRMSNorm).

    As in HF: normalised in fp32, cast back to the input dtype, then scaled. Callers choose the input dtype:
    blocks cast the fp32 residual to the weight dtype first (HF MambaBlock), the final norm does not.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., D)
        return self.weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020), bias-free: Jamba's `JambaMLP` names and shapes."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)  # (F, D)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)  # (F, D)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)  # (D, F)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (T, D)


class Relu2MLP(nn.Module):
    """down(relu(up(x))^2), bias-free and not gated: Nemotron-H's `NemotronHMLP` names and shapes."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)  # (F, D)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)  # (D, F)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())  # (T, D)
