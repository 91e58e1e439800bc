"""Mamba-2 mixer (Dao & Gu 2024, "Transformers are SSMs": the state space duality, SSD) on plain PyTorch.

Glossary: B batch, L length, D d_model, H heads, P head_dim, Di d_inner (= H * P), G groups (B and C are
shared by the R = H / G heads of a group), N d_state, K d_conv, Q chunk_size, T the length of one chunk
(Q, or less for the last).
In shape comments the SSM input matrices are written B_ssm, C_ssm, so B is always the batch.

Mamba-2 restricts Mamba-1's A to a scalar per head, a = dt * A, which makes the recurrence, per head h,
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T        h: (P, N), x_t: (P,), B_t: (N,)
    y_t = h_t C_t + D * x_t
and the whole sequence map y = M x with a lower-triangular M[t, s] = C_t^T B_s * exp(a_{s+1} + ... + a_t)
(§3, "semiseparable matrix"). The chunked SSD algorithm (§6) cuts L into chunks of Q: within a chunk, M is
applied as a masked Q x Q matmul (the quadratic, attention-like form); across chunks, only the (P, N) state
is passed on, one chunk at a time. `ssd_reference` is the recurrence above, step by step, and the tests
hold `ssd_chunked` and the mixer's one-token `step` to it. All of it runs in fp32 whatever the weight dtype.

Parameter names and shapes are those of HF `Mamba2Mixer` (and Bamba's, GraniteMoeHybrid's, NemotronH's and
Falcon-H1's mixers, the last without its muP multipliers), so their checkpoints load by name: in_proj
(2Di + 2GN + H, D) producing z, x, B, C, dt; conv1d (Di + 2GN, 1, K) depthwise over x, B and C; dt_bias (H,);
A_log (H,); D (H,); norm.weight (Di,); out_proj (D, Di). A_log, D and dt_bias stay fp32 when the model is
cast (FP32_PARAMS, read by HybridLM.cast).

The per-sequence state is fixed-size whatever the length:
    conv: (B, Di + 2GN, K)  the last K pre-conv inputs, oldest first (the newest at index K-1);
    ssm:  (B, H, P, N)      h after the last token, fp32.
    forward(u, state)   a sequence, continuing from `state` (None or zeros = a fresh sequence). With a
                        cached state this is chunked prefill: the conv window continues from the cached
                        inputs and the SSD scan starts from the cached h. Returns the new state as a dict and
                        leaves `state` as it was.
    step(u, state)      one token per sequence: the O(1) decode, writing the new state over `state` in place
                        (the mixer interface of mixers.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .state import StateSpec


def ssd_reference(
    x: Tensor, dt: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor, h0: Tensor
) -> tuple[Tensor, Tensor]:
    """The recurrence, one step at a time. x: (B, L, H, P); dt: (B, L, H) (already softplus'd and clamped);
    A: (H,) negative; B_ssm, C_ssm: (B, L, G, N); D: (H,); h0: (B, H, P, N).

    Returns y (B, L, H, P) and the last state h_L (B, H, P, N), all fp32. Iterates over `unbind(1)`
    slices, as selective_scan_ref does, so its backward stays linear in L."""
    R = x.shape[2] // B_ssm.shape[2]
    x, dt, A, D, h = x.float(), dt.float(), A.float(), D.float(), h0.float()
    B_h = B_ssm.float().repeat_interleave(R, dim=2)  # (B, L, H, N): head h reads group h // R
    C_h = C_ssm.float().repeat_interleave(R, dim=2)  # (B, L, H, N)
    ys = []
    for x_t, dt_t, B_t, C_t in zip(x.unbind(1), dt.unbind(1), B_h.unbind(1), C_h.unbind(1)):
        decay = torch.exp(dt_t * A)[..., None, None]  # (B, H, 1, 1)
        h = decay * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]  # (B, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_t))  # (B, H, P)
    y = torch.stack(ys, dim=1) + x * D[:, None]  # (B, L, H, P)
    return y, h


CPU_CHUNK = 64  # the longest SSD chunk forward uses on a CPU (Mamba2Mixer.chunk_length)


def segment_sum(a: Tensor) -> Tensor:
    """a (..., Q) -> S (..., Q, Q) with S[i, j] = a[j+1] + ... + a[i] for i >= j and -inf above the diagonal.

    Summed directly by a masked cumsum rather than as cumsum[i] - cumsum[j]: over a long chunk the two
    cumsums grow large and their difference would lose the small decays that matter."""
    Q = a.shape[-1]
    lower = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()
    S = torch.cumsum(torch.where(lower.tril(-1), a[..., :, None], 0.0), dim=-2)  # (..., Q, Q): row k holds a[k]
    return S.masked_fill_(~lower, -math.inf)  # in place: cumsum's backward does not read its output


def _ssd_chunk(x: Tensor, dt: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """One chunk of T steps from the state h, all fp32. x: (B, T, H, P); dt: (B, T, H); A: (H,);
    B_ssm, C_ssm: (B, T, G, N); h: (B, H, P, N). Returns y (B, T, H, P) without the D skip, and h_T."""
    Bsz, T, H, P = x.shape
    G, N = B_ssm.shape[2], B_ssm.shape[3]
    R = H // G
    # Heads before positions, so the (T, T) decay matrices come out in the layout the matmul below reads.
    a = (dt * A).transpose(1, 2)  # (B, H, T): log-decay of each step
    a_cum = torch.cumsum(a, dim=-1)  # (B, H, T): log-decay from the chunk's start through step i
    decay = segment_sum(a).exp_()  # (B, H, T, T): decay from step j to step i, 0 above the diagonal
    xdt = (x * dt[..., None]).view(Bsz, T, G, R, P)  # (B, T, G, R, P)
    h = h.reshape(Bsz, G, R, P, N)  # a caller's state may be a strided slice of a larger cache

    # Within the chunk: the masked quadratic form, y_i = sum_j (C_i . B_j) decay[i, j] dt_j x_j.
    CB = torch.einsum("bign,bsgn->bgis", C_ssm, B_ssm)  # (B, G, T, T): one score matrix per group
    M = CB[:, :, None] * decay.view(Bsz, G, R, T, T)  # (B, G, R, T, T)
    y = torch.einsum("bgris,bsgrp->bigrp", M, xdt)  # (B, T, G, R, P)

    # The state entering the chunk, read out by C and decayed to each step: y_i += exp(a_cum[i]) C_i h.
    from_start = torch.exp(a_cum).transpose(1, 2).reshape(Bsz, T, G, R, 1)  # (B, T, G, R, 1)
    y = y + torch.einsum("bign,bgrpn->bigrp", C_ssm, h) * from_start  # (B, T, G, R, P)

    # The state leaving the chunk: h decayed over the whole chunk, plus each step's input decayed to the end.
    to_end = decay[..., -1, :].transpose(1, 2).reshape(Bsz, T, G, R, 1)  # (B, T, G, R, 1)
    h = torch.exp(a_cum[..., -1]).view(Bsz, G, R, 1, 1) * h + torch.einsum(
        "bsgrp,bsgn->bgrpn", xdt * to_end, B_ssm
    )  # (B, G, R, P, N)
    return y.reshape(Bsz, T, H, P), h.reshape(Bsz, H, P, N)


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B_ssm: Tensor, C_ssm: Tensor, D: Tensor, h0: Tensor, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Same contract as `ssd_reference`, by the chunked SSD algorithm (Dao & Gu 2024, §6).

    Chunks run one after another, each handing its final state to the next; the last one is simply shorter
    when chunk_size does not divide L. One chunk at a time keeps the (T, T) decay matrices at B*H*Q*Q
    whatever L is, and on CPU that is faster than all chunks at once, whose L*H*Q floats leave the cache."""
    # Row-major copies: the mixer's x, B and C are views of the conv output, whose fastest axis is the position,
    # and every chunk's slices and the final add would read them across that stride.
    x, B_ssm, C_ssm = (t.to(torch.float32, memory_format=torch.contiguous_format) for t in (x, B_ssm, C_ssm))
    dt, A, h, ys = dt.float(), A.float(), h0.float(), []
    for s in range(0, x.shape[1], chunk_size):
        e = s + chunk_size
        y, h = _ssd_chunk(x[:, s:e], dt[:, s:e], A, B_ssm[:, s:e], C_ssm[:, s:e], h)  # (B, T, H, P)
        ys.append(y)
    if not ys:  # L = 0: nothing to scan; a copy, so the returned state never aliases the caller's
        return torch.zeros_like(x), h.clone()
    return torch.cat(ys, dim=1) + x * D.float()[:, None], h  # (B, L, H, P)


class RMSNormGated(nn.Module):
    """RMSNorm with a SiLU gate, normalised over groups of `group_size` channels (mamba_ssm `RMSNormGated`;
    HF `MambaRMSNormGated`, `FalconH1RMSNormGated`).

    norm_before_gate=False (HF Mamba2, Bamba, NemotronH): weight * rmsnorm(x * silu(z)).
    norm_before_gate=True (Falcon-H1's option):           weight * rmsnorm(x) * silu(z).
    Computed in fp32 and cast back to x's dtype at the end, as HF does with the fp32 scan output it is given.
    """

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, norm_before_gate: bool = False) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"group_size {group_size} does not divide {dim}")
        self.group_size, self.eps, self.norm_before_gate = group_size, eps, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        x32, gate = x.float(), F.silu(z.float())
        if not self.norm_before_gate:
            x32 = x32 * gate
        groups = x32.view(*x32.shape[:-1], -1, self.group_size)  # (..., Di / group_size, group_size)
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight.float() * groups.view(x32.shape)  # (..., Di)
        if self.norm_before_gate:
            out = out * gate
        return out.to(x.dtype)


class Mamba2Mixer(nn.Module):
    """in_proj -> causal depthwise conv over (x, B, C) -> SSD scan -> gated RMSNorm with z -> out_proj.

    n_groups: B and C are shared by n_heads / n_groups heads. chunk_size: the SSD chunk; results do not
    depend on it beyond fp32 rounding, and on CPU a chunk smaller than checkpoints' usual 256 prefills faster.
    time_step_limit: dt is clamped to it after the softplus. rmsnorm_group_size: channels per norm group,
    d_inner / n_groups when None. norm_before_gate: see RMSNormGated.
    """

    FP32_PARAMS = ("A_log", "D", "dt_bias")  # the SSM's own parameters: fp32 whatever the model dtype
    RESIDUAL_OUT = "out_proj"
    COMPILE_STEP = True

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> Mamba2Mixer:
        """The mixer of a `LayerSpec("mamba2")` layer."""
        m = cls(
            cfg.d_model,
            cfg.mamba2_n_heads,
            cfg.mamba2_head_dim,
            cfg.d_state,
            n_groups=cfg.n_groups,
            d_conv=cfg.d_conv,
            chunk_size=cfg.chunk_size,
            conv_bias=cfg.conv_bias,
            proj_bias=cfg.proj_bias,
            norm_eps=cfg.norm_eps,
            norm_before_gate=cfg.norm_before_gate,
            time_step_limit=(cfg.time_step_limit_min, cfg.time_step_limit_max or math.inf),
        )
        m.reset_ssm_parameters(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor)
        return m

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        head_dim: int,
        d_state: int,
        n_groups: int = 1,
        d_conv: int = 4,
        chunk_size: int = 256,
        conv_bias: bool = True,
        proj_bias: bool = False,
        norm_eps: float = 1e-5,
        norm_before_gate: bool = False,
        time_step_limit: tuple[float, float] = (0.0, math.inf),
        rmsnorm_group_size: int | None = None,
    ) -> None:
        super().__init__()
        if n_heads % n_groups:
            raise ValueError(f"n_groups {n_groups} does not divide n_heads {n_heads}")
        H, P, N, G, K = n_heads, head_dim, d_state, n_groups, d_conv
        Di = H * P
        self.d_model, self.n_heads, self.head_dim, self.d_state, self.n_groups = d_model, H, P, N, G
        self.d_inner, self.d_conv, self.chunk_size = Di, K, chunk_size
        self.conv_dim = Di + 2 * G * N
        self.time_step_limit = (float(time_step_limit[0]), float(time_step_limit[1]))
        self.in_proj = nn.Linear(d_model, 2 * Di + 2 * G * N + H, bias=proj_bias)  # z, x, B, C, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, padding=K - 1, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(H, dtype=torch.float32))
        # One norm group per B/C group by default, as mamba_ssm and HF's Mamba2/Bamba/NemotronH mixers do.
        self.norm = RMSNormGated(Di, rmsnorm_group_size or Di // G, norm_eps, norm_before_gate)
        self.out_proj = nn.Linear(Di, d_model, bias=proj_bias)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1, dt_init_floor: float = 1e-4) -> None:
        """HF `Mamba2Mixer.init_mamba2_weights`: A = -[1, ..., H] and log-uniform dt in [dt_min, dt_max]."""
        H = self.n_heads
        self.A_log.copy_(torch.log(torch.arange(1, H + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt), so softplus(dt_bias) = dt

    def state_spec(self) -> dict[str, StateSpec]:
        return {
            "conv": StateSpec((self.conv_dim, self.d_conv)),
            "ssm": StateSpec((self.n_heads, self.head_dim, self.d_state), torch.float32),
        }

    def empty_state(self, batch: int, device=None, dtype=None) -> dict[str, Tensor]:
        """Zeros of `state_spec` with a leading batch dim: a fresh sequence. dtype replaces the weight dtype."""
        device = self.in_proj.weight.device if device is None else device
        dtype = dtype or self.in_proj.weight.dtype
        return {name: spec.zeros(batch, 0, device, dtype) for name, spec in self.state_spec().items()}

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., 2Di + 2GN + H) -> z (..., Di), xBC (..., Di + 2GN), dt (..., H): HF's order."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)

    def _ssm_inputs(self, xBC: Tensor, dt: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Post-conv xBC (..., Di + 2GN), raw dt (..., H) -> x (..., H, P), B_ssm, C_ssm (..., G, N), dt (..., H).

        dt = softplus(dt + dt_bias) in fp32, then clamped to time_step_limit as HF's chunked path does (HF's
        one-token path skips the clamp; here both paths clamp, so decode continues what prefill computed)."""
        GN, lead = self.n_groups * self.d_state, xBC.shape[:-1]
        x, B_ssm, C_ssm = xBC.split([self.d_inner, GN, GN], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)  # (..., H)
        x = x.reshape(*lead, self.n_heads, self.head_dim)  # (..., H, P)
        B_ssm = B_ssm.reshape(*lead, self.n_groups, self.d_state)  # (..., G, N)
        C_ssm = C_ssm.reshape(*lead, self.n_groups, self.d_state)  # (..., G, N)
        return x, B_ssm, C_ssm, dt

    def forward(self, u: Tensor, state: dict[str, Tensor] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """u: (B, L, D) -> out (B, L, D), state {"conv": (B, Di + 2GN, K), "ssm": (B, H, P, N)}."""
        Bsz, L, _ = u.shape
        if state is None:
            state = self.empty_state(Bsz, u.device)
        z, xBC, dt = self._split(self.in_proj(u))  # (B, L, Di), (B, L, Di + 2GN), (B, L, H)
        window = torch.cat([state["conv"].to(xBC.dtype).transpose(1, 2), xBC], dim=1)  # (B, K + L, Di + 2GN)
        new_conv = window[:, -self.d_conv :].transpose(1, 2).contiguous()  # (B, Di + 2GN, K)
        with torch.autocast(u.device.type, enabled=False):
            xBC = F.silu(self._causal_conv(window[:, 1:])).to(z.dtype)  # (B, L, Di + 2GN)
        x, B_ssm, C_ssm, dt = self._ssm_inputs(xBC, dt)
        A = -torch.exp(self.A_log.float())  # (H,)
        with torch.autocast(u.device.type, enabled=False):  # the SSM stays fp32 under autocast
            y, h = ssd_chunked(x, dt, A, B_ssm, C_ssm, self.D, state["ssm"], self.chunk_length(u))  # (B, L, H, P)
        y = self.norm(y.reshape(Bsz, L, self.d_inner), z).to(z.dtype)  # (B, L, Di)
        return self.out_proj(y), {"conv": new_conv, "ssm": h}  # (B, L, D)

    def _causal_conv(self, window: Tensor) -> Tensor:
        """window (B, K - 1 + L, C) -> the depthwise causal conv (B, L, C) in fp32, continuing from the cached
        inputs: the first output sees the K-1 cached rows, exactly as zero padding does for a fresh sequence.
        Accumulated in fp32, as `step` does, so one-token decode and the full forward agree in bf16 too. Tap by
        tap with positions the slower axis: F.conv1d wants them the faster, and transposing there and back cost
        more than the conv."""
        K, L = self.d_conv, window.shape[1] - self.d_conv + 1
        window, taps = window.float(), self.conv1d.weight.squeeze(1).float().t()  # (K, C)
        out = window[:, :L] * taps[0]  # (B, L, C)
        for k in range(1, K):
            out = out.addcmul_(window[:, k : k + L], taps[k])
        return out if self.conv1d.bias is None else out + self.conv1d.bias.float()

    def chunk_length(self, u: Tensor) -> int:
        """The SSD chunk forward uses: the checkpoint's, or at most CPU_CHUNK on a CPU. The quadratic part of a
        chunk grows with its length, and on CPU a chunk of 64 is the faster for the usual 256 (the results do
        not depend on it beyond rounding)."""
        return min(self.chunk_size, CPU_CHUNK) if u.device.type == "cpu" else self.chunk_size

    def step(self, u: Tensor, state: dict[str, Tensor]) -> Tensor:
        """u: (B, D) one token per sequence -> out (B, D); conv (B, Di + 2GN, K) and ssm (B, H, P, N) advanced
        by one token in place."""
        Bsz = u.shape[0]
        z, xBC, dt = self._split(self.in_proj(u))  # (B, Di), (B, Di + 2GN), (B, H)
        window = torch.cat([state["conv"][..., 1:], xBC.unsqueeze(-1).to(state["conv"].dtype)], dim=-1)  # (B, ., K)
        xBC = (window.float() * self.conv1d.weight.squeeze(1).float()).sum(-1)  # (B, Di + 2GN)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias.float()
        xBC = F.silu(xBC).to(z.dtype)  # (B, Di + 2GN)
        x, B_ssm, C_ssm, dt = self._ssm_inputs(xBC, dt)  # (B, H, P), (B, G, N), (B, G, N), (B, H)
        R = self.n_heads // self.n_groups
        B_h = B_ssm.float().repeat_interleave(R, dim=1)  # (B, H, N)
        C_h = C_ssm.float().repeat_interleave(R, dim=1)  # (B, H, N)
        x32, A = x.float(), -torch.exp(self.A_log.float())
        decay = torch.exp(dt * A)[..., None, None]  # (B, H, 1, 1)
        h = decay * state["ssm"].float() + (dt[..., None] * x32)[..., None] * B_h[:, :, None, :]  # (B, H, P, N)
        with torch.autocast(u.device.type, enabled=False):  # the readout stays fp32 under autocast, as in forward
            y = torch.einsum("bhpn,bhn->bhp", h, C_h) + x32 * self.D.float()[:, None]  # (B, H, P)
        y = self.norm(y.reshape(Bsz, self.d_inner), z).to(z.dtype)  # (B, Di)
        state["conv"].copy_(window)  # the old state was read above
        state["ssm"].copy_(h)
        return self.out_proj(y)  # (B, D)
