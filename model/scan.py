"""Selective scan (Mamba-1, Gu & Dao 2023, Algorithm 2) on plain PyTorch.

Glossary: B batch, L length, Di d_inner, N d_state.

The recurrence, per channel d and state index n:
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t        (zero-order hold for A, Euler for B; §2)
    y_t = <h_t, C_t> + D * x_t
All of it runs in fp32 whatever the weight dtype: the state accumulates over thousands of steps.

Two implementations, held equal by tests/test_scan.py:
  * `selective_scan_ref`: the textbook loop. It materialises exp(delta*A) and delta*B*x for the whole
    sequence, O(B*L*Di*N) memory, and is what autograd differentiates in training. The loop iterates over
    `unbind(1)` slices: indexing `t` inside the loop makes the backward pass quadratic in L
    (shared/reference/model.md §4).
  * `selective_scan_fused`: inference only. It discretises one step at a time inside the loop so memory
    stays O(B*Di*N) for any prompt length: the prefill path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def selective_scan_ref(
    x: Tensor, delta: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """x, delta: (B, L, Di); A: (Di, N); B_ssm, C_ssm: (B, L, N); D: (Di,); h0: (B, Di, N).

    Returns y (B, L, Di) and the last state h_L (B, Di, N), all fp32.
    """
    dA = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, Di, N)
    dBx = (delta * x).unsqueeze(-1) * B_ssm.unsqueeze(2)  # (B, L, Di, N)
    h = h0
    ys = []
    for dA_t, dBx_t, C_t in zip(dA.unbind(1), dBx.unbind(1), C_ssm.unbind(1)):
        h = dA_t * h + dBx_t  # (B, Di, N)
        ys.append(torch.bmm(h, C_t.unsqueeze(-1)).squeeze(-1))  # (B, Di)
    y = torch.stack(ys, dim=1) + x * D  # (B, L, Di)
    return y, h


@torch.no_grad()
def selective_scan_fused(
    x: Tensor, delta: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as `selective_scan_ref`, without autograd and with O(B*Di*N) scratch memory."""
    h = h0.clone()
    y = torch.empty_like(x)  # (B, L, Di)
    dA = torch.empty_like(h)
    dBx = torch.empty_like(h)
    dx = delta * x  # (B, L, Di)
    for t, (delta_t, dx_t, B_t, C_t) in enumerate(zip(delta.unbind(1), dx.unbind(1), B_ssm.unbind(1), C_ssm.unbind(1))):
        torch.mul(delta_t.unsqueeze(-1), A, out=dA).exp_()  # (B, Di, N)
        torch.mul(dx_t.unsqueeze(-1), B_t.unsqueeze(1), out=dBx)  # (B, Di, N)
        h.mul_(dA).add_(dBx)
        torch.bmm(h, C_t.unsqueeze(-1), out=y[:, t].unsqueeze(-1))  # (B, Di, 1)
    y.addcmul_(x, D)
    return y, h


def selective_scan(
    x: Tensor, delta: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """Pick the fused loop when no gradient is needed, the reference otherwise."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, delta, A, B_ssm, C_ssm, D, h0))
    scan = selective_scan_ref if needs_grad else selective_scan_fused
    return scan(x, delta, A, B_ssm, C_ssm, D, h0)
