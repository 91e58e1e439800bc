"""Causal self-attention mixer with a per-sequence K/V cache (multi-head and grouped-query).

Glossary: B batch, L new tokens, D d_model, nH query heads, nKV key/value heads (nH = rep * nKV), hd head dim,
R rotary dims (<= hd), T positions held (cached + new), P the tokens a sequence held before this call.

Names and shapes are those of Hugging Face attention layers (Jamba, Bamba, Granite 4.0-H, Nemotron-H), so their
checkpoints load by name: q_proj (nH*hd, D), k_proj / v_proj (nKV*hd, D), o_proj (D, nH*hd), biases optional.
Positions are optional: Jamba and Granite 4.0-H use none (order comes from their Mamba layers); others rotate the
first R dims of q and k (RoPE, "rotate_half" pairing of i and i + R/2, inv_freq = theta^(-2i/R)).

State (see state.py): k, v (nKV, T, hd) after RoPE, in the weight dtype, growing along T; len () int64, the
tokens held. Key/value head j serves query heads j*rep ... j*rep + rep - 1.
    forward(u, state)  a chunk of L tokens per sequence after the P cached ones (P = 0: training, a fresh
                       prompt): query i sees keys 0 .. P + i. Returns the new state with T = P + L, exact.
    step(u, state)     one token per sequence, rows of different lengths in one batch: each row writes its k, v
                       at its own position `len` of the cache, in place, and attends to the positions below
                       len + 1 under a key-padding mask. The extent it attends over is the cache's (or the
                       block table's) as given: the caller sizes it to the longest row, so the step never reads a
                       length back to the host and its shapes are fixed for a CUDA graph. A row whose `len` is
                       past that extent (a graph's padding rows, which the engine points at a scratch block)
                       writes at the last position it has. With no data-dependent shapes, the step compiles
                       (COMPILE_STEP) and joins the compiled decode graph with the layers around it.
`attention_reference` (an explicit masked softmax) is the slow, obvious twin of the SDPA call that both paths
use; tests hold them equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .state import StateSpec


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """q (B, nH, L, hd), k / v (B, nKV, T, hd), mask (B or 1, 1, L, T) True where a query may look ->
    (B, nH, L, hd). Scores and softmax in fp32, as HF's eager attention."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, nH, T, hd)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # (B, nH, L, T)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)  # (B, nH, L, hd)


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """The same as `attention_reference` through torch's fused scaled_dot_product_attention."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def rope(x: Tensor, positions: Tensor, rotary_dim: int, theta: float) -> Tensor:
    """Rotate the first `rotary_dim` dims of x (B, H, L, hd) by positions (B, L); computed in fp32."""
    inv_freq = theta ** (-torch.arange(0, rotary_dim, 2, device=x.device, dtype=torch.float32) / rotary_dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (B, L, R/2)
    emb = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, L, R)
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    u, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = torch.cat([-u[..., half:], u[..., :half]], dim=-1)
    return torch.cat([u * cos + rotated * sin, rest], dim=-1)  # (B, H, L, hd)


class Attention(nn.Module):
    RESIDUAL_OUT = "o_proj"  # the projection whose init is scaled down with depth (lm.py)
    COMPILE_STEP = True  # the step has no data-dependent shapes: its extent is the cache or table it is handed

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, nH, nKV, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.attn_head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = nH, nKV, hd
        self.q_proj = nn.Linear(D, nH * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(D, nKV * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(D, nKV * hd, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(nH * hd, D, bias=cfg.attn_bias)
        self.scale = cfg.attn_scale or hd**-0.5
        self.rope_theta = cfg.rope_theta
        self.rotary_dim = int(hd * cfg.partial_rotary_factor) // 2 * 2 if cfg.rope_theta > 0 else 0
        self.attend = attention_sdpa  # attention_reference in tests

    def state_spec(self) -> dict[str, StateSpec]:
        kv = StateSpec((self.n_kv_heads, 0, self.head_dim), None, seq_axis=1)
        return {"k": kv, "v": kv, "len": StateSpec((), torch.int64)}

    def _qkv(self, u: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u (B, L, D), positions (B, L) -> q (B, nH, L, hd), k and v (B, nKV, L, hd)."""
        B, L, _ = u.shape
        q = self.q_proj(u).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nH, L, hd)
        k = self.k_proj(u).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nKV, L, hd)
        v = self.v_proj(u).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nKV, L, hd)
        if self.rotary_dim:
            q, k = (
                rope(q, positions, self.rotary_dim, self.rope_theta),
                rope(k, positions, self.rotary_dim, self.rope_theta),
            )
        return q, k, v

    def forward(self, u: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """u (B, L, D) after the P tokens `state` holds (the same P for every row) -> (B, L, D), new state."""
        B, L, _ = u.shape
        held = state["len"]
        P = int(held[0]) if B else 0
        if B and not bool((held == P).all()):
            raise ValueError("attention prefill needs every row of the batch to hold the same number of tokens")
        positions = P + torch.arange(L, device=u.device).expand(B, L)  # (B, L)
        q, k, v = self._qkv(u, positions)
        k = torch.cat([state["k"][:, :, :P].to(k.dtype), k], dim=2)  # (B, nKV, T, hd), T = P + L
        v = torch.cat([state["v"][:, :, :P].to(v.dtype), v], dim=2)
        mask = torch.arange(P + L, device=u.device) <= positions[0, :, None]  # (L, T): key j <= query's position
        y = self.attend(q, k, v, mask[None, None], self.scale)  # (B, nH, L, hd)
        y = self.o_proj(y.transpose(1, 2).reshape(B, L, -1))  # (B, L, D)
        return y, {"k": k, "v": v, "len": held + L}

    def step(self, u: Tensor, state: dict[str, Tensor]) -> Tensor:
        """u (B, D), one token per row at the row's own position -> (B, D); writes k, v and len in place.

        With a `block_table` in the state, k and v are the engine's paged block pool (nBlocks, nKV, bs, hd) and
        row r's token t lives at position t % bs of block block_table[r, t // bs] (server/engine/kv_blocks.py)."""
        B = u.shape[0]
        pos = state["len"]  # (B,)
        q, k, v = self._qkv(u.unsqueeze(1), pos.unsqueeze(1))  # (B, nH, 1, hd), (B, nKV, 1, hd)
        keys, values = (_paged_write if "block_table" in state else _contiguous_write)(state, k[:, :, 0], v[:, :, 0])
        T = keys.shape[2]
        mask = torch.arange(T, device=u.device) <= pos[:, None]  # (B, T): the row's own positions only
        y = self.attend(q, keys, values, mask[:, None, None], self.scale)  # (B, nH, 1, hd)
        state["len"].add_(1)
        return self.o_proj(y.reshape(B, -1))  # (B, D)


def _contiguous_write(state: dict[str, Tensor], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write k, v (B, nKV, hd) at each row's position of its own (B, nKV, T, hd) cache; return the caches."""
    pos = state["len"].clamp(max=state["k"].shape[2] - 1)  # (B,)
    rows = torch.arange(k.shape[0], device=k.device)
    state["k"][rows, :, pos] = k.to(state["k"].dtype)  # (B, nKV, hd) at (row, :, pos[row])
    state["v"][rows, :, pos] = v.to(state["v"].dtype)
    return state["k"], state["v"]


def _paged_write(state: dict[str, Tensor], k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The same on the paged pool: write into each row's block, then gather each row's nb blocks of the table
    in order into (B, nKV, nb * bs, hd); positions past a row's length hold other data and are masked."""
    table = state["block_table"]  # (B, nb)
    bs = state["k"].shape[2]
    pos = state["len"].clamp(max=table.shape[1] * bs - 1)  # (B,)
    rows = torch.arange(k.shape[0], device=k.device)
    block, offset = table[rows, pos // bs], pos % bs  # (B,), (B,)
    state["k"][block, :, offset] = k.to(state["k"].dtype)  # (B, nKV, hd) at (block, :, offset)
    state["v"][block, :, offset] = v.to(state["v"].dtype)
    gather = lambda pool: pool[table].transpose(1, 2).flatten(2, 3)  # noqa: E731 (B, nb, nKV, bs, hd) -> (B, nKV, nb*bs, hd)
    return gather(state["k"]), gather(state["v"])
