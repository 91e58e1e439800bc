"""Selective scan (Mamba-1, Gu & Dao 2023, Algorithm 2) on plain PyTorch.

Glossary: B batch, L length, Di d_inner, N d_state.

The recurrence, per channel d and state index n:
    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * x_t        (zero-order hold for A, Euler for B; §2)
    y_t = <h_t, C_t> + D * x_t
All of it runs in fp32 whatever the weight dtype: the state accumulates over thousands of steps.

Three implementations, held equal by tests/test_scan.py:
  * `selective_scan_ref`: the textbook loop. It materialises exp(delta*A) and delta*B*x for the whole
    sequence, O(B*L*Di*N) memory, and is what autograd differentiates in training. The loop iterates over
    `unbind(1)` slices: indexing `t` inside the loop makes the backward pass quadratic in L (each indexing
    op's backward allocates a zero tensor of the whole sequence).
  * `selective_scan_fused`: inference only. It discretises one step at a time inside the loop so memory
    stays O(B*Di*N) for any prompt length: the eager prefill path.
  * `selective_scan_chunked` with a torch.compile'd `scan_chunk`: inference only, the compiled prefill
    path (HybridLM.compile_inference). Eagerly, every step is ~6 small ops over (B, Di, N) and prefill is
    bound by their overhead and memory traffic; compiled, a chunk of T steps is one loop per (b, d) with
    h held in registers, as the CUDA kernel does, several times faster than the eager loop.
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


CHUNK = 16  # steps per scan_chunk call: one compiled shape; lengths from 8 to 32 run about equally fast


def scan_chunk(h: Tensor, delta: Tensor, x: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor):
    """T steps of the recurrence from h (B, Di, N); delta, x (B, T, Di); B_ssm, C_ssm (B, T, N).

    Returns y (B, T, Di) and h_T. Written as the definition, one step at a time, for torch.compile to fuse;
    run eagerly it is simply slow."""
    ys = []
    for t in range(delta.shape[1]):
        dx = delta[:, t, :, None] * x[:, t, :, None]  # (B, Di, 1)
        h = torch.exp(delta[:, t, :, None] * A) * h + dx * B_ssm[:, t, None, :]  # (B, Di, N)
        ys.append((h * C_ssm[:, t, None, :]).sum(-1) + D * x[:, t])  # (B, Di)
    return torch.stack(ys, 1), h  # (B, T, Di), (B, Di, N)


@torch.no_grad()
def selective_scan_chunked(
    x: Tensor, delta: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor, h0: Tensor, chunk_fn=scan_chunk
) -> tuple[Tensor, Tensor]:
    """Same contract as `selective_scan_ref`, CHUNK steps per `chunk_fn` call.

    L is padded to a multiple of CHUNK with delta = 0, x = 0 steps, which leave h exactly as it was
    (exp(0 * A) = 1, no input), and each chunk is made contiguous: every call then has the same shape and
    strides whatever L is, so a compiled chunk_fn is compiled once, not once per prompt length."""
    Bsz, L, Di = x.shape
    n = -(-L // CHUNK)  # chunks

    def chunks(t: Tensor) -> Tensor:  # (B, L, X) -> (n, B, CHUNK, X), zero-padded
        t = torch.nn.functional.pad(t, (0, 0, 0, n * CHUNK - L))
        # clone, not .contiguous(): at B = 1 the transposed view already counts as contiguous and would keep
        # a batch stride that grows with n, which a compiled chunk_fn would have to recompile for
        return t.view(Bsz, n, CHUNK, -1).transpose(0, 1).clone(memory_format=torch.contiguous_format)

    deltas, xs, Bs, Cs = chunks(delta), chunks(x), chunks(B_ssm), chunks(C_ssm)
    h, ys = h0.contiguous(), []
    for c in range(n):
        y, h = chunk_fn(h, deltas[c], xs[c], A, Bs[c], Cs[c], D)
        ys.append(y)
    return torch.cat(ys, 1)[:, :L], h  # (B, L, Di), (B, Di, N)


def selective_scan(
    x: Tensor, delta: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor, h0: Tensor, chunk_fn=None
) -> tuple[Tensor, Tensor]:
    """The reference when a gradient is needed; else the chunked scan if given a (compiled) `chunk_fn`, else
    the fused loop."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, delta, A, B_ssm, C_ssm, D, h0))
    if needs_grad:
        return selective_scan_ref(x, delta, A, B_ssm, C_ssm, D, h0)
    if chunk_fn is not None:
        return selective_scan_chunked(x, delta, A, B_ssm, C_ssm, D, h0, chunk_fn)
    return selective_scan_fused(x, delta, A, B_ssm, C_ssm, D, h0)
