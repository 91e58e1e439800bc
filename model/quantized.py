"""Weight-only int8 quantization for inference (`--quantize int8`).

Glossary: M rows of input (batch x tokens), I in_features, O out_features, E experts.

Why: decoding streams every weight once per step, so at small batch a step costs the bytes of the weights.
Int8 weights are a quarter of fp32's bytes (half of bf16's). Each output row keeps one scale (symmetric,
per-channel: w ~= q * s, q in [-127, 127], s = max|w_row| / 127), the scheme of llama.cpp's Q8_0 with one
block per row instead of per 32 weights. Decode-sized products (up to 64 rows) run in PyTorch's int8
weight-only kernel `torch._weight_int8pack_mm`, which converts the int8 weights inside the kernel, so the
bytes read per step are the int8 ones; larger products (prefill, big batches) dequantize the weight for one
GEMM. Outputs keep the model's dtype. `int8_linear_reference` is the plain product a test holds both equal to.

Quantized weights are not saved: quantizing is a load-time step for serving, like oneDNN packing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .packed import called_linears, replace_experts
from .weights import Node, as_node

QMAX = 127
# Rows (batch x tokens) up to which the int8 kernel multiplies; past it, the weight is dequantized for one GEMM.
# The kernel turns compute-bound as rows grow: up to 64 rows it beats dequantize + GEMM on the 130m-size model's
# shapes, past that it loses (bench/results/README.md, "int8"), so decode batches take the kernel and prefill
# chunks the GEMM.
KERNEL_MAX_ROWS = 64


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (..., O, I) -> q (..., O, I) int8 and scale (..., O) fp32 with w ~= q * scale[..., None]. A large 2-D
    weight goes 4096 rows at a time, so the fp32 temporaries stay small (a head is ~100k rows)."""
    if w.dim() == 2 and w.shape[0] > 4096:
        parts = [quantize_rows(w[r : r + 4096]) for r in range(0, w.shape[0], 4096)]
        return torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts])
    w = w.detach().float()
    scale = w.abs().amax(dim=-1).clamp(min=1e-12) / QMAX  # (..., O)
    q = torch.round(w / scale.unsqueeze(-1)).clamp(-QMAX, QMAX).to(torch.int8)  # (..., O, I)
    return q, scale


def kernel_takes(rows: int, in_features: int) -> bool:
    """Whether `torch._weight_int8pack_mm` serves this product. It runs with bf16 activations: its fp32 path
    streams far slower than its bf16 one, and its bf16 path returns garbage (or crashes) unless
    in_features is a multiple of 16 (torch 2.13, checked against the reference for 16 to 1,536)."""
    return rows <= KERNEL_MAX_ROWS and in_features % 16 == 0


@torch.library.custom_op("aetheris::int8_mm", mutates_args=())
def int8_mm(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x (M, I) bf16 @ (q * scale)^T -> (M, O) bf16. A custom op so that torch.compile calls the kernel as it is
    (inductor's own lowering of it asserts on a fused input in torch 2.13)."""
    return torch._weight_int8pack_mm(x.contiguous(), q, scale)


@int8_mm.register_fake
def _(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], q.shape[0]))  # (M, O)


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., I) @ (q * scale)^T + bias -> (..., O), in x's dtype. A few rows go through the int8 kernel in
    bf16 (x and the output rounded to bf16, fp32 accumulation); more rows through the dequantized weight in
    x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, I)
    if kernel_takes(x2.shape[0], shape[-1]):
        y = int8_mm(x2.to(torch.bfloat16), q, scale.to(torch.bfloat16))  # (M, O)
        y = y.to(x.dtype)
    else:
        y = F.linear(x2, (q.to(scale.dtype) * scale.unsqueeze(-1)).to(x.dtype))  # (M, O)
    y = y.reshape(*shape[:-1], q.shape[0])  # (..., O)
    return y if bias is None else y + bias


def int8_linear_reference(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same product the obvious way, in fp32 through the dequantized weight, with x and the output rounded
    as the kernel path rounds them."""
    if kernel_takes(x.reshape(-1, x.shape[-1]).shape[0], x.shape[-1]):
        w = q.float() * scale.to(torch.bfloat16).float().unsqueeze(-1)  # (O, I)
        y = F.linear(x.to(torch.bfloat16).float(), w).to(torch.bfloat16)
    else:
        y = F.linear(x.float(), q.float() * scale.float().unsqueeze(-1))
    return y.to(x.dtype) if bias is None else y.to(x.dtype) + bias


class Int8Linear(nn.Module):
    """nn.Linear with an int8 per-row weight; x (..., I) -> (..., O) in x's dtype."""

    QUANTIZED = "linear"  # what `quantized_layers` and `is_quantized` look for, whatever the format

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # (O, I) int8
        self.register_buffer("scale", scale)  # (O,) in the model's dtype
        self.bias = bias

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None) -> Int8Linear:
        q, scale = quantize_rows(weight)
        return cls(q, scale.to(weight.dtype), None if bias is None else bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)  # (..., O)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Experts(nn.Module):
    """A MoE layer's stacked expert weights (E, O, I) in int8 with per-row scales (E, O). Indexing gives
    expert e's (q, scale) pair, which `int8_expert_linear` multiplies, so the MoE's grouped dispatch runs as
    it does with packed or plain weights."""

    QUANTIZED = "experts"

    def __init__(self, qweight: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)  # (E, O, I) int8
        self.register_buffer("scale", scale)  # (E, O)

    @classmethod
    def quantize(cls, stacked: Node, dtype: torch.dtype) -> Int8Experts:
        """One expert at a time: the full-precision stack is never whole in memory (`stacked` may be a node of
        the checkpoint, read expert by expert)."""
        q = torch.empty(stacked.shape, dtype=torch.int8)  # (E, O, I)
        scale = torch.empty(stacked.shape[:2], dtype=dtype)  # (E, O)
        for e in range(stacked.shape[0]):
            qe, se = quantize_rows(stacked[e].load().to(dtype))
            q[e], scale[e] = qe, se.to(dtype)
        return cls(q, scale)

    def __getitem__(self, e: int) -> tuple[Tensor, Tensor]:
        return self.qweight[e], self.scale[e]


def int8_expert_linear(x: Tensor, weight: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:
    return int8_linear(x, *weight, bias)


@dataclass(frozen=True)
class Quantizer:
    """A weight-only format, applied to a model's called Linear layers and MoE expert stacks, whether while
    loading (model/build.py, from the checkpoint's nodes) or to a loaded model (`quantize`)."""

    name: str
    linear: Callable[[Tensor, Tensor | None], nn.Module]  # (weight in the model dtype, bias) -> the layer
    experts: Callable[[Node, torch.dtype], nn.Module]  # (stacked (E, O, I) node, model dtype) -> indexable
    expert_linear: Callable  # how the MoE multiplies by experts[e]
    nbytes: Callable[[tuple[int, ...], torch.dtype], int]  # bytes a weight of this shape takes once quantized

    @torch.no_grad()
    def quantize(self, model: nn.Module) -> int:
        """Replace every called nn.Linear (packed.called_linears: those read through `.weight` stay, and are
        small) and every MoE layer's expert stacks; returns how many Linear layers. A head tied to the
        embeddings is quantized as a copy: the embedding lookup keeps the original."""
        if not quantizable(model):
            raise ValueError(f"{self.name} quantization needs a float32, bfloat16 or float16 model")
        targets = called_linears(model)
        for parent, name, child in targets:
            setattr(parent, name, self.linear(child.weight.detach(), child.bias))
        replace_experts(
            model, lambda stacked: self.experts(as_node(stacked.detach()), stacked.dtype), self.expert_linear
        )
        return len(targets)


INT8 = Quantizer(
    "int8",
    Int8Linear.quantize,
    Int8Experts.quantize,
    int8_expert_linear,
    lambda shape, dtype: math.prod(shape) + math.prod(shape[:-1]) * dtype.itemsize,
)


def quantizable(model: nn.Module) -> bool:
    """The model dtypes the int8 path serves: its output keeps the model's dtype."""
    return next(model.parameters()).dtype in (torch.float32, torch.bfloat16, torch.float16)


def quantize_int8(model: nn.Module) -> int:
    """`INT8.quantize(model)`: int8 weights for a loaded model; returns how many Linear layers."""
    return INT8.quantize(model)


def quantized_layers(model: nn.Module) -> list[nn.Module]:
    """The model's quantized Linear layers, whatever their format."""
    return [m for m in model.modules() if getattr(m, "QUANTIZED", None) == "linear"]


def is_quantized(model: nn.Module) -> bool:
    return any(getattr(m, "QUANTIZED", None) for m in model.modules())
