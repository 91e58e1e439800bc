"""Sparse mixture-of-experts feed-forward (Switch Transformer, Fedus et al. 2021; Mixtral; Jamba).

Glossary: T tokens (flattened batch x length), D d_model, F expert hidden size, E experts, k experts per
token, A assignments (T * k, or fewer when a capacity drops some).

Router: logits = x W_r^T in fp32 ("selective precision", Switch §2.4); p = softmax over all E; the top-k
experts are chosen with weights p (renormalised over the k chosen if `renormalize`, as Mixtral; not, as
Jamba and Switch). Each expert is a SwiGLU MLP. Experts are stored stacked, (E, F, D) / (E, D, F), and
loaded from HF's per-expert `experts.{e}.*_proj.weight` by stacking.

Dispatch is dropless by default: assignments are sorted by expert, each expert runs ONE matmul chain on
its contiguous block of tokens, and the weighted outputs are scattered back with index_add_ (MegaBlocks'
grouping without block-sparse kernels). No per-token weight gathers. With a capacity factor (training
only) an expert keeps its first C = ceil(cf * T * k / E) assignments and the rest are dropped: those
tokens skip this expert and flow through the residual (Switch §2.2).

`moe_reference` below is the slow, obvious per-token loop that tests hold the grouped dispatch equal to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RouterOutput:
    logits: Tensor  # (T, E) fp32
    weights: Tensor  # (T, k) routing weights of the chosen experts, fp32
    experts: Tensor  # (T, k) chosen expert ids


def route(logits: Tensor, top_k: int, renormalize: bool) -> RouterOutput:
    probs = logits.softmax(dim=-1)  # (T, E)
    weights, experts = probs.topk(top_k, dim=-1)  # (T, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return RouterOutput(logits, weights, experts)


def load_balancing_loss(logits: Tensor, experts: Tensor, n_experts: int) -> Tensor:
    """Switch (§2.2) / Mixtral aux loss: E * sum_e f_e * P_e, f_e summed over the k choices.

    f_e = fraction of tokens routed to e (no gradient), P_e = mean router probability of e. Perfectly
    balanced routing gives k (1 for top-1 Switch routing).
    """
    probs = logits.softmax(dim=-1)  # (T, E)
    counts = F.one_hot(experts, n_experts).sum(dim=1).float()  # (T, E)
    return n_experts * (counts.mean(0) * probs.mean(0)).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE (Zoph et al. 2022, §3.1): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoE(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        renormalize: bool = False,
        capacity_factor: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, n_experts, bias=False)  # (E, D)
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # (E, F, D)
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # (E, F, D)
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # (E, D, F)
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            for e in range(n_experts):  # each expert initialised as a separate nn.Linear would be
                nn.init.kaiming_uniform_(w.data[e], a=math.sqrt(5))
        # Routing statistics since the last reset: assignments per expert and dropped assignments.
        # Training, /metrics and router plots read these; they are not saved with the weights.
        self.register_buffer("expert_counts", torch.zeros(n_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_count", torch.zeros((), dtype=torch.long), persistent=False)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e's SwiGLU on x (n, D) -> (n, D)."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def router_logits(self, x: Tensor) -> Tensor:
        """x: (T, D) -> (T, E), computed in fp32 whatever the weight dtype, also under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: Tensor) -> tuple[Tensor, RouterOutput]:
        """x: (..., D) -> (..., D), plus the routing decisions (for the aux and z losses)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        r = route(self.router_logits(x), self.top_k, self.renormalize)
        flat_experts = r.experts.reshape(-1)  # (T*k,)
        order = torch.argsort(flat_experts, stable=True)  # (T*k,) assignments grouped by expert
        counts = torch.bincount(flat_experts, minlength=self.n_experts)  # (E,)
        keep = self._within_capacity(flat_experts[order], counts, x.shape[0])
        if keep is not None:
            order = order[keep]  # (A,)
            counts = torch.bincount(flat_experts[order], minlength=self.n_experts)
        with torch.no_grad():
            self.expert_counts += counts
            self.dropped_count += r.experts.numel() - order.numel()
        tokens = order // self.top_k  # (A,) token of each assignment
        xs = x[tokens]  # (A, D)
        outs = [self.expert(e, chunk) for e, chunk in enumerate(xs.split(counts.tolist())) if chunk.shape[0]]
        ys = torch.cat(outs) if outs else xs[:0]  # (A, D)
        ys = ys * r.weights.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)  # scale by the routing weight
        out = torch.zeros_like(x).index_add_(0, tokens, ys.to(x.dtype))  # (T, D); autocast may make ys bf16
        return out.reshape(shape), r

    def _within_capacity(self, sorted_experts: Tensor, counts: Tensor, n_tokens: int) -> Tensor | None:
        """Mask over the expert-sorted assignments keeping each expert's first C (None when dropless)."""
        if not (self.training and self.capacity_factor > 0):
            return None
        capacity = math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts)
        starts = torch.cumsum(counts, 0) - counts  # (E,)
        rank = torch.arange(sorted_experts.numel(), device=counts.device) - starts[sorted_experts]
        return rank < capacity

    def reset_stats(self) -> None:
        self.expert_counts.zero_()
        self.dropped_count.zero_()


def moe_reference(moe: MoE, x: Tensor) -> Tensor:
    """The obvious definition, one token and one chosen expert at a time (dropless)."""
    x2 = x.reshape(-1, x.shape[-1])  # (T, D)
    r = route(moe.router_logits(x2), moe.top_k, moe.renormalize)
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for j in range(moe.top_k):
            e = int(r.experts[t, j])
            out[t] += r.weights[t, j].to(x.dtype) * moe.expert(e, x2[t : t + 1])[0]
    return out.reshape(x.shape)
