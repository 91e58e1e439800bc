"""Sparse mixture-of-experts feed-forward (Switch Transformer, Fedus et al. 2021; Mixtral; Jamba).

Glossary: T tokens (flattened batch x length), D d_model, F expert hidden size, E experts, k experts per
token, A assignments (T * k, or fewer when a capacity drops some).

Router: logits = x W_r^T in fp32 ("selective precision", Switch §2.4); p = softmax over all E; the top-k
experts are chosen with weights p (renormalised over the k chosen if `renormalize`, as Mixtral and Granite;
not, as Jamba and Switch). Each expert is a SwiGLU MLP. Experts are stored stacked, (E, F, D) / (E, D, F), and
loaded from HF's per-expert `experts.{e}.*_proj.weight` by stacking. An optional shared expert (Granite's
`shared_mlp`) sees every token, unweighted, beside the routed ones.

`SigmoidMoE` is Nemotron-H's variant: sigmoid scores, a correction bias that only steers the choice, the best
`topk_groups` of `n_groups` expert groups, relu² experts without a gate, and a relu² shared expert.

Dispatch is dropless by default: assignments are sorted by expert, each expert runs ONE matmul chain on
its contiguous block of tokens, and the weighted outputs are scattered back with index_add_ (MegaBlocks'
grouping without block-sparse kernels). No per-token weight gathers. With a capacity factor (training
only) an expert keeps its first C = ceil(cf * T * k / E) assignments and the rest are dropped: those
tokens skip this expert and flow through the residual (Switch §2.2).

The decode step (`step`, one token per sequence) has two other dispatches, neither of which reads expert
counts back into Python, so both join the compiled decode graph:
- on CPU (`kernel_step`, set by gemv.use_moe_kernel with the few-row kernel or int8 / int4 weights): one call
  of moe_decode.cpp runs the chosen experts of every token and the shared expert, each expert's weights
  streamed once for all its tokens;
  the grouped dispatch would make three kernel calls per chosen expert plus the sorting and splitting around
  them, which at batch 1 costs more than the experts' weights take to stream.
- on CUDA (`static_dispatch`, set by `use_static_dispatch`), with static shapes: the step runs without waiting
  on the GPU and can be captured as a CUDA graph. With T*k < E it gathers each assignment's expert
weights and multiplies them batched (reading T*k experts); otherwise it runs every expert on every token and
weights them by a dense (T, E) routing matrix, zero where unchosen (reading each expert once). The T of a
step is fixed when it is traced or captured, so the choice is too.

`moe_reference` below is the slow, obvious per-token loop that tests hold both dispatches equal to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Relu2MLP, SwiGLU


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
    GATED = True  # SwiGLU experts (gate_proj, up_proj, down_proj); False: relu² (up_proj, down_proj)

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        renormalize: bool = False,
        capacity_factor: float = 0.0,
        shared_d_ff: int = 0,
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.renormalize = n_experts, top_k, renormalize
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, n_experts, bias=False)  # (E, D)
        self.gate_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model)) if self.GATED else None  # (E, F, D)
        self.up_proj = nn.Parameter(torch.empty(n_experts, d_ff, d_model))  # (E, F, D)
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, d_ff))  # (E, D, F)
        for w in self.expert_params():
            for e in range(n_experts):  # each expert initialised as a separate nn.Linear would be
                nn.init.kaiming_uniform_(w.data[e], a=math.sqrt(5))
        shared = SwiGLU if self.GATED else Relu2MLP
        self.shared_mlp = shared(d_model, shared_d_ff) if shared_d_ff else None
        self.linear = F.linear  # how an expert multiplies: F.linear, or packed_linear once pack_experts() ran
        self.kernel_step = False  # the decode step through moe_decode.cpp (see the module docstring)
        self.static_dispatch = False  # the decode step's dispatch with static shapes (CUDA)
        # Routing statistics since the last reset: assignments per expert and dropped assignments.
        # Training, /metrics and router plots read these; they are not saved with the weights.
        self.register_buffer("expert_counts", torch.zeros(n_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_count", torch.zeros((), dtype=torch.long), persistent=False)

    def expert_params(self) -> list[nn.Parameter]:
        """The stacked expert weights, each with the expert on axis 0."""
        return [w for w in (self.gate_proj, self.up_proj, self.down_proj) if w is not None]

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e on x (n, D) -> (n, D): SwiGLU, or relu² when not GATED."""
        lin = self.linear
        if self.gate_proj is None:
            return lin(F.relu(lin(x, self.up_proj[e], None)).square(), self.down_proj[e], None)
        return lin(F.silu(lin(x, self.gate_proj[e], None)) * lin(x, self.up_proj[e], None), self.down_proj[e], None)

    def route(self, x: Tensor) -> RouterOutput:
        """x (T, D) -> the chosen experts and their weights."""
        return route(self.router_logits(x), self.top_k, self.renormalize)

    def router_logits(self, x: Tensor) -> Tensor:
        """x: (T, D) -> (T, E), computed in fp32 whatever the weight dtype, also under autocast."""
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: Tensor) -> tuple[Tensor, RouterOutput]:
        """x: (..., D) -> (..., D), plus the routing decisions (for the aux and z losses)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (T, D)
        r = self.route(x)
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
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(x)
        return out.reshape(shape), r

    def step(self, x: Tensor) -> Tensor:
        """x (T, D), one token per sequence -> (T, D): the decode step's feed-forward."""
        if not self.static_step():
            return self.forward(x)[0]
        r = self.route(x)
        flat = r.experts.reshape(-1)  # (T*k,)
        self.expert_counts.index_add_(0, flat, torch.ones_like(flat))  # stays on the device until /metrics
        if self.kernel_step:
            return torch.ops.aetheris_gemv.moe_decode(x, r.experts, r.weights, *self.kernel_operands())  # (T, D)
        if x.shape[0] * self.top_k < self.n_experts:
            ys = self._gathered(x, flat).view(*r.experts.shape, -1)  # (T, k, D)
            out = (ys * r.weights.unsqueeze(-1).to(ys.dtype)).sum(1)  # (T, D)
        else:
            dense = torch.zeros(x.shape[0], self.n_experts, device=x.device).scatter_(1, r.experts, r.weights)
            ys = self._every_expert(x)  # (E, T, D)
            out = (ys * dense.t().unsqueeze(-1).to(ys.dtype)).sum(0)  # (T, D)
        out = out.to(x.dtype)
        return out + self.shared_mlp(x) if self.shared_mlp is not None else out

    def kernel_operands(self) -> tuple[list[Tensor | None], list[Tensor | None]] | None:
        """The routed and shared experts' matrices as moe_decode.cpp takes them, gate, up, down each as [weight]
        in the model's dtype or [weights, scales] quantized (none for a missing gate, an empty list for no shared
        expert); None where it cannot take them: not all in one format, not contiguous, not on the CPU."""
        names = ("gate_proj", "up_proj", "down_proj")
        routed = [_operands(getattr(self, n)) for n in names]
        s = self.shared_mlp
        shared = [] if s is None else [_operands(getattr(s, n, None)) for n in names]
        present = [o for o in routed + shared if o is not None]
        first = present[0][0]
        if any(
            len(o) != len(present[0]) or o[0].dtype != first.dtype or o[0].device.type != "cpu"
            or not all(t.is_contiguous() for t in o)
            for o in present
        ):  # fmt: skip
            return None
        blank = [None] * len(present[0])
        return [t for o in routed for t in o or blank], [t for o in shared for t in o or blank]

    def static_step(self) -> bool:
        """Whether the decode step has no data-dependent shapes (so it joins the compiled decode graph)."""
        return self.kernel_step or self.static_dispatch

    def _gathered(self, x: Tensor, flat: Tensor) -> Tensor:
        """x (T, D), the chosen experts (T*k,) in token order -> each assignment's expert output (T*k, D)."""
        xs = x.repeat_interleave(self.top_k, dim=0).unsqueeze(-1)  # (A, D, 1)
        up = torch.bmm(self.up_proj[flat], xs)  # (A, F, 1)
        if self.gate_proj is None:
            h = F.relu(up).square()
        else:
            h = F.silu(torch.bmm(self.gate_proj[flat], xs)) * up
        return torch.bmm(self.down_proj[flat], h).squeeze(-1)  # (A, D)

    def _every_expert(self, x: Tensor) -> Tensor:
        """x (T, D) -> every expert's output on every token (E, T, D)."""
        xs = x.expand(self.n_experts, *x.shape)  # (E, T, D)
        up = torch.bmm(xs, self.up_proj.transpose(1, 2))  # (E, T, F)
        if self.gate_proj is None:
            h = F.relu(up).square()
        else:
            h = F.silu(torch.bmm(xs, self.gate_proj.transpose(1, 2))) * up
        return torch.bmm(h, self.down_proj.transpose(1, 2))  # (E, T, D)

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


class SigmoidMoE(MoE):
    """Nemotron-H's MoE: relu² experts, sigmoid routing with a selection-only correction bias and group limit."""

    GATED = False
    FP32_PARAMS = ("router_bias",)  # HF keeps e_score_correction_bias fp32: it decides close choices

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        n_experts: int,
        top_k: int,
        renormalize: bool = True,
        capacity_factor: float = 0.0,
        shared_d_ff: int = 0,
        n_groups: int = 1,
        topk_groups: int = 1,
        scaling: float = 1.0,
    ) -> None:
        super().__init__(d_model, d_ff, n_experts, top_k, renormalize, capacity_factor, shared_d_ff)
        self.n_groups, self.topk_groups, self.scaling = n_groups, topk_groups, scaling
        self.register_buffer("router_bias", torch.zeros(n_experts, dtype=torch.float32))  # (E,)

    def route(self, x: Tensor) -> RouterOutput:
        logits = self.router_logits(x)  # (T, E) fp32
        scores = logits.sigmoid()
        choice = scores + self.router_bias.float()  # (T, E): the bias steers the choice, not the weights
        T, G = choice.shape[0], self.n_groups
        if G > 1:  # a group scores the sum of its best two experts; only the best topk_groups groups compete
            group_scores = choice.view(T, G, -1).topk(min(2, choice.shape[1] // G), dim=-1).values.sum(-1)  # (T, G)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_groups, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(choice.shape[1] // G, dim=1), -math.inf)
        experts = choice.topk(self.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(1, experts)  # (T, k)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return RouterOutput(logits, weights * self.scaling, experts)


def _operands(m: nn.Module | Tensor | None) -> list[Tensor] | None:
    """One matrix (a stack of experts or a Linear) as the decode kernel takes it: quantized layers and stacks
    give [weights, scales] (`operands()`), the others [weight]."""
    if m is None or isinstance(m, Tensor):
        return None if m is None else [m]
    return list(m.operands()) if hasattr(m, "operands") else [m.weight]


def use_static_dispatch(model: nn.Module) -> bool:
    """Give every MoE layer's decode step the static dispatch; True where every layer took it. Layers whose
    experts are packed or quantized (CPU forms) keep the grouped one."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        moe.static_dispatch = moe.linear is F.linear and all(type(w) is nn.Parameter for w in moe.expert_params())
    return all(m.static_dispatch for m in layers)


def sigmoid_route_reference(moe: SigmoidMoE, x_t: Tensor) -> list[tuple[int, float]]:
    """One token's (expert, weight) pairs by the definition, in plain Python over the E scores."""
    scores = moe.router_logits(x_t[None])[0].sigmoid().tolist()
    choice = [s + float(b) for s, b in zip(scores, moe.router_bias)]
    per_group = len(scores) // moe.n_groups
    groups = [choice[g * per_group : (g + 1) * per_group] for g in range(moe.n_groups)]
    group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
    kept = sorted(range(moe.n_groups), key=lambda g: -group_score[g])[: moe.topk_groups]
    candidates = [e for e in range(len(scores)) if e // per_group in kept]
    chosen = sorted(candidates, key=lambda e: -choice[e])[: moe.top_k]
    total = sum(scores[e] for e in chosen) + 1e-20 if moe.renormalize else 1.0
    return [(e, scores[e] / total * moe.scaling) for e in chosen]


def _route_token(moe: MoE, x_t: Tensor) -> list[tuple[int, float]]:
    if isinstance(moe, SigmoidMoE):
        return sigmoid_route_reference(moe, x_t)
    r = route(moe.router_logits(x_t[None]), moe.top_k, moe.renormalize)
    return [(int(e), w) for e, w in zip(r.experts[0], r.weights[0])]


def moe_reference(moe: MoE, x: Tensor) -> Tensor:
    """The obvious definition, one token and one chosen expert at a time (dropless), plus the shared expert."""
    x2 = x.reshape(-1, x.shape[-1])  # (T, D)
    out = torch.zeros_like(x2)
    for t in range(x2.shape[0]):
        for e, w in _route_token(moe, x2[t]):
            out[t] += torch.as_tensor(w).to(x.dtype) * moe.expert(e, x2[t : t + 1])[0]
        if moe.shared_mlp is not None:
            out[t] += moe.shared_mlp(x2[t : t + 1])[0]
    return out.reshape(x.shape)
