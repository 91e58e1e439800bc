"""Inference-only Linear layers with the weight pre-packed in oneDNN's blocked layout (CPU).

Glossary: M rows of input (batch x tokens), I in_features, O out_features.

Why: decoding one token per sequence is a matrix-vector product per projection, bounded by how fast the
weights stream from memory. `F.linear` with a row-major (O, I) weight goes to MKL's GEMV / small-M GEMM, which
takes no AVX-512 path on AMD CPUs: there it streams the weights at a fraction of the memory's rate (one thread
does the work at M = 1). The same weights reordered once into oneDNN's blocked layout and multiplied by
`mkldnn._linear_pointwise` stream several times faster, up to the memory's rate at small M
(bench/results/README.md, "oneDNN packing"). This is the rewrite that torch.compile's
freezing pass does for CPU inference; done here explicitly, the eager engine gets it, the model stays
unfrozen, and `nn.Linear` stays the reference a test holds it equal to.

Packed weights are opaque tensors without storage: they are not in `state_dict()`, cannot move devices and
have no gradient, so packing is the last step of loading a model for serving, never done for training.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
from torch import Tensor

# Set to 1 to take the unpacked fallback for bf16 as a CPU without bf16 instructions does (tests and benchmarks
# exercise that branch on every machine through it).
NO_BF16_ENV = "AETHERIS_NO_BF16_PACKING"

# Linear modules that are read through `.weight` rather than called (F.linear on the raw weight) stay as they
# are: dt_proj adds its bias in fp32 before softplus (mamba.py), the MoE router runs in fp32 (moe.py). Both are
# small (R x Di, E x D), so packing them would gain little.
UNPACKED = ("dt_proj", "router")


@torch.library.custom_op("aetheris::packed_linear", mutates_args=())
def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., I) @ packed (O, I)^T + bias -> (..., O). A custom op so that torch.compile keeps it whole, as one
    call inside the compiled decode step (inductor cannot lower mkldnn's op with an opaque weight input)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@packed_linear.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))  # (..., O)


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's blocked layout; x (..., I) -> (..., O)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not packable_dtype(linear.weight.dtype):
            raise ValueError(f"oneDNN cannot pack {linear.weight.dtype} weights on this CPU")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # batch_size=None: one layout for every M (the engine's batch changes every step), as fast as a layout
        # specialised to M = 1, 8 or 32.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # (O, I), opaque
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight, self.bias)  # (..., O)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def packable_dtype(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of `dtype` on this CPU: fp32 always; bf16 only on CPUs with bf16 instructions
    (AVX512-BF16 / AMX, or AVX-NE-CONVERT), which machines of the same kind do not all have."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return os.environ.get(NO_BF16_ENV, "") in ("", "0") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


def packing_pays_here(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN packing is the faster choice for `dtype` weights on this CPU where the few-row kernel
    (gemv.py) cannot be built, which is what the server then falls back to: bf16 wherever oneDNN packs
    it (`packable_dtype`); fp32 everywhere but on Intel CPUs, where MKL takes its own AVX-512 / AVX2 fp32 kernels
    (it does not on other vendors' CPUs). On Intel, MKL's one-row fp32 GEMV reads at the memory's rate and a
    packed call costs several times an F.linear call, so plain F.linear wins fp32 decode at batch 1; packed bf16
    wins at batch 8 and matches plain at batch 1 and 32, and packed fp32 wins on AMD at every batch
    (bench/results/README.md, "oneDNN packing"). The fp32 choice follows batch 1, what one user of a small server
    waits on."""
    if dtype == torch.bfloat16:
        return packable_dtype(dtype)
    try:
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        vendor = ""
    return vendor != "GenuineIntel"


def can_pack(model: nn.Module) -> bool:
    """oneDNN packing applies to CPU models whose dtype `packable_dtype` accepts."""
    p = next(model.parameters())
    return p.device.type == "cpu" and packable_dtype(p.dtype)


def called_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, name, layer) for every nn.Linear that is called (not one in UNPACKED): what load-time rewrites
    (packing, int8) replace."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear) and name not in UNPACKED
    ]


@torch.no_grad()
def pack_linears(model: nn.Module, experts: bool = True) -> int:
    """Replace every called nn.Linear of `model` (not those in UNPACKED) by a PackedLinear, and pack MoE experts
    (PackedExperts) unless `experts` is False (the benchmark's before/after); returns how many Linear layers.

    A weight tied to the embeddings is packed as a copy: the embedding lookup keeps the original."""
    if not can_pack(model):
        raise ValueError("weight packing needs a CPU model in float32 or bfloat16 (bf16: a CPU with bf16 support)")
    targets = called_linears(model)
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    if experts:
        pack_experts(model)
    return len(targets)


def pack_if_supported(model: nn.Module) -> int:
    """`pack_linears` where this CPU packs the model's dtype, else nothing (the model keeps nn.Linear, which runs
    on any CPU); returns how many layers were packed."""
    return pack_linears(model) if can_pack(model) else 0


class PackedExperts(nn.Module):
    """A MoE layer's stacked expert weights (E, O, I), each expert's matrix packed on its own. Indexing gives
    expert e's packed matrix, so the MoE's grouped dispatch (one matmul chain per expert over its block of
    tokens) runs unchanged with `packed_linear` in place of F.linear."""

    def __init__(self, stacked: Tensor) -> None:
        super().__init__()
        if not packable_dtype(stacked.dtype):
            raise ValueError(f"oneDNN cannot pack {stacked.dtype} weights on this CPU")
        self.shape = tuple(stacked.shape)
        self.experts = [torch.ops.mkldnn._reorder_linear_weight(w.detach()) for w in stacked]

    def __getitem__(self, e: int) -> Tensor:
        return self.experts[e]


@torch.no_grad()
def pack_experts(model: nn.Module) -> int:
    """Pack the expert weights of every MoE layer (their gate/up/down stacks); returns how many layers. The fp32
    stacks are replaced, so a packed model holds each weight once."""
    return replace_experts(model, PackedExperts, packed_linear)


def replace_experts(model: nn.Module, wrap, linear) -> int:
    """Replace every MoE layer's gate/up/down stacks by `wrap(stack)` and its expert product by `linear`
    (called as linear(x, experts[e], None)); returns how many layers. The load-time rewrites share it."""
    from .moe import MoE

    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        for name in ("gate_proj", "up_proj", "down_proj"):
            if getattr(moe, name) is not None:
                wrapped = wrap(getattr(moe, name))
                delattr(moe, name)
                setattr(moe, name, wrapped)
        moe.linear = linear
    return len(layers)


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, (PackedLinear, PackedExperts)) for m in model.modules())
