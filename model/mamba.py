"""Mamba-1 mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces").

Glossary: B batch, L length, D d_model, Di d_inner (= expand * D), N d_state, K d_conv, R dt_rank.

Parameter names and shapes are those of HF `MambaMixer` (and Jamba's mixer with `mixer_norms`), so HF
checkpoints load by name: in_proj (2Di, D), conv1d (Di, 1, K), x_proj (R + 2N, Di), dt_proj (Di, R) + bias,
A_log (Di, N), D (Di,), out_proj (D, Di); optional dt/b/c_layernorm (R), (N), (N).

The per-sequence state is fixed-size whatever the length (§3.4, "recurrent mode"):
    conv: (B, Di, K)  the last K pre-conv inputs, oldest first (the newest at index K-1);
    ssm:  (B, Di, N)  h after the last token, fp32.
Two entry points share one set of weights (the mixer interface of mixers.py):
    forward(u, state)   a sequence, starting from the given state (zeros = a fresh sequence). With a cached
                        state this is chunked prefill: the conv window continues from the cached inputs and
                        the scan starts from the cached h (HF's fallbacks restart h at zero). Returns the new
                        state and leaves `state` as it was.
    step(u, state)      one token per sequence: the O(1) decode, writing the new state over `state`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .layers import RMSNorm
from .scan import selective_scan
from .state import StateSpec


class MambaMixer(nn.Module):
    FP32_PARAMS = ("A_log", "D")  # A and the skip stay fp32 in a bf16 model: the state accumulates over the sequence
    RESIDUAL_OUT = "out_proj"
    COMPILE_STEP = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, Di, N, K, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank
        self.d_inner, self.d_state, self.d_conv, self.dt_rank = Di, N, K, R
        self.in_proj = nn.Linear(D, 2 * Di, bias=cfg.proj_bias)
        self.conv1d = nn.Conv1d(Di, Di, K, groups=Di, padding=K - 1, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(Di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, Di, bias=True)
        self.A_log = nn.Parameter(torch.empty(Di, N, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(Di, dtype=torch.float32))
        self.out_proj = nn.Linear(Di, D, bias=cfg.proj_bias)
        self.scan_chunk = None  # a compiled scan_chunk for prefill (HybridLM.compile_inference), or eager
        self.mixer_norms = cfg.mixer_norms
        if cfg.mixer_norms:
            self.dt_layernorm = RMSNorm(R, cfg.norm_eps)
            self.b_layernorm = RMSNorm(N, cfg.norm_eps)
            self.c_layernorm = RMSNorm(N, cfg.norm_eps)
        self.reset_ssm_parameters(cfg)

    @torch.no_grad()
    def reset_ssm_parameters(self, cfg: ModelConfig) -> None:
        """S4D-real A and log-uniform dt (Mamba §3.6 and mamba_ssm `Mamba.__init__`)."""
        N, Di = self.d_state, self.d_inner
        # A = -[1, 2, ..., N] for every channel, stored as its log (A_log is positive; A = -exp(A_log)).
        self.A_log.copy_(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(Di, 1))
        self.D.fill_(1.0)
        std = self.dt_rank**-0.5 * cfg.dt_scale
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        # dt ~ log-uniform in [dt_min, dt_max]; the bias stores softplus^-1(dt) so softplus(bias) = dt.
        u = torch.rand(Di)
        dt = torch.exp(u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)) + math.log(cfg.dt_min))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def state_spec(self) -> dict[str, StateSpec]:
        return {
            "conv": StateSpec((self.d_inner, self.d_conv)),
            "ssm": StateSpec((self.d_inner, self.d_state), torch.float32),
        }

    def _ssm_inputs(self, xc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """xc (..., Di) -> delta (..., Di), B_ssm (..., N), C_ssm (..., N), all fp32: the discretisation and the
        scan lose precision in bf16 over long sequences."""
        dbc = self.x_proj(xc)  # (..., R + 2N)
        dt, B_ssm, C_ssm = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.mixer_norms:
            dt, B_ssm, C_ssm = self.dt_layernorm(dt), self.b_layernorm(B_ssm), self.c_layernorm(C_ssm)
        # The bias is added in fp32 before softplus, as mamba_ssm's `delta_bias` does.
        delta = F.softplus(self._dt_proj(dt).float() + self.dt_proj.bias.float())
        return delta, B_ssm.float(), C_ssm.float()

    def _dt_proj(self, dt: Tensor) -> Tensor:
        """dt (..., R) @ dt_proj.weight^T -> (..., Di) in dt's dtype, without the bias.

        Traced for a compiled batch-1 decode step, it is a product and a sum over R, which inductor fuses into the
        SSM update's loop: as its own GEMM call, the small-GEMM call overhead costs several times what reading its
        R x Di weight takes, so batch-1 decode is faster fused. From batch 8 on the fused form gains nothing, so
        larger batches, eager decode and prefill take F.linear, the reference."""
        w = self.dt_proj.weight
        if torch.compiler.is_compiling() and dt.dim() == 2 and dt.shape[0] == 1:
            return (dt.float().unsqueeze(-2) * w.float()).sum(-1).to(dt.dtype)  # (1, 1, R) * (Di, R) -> (1, Di)
        return F.linear(dt, w)

    def forward(self, u: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """u: (B, L, D) -> out (B, L, D) and the new state: conv (B, Di, K), ssm (B, Di, N)."""
        conv, ssm = state["conv"], state["ssm"]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, Di) each
        x = x.transpose(1, 2)  # (B, Di, L)
        window = torch.cat([conv.to(x.dtype), x], dim=-1)  # (B, Di, K + L)
        new_conv = window[..., -self.d_conv :].contiguous()  # (B, Di, K)
        # Causal depthwise conv continuing from the cached inputs: the first output sees the K-1 cached
        # columns, exactly as zero padding does for a fresh sequence. Accumulated in fp32, as `step` does
        # (and the causal_conv1d kernel), so one-token decode and the full forward agree in bf16 too.
        w, b = self.conv1d.weight.float(), None if self.conv1d.bias is None else self.conv1d.bias.float()
        with torch.autocast(u.device.type, enabled=False):
            xc = F.conv1d(window[..., 1:].float(), w, b, groups=self.d_inner)  # (B, Di, L)
        xc = F.silu(xc).to(x.dtype).transpose(1, 2)  # (B, L, Di)
        delta, B_ssm, C_ssm = self._ssm_inputs(xc)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        with torch.autocast(u.device.type, enabled=False):  # the scan stays fp32 under autocast (§3.5)
            y, new_ssm = selective_scan(
                xc.float(), delta, A, B_ssm, C_ssm, self.D.float(), ssm, self.scan_chunk
            )  # (B, L, Di)
        y = (y * F.silu(z.float())).to(x.dtype)  # the gate multiplies after the D skip, as mamba_ssm's does
        return self.out_proj(y), {"conv": new_conv, "ssm": new_ssm}  # (B, L, D)

    def step(self, u: Tensor, state: dict[str, Tensor]) -> Tensor:
        """u: (B, D) one token per sequence -> out (B, D); conv (B, Di, K) and ssm (B, Di, N) updated in place."""
        conv, ssm = state["conv"], state["ssm"]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, Di) each
        window = torch.cat([conv[..., 1:], x.unsqueeze(-1).to(conv.dtype)], dim=-1)  # (B, Di, K)
        w = self.conv1d.weight.squeeze(1)  # (Di, K)
        xc = (window.float() * w.float()).sum(-1)  # (B, Di)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias.float()
        xc = F.silu(xc).to(x.dtype)  # (B, Di)
        delta, B_ssm, C_ssm = self._ssm_inputs(xc)  # (B, Di), (B, N), (B, N)
        A = -torch.exp(self.A_log.float())  # (Di, N)
        x32 = xc.float()
        h = torch.exp(delta.unsqueeze(-1) * A) * ssm + (delta * x32).unsqueeze(-1) * B_ssm.unsqueeze(1)  # (B, Di, N)
        y = torch.bmm(h, C_ssm.unsqueeze(-1)).squeeze(-1) + self.D.float() * x32  # (B, Di)
        y = (y * F.silu(z.float())).to(x.dtype)
        conv.copy_(window)  # the old state was read above
        ssm.copy_(h)
        return self.out_proj(y)  # (B, D)
