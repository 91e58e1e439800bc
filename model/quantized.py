"""Weight-only int8 quantization for inference (`--quantize int8`).

Glossary: M rows of input (batch x tokens), I in_features, O out_features, E experts.

Why: decoding streams every weight once per step, so at small batch a step costs the bytes of the weights.
Int8 weights are a quarter of fp32's bytes (half of bf16's). Each output row keeps one fp32 scale (symmetric,
per-channel: w ~= q * s, q in [-127, 127], s = max|w_row| / 127), the scheme of llama.cpp's Q8_0 with one
block per row instead of per 32 weights. Decode-sized products (up to 16 rows) run in gemv.cpp's int8
kernel, which converts the int8 weights in registers and sums in fp32, so a step reads the int8 bytes and
nothing else; the MoE experts' decode step runs in moe_decode.cpp on the same inner loops. Larger products
(prefill) dequantize the weight in one pass (gemv.cpp) for one GEMM in x's dtype, as do CPUs without a C++
compiler (in PyTorch ops).
Outputs keep the model's dtype. `int8_linear_reference` is the plain product a test holds both equal to.

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

from . import gemv
from .packed import called_linears, replace_experts
from .weights import Node, as_node

QMAX = 127
# gemv.cpp's MAX_ROWS: past it the one-pass dequantization and one GEMM beat the kernel, which turns
# compute-bound as rows grow (bench/results/README.md, "int8").
KERNEL_MAX_ROWS = 16


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


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """q (..., O, I), scale (..., O) -> w (..., O, I) in `dtype`."""
    return (q.float() * scale.float().unsqueeze(-1)).to(dtype)


def int8_linear(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., I) @ (q * scale)^T + bias -> (..., O), in x's dtype: a few rows through the kernel (fp32 sums),
    more through the weight dequantized to x's dtype and one GEMM."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, I)
    kernel = x.device.type == "cpu" and gemv.loaded()
    if kernel and x2.shape[0] <= KERNEL_MAX_ROWS:
        y = torch.ops.aetheris_gemv.int8_mm(x2, q, scale).to(x.dtype)  # (M, O)
    elif kernel:
        y = F.linear(x2, torch.ops.aetheris_gemv.int8_dequant(q, scale, x.dtype))  # (M, O)
    else:
        y = F.linear(x2, dequantize_rows(q, scale, x.dtype))  # (M, O)
    y = y.reshape(*shape[:-1], q.shape[0])  # (..., O)
    return y if bias is None else y + bias


def int8_linear_reference(x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same product the obvious way: dequantize in fp32, multiply in fp32, round to x's dtype once."""
    y = F.linear(x.float(), dequantize_rows(q, scale))
    return (y if bias is None else y + bias.float()).to(x.dtype)


class Int8Linear(nn.Module):
    """nn.Linear with an int8 per-row weight; x (..., I) -> (..., O) in x's dtype."""

    QUANTIZED = "linear"  # what `quantized_layers` and `is_quantized` look for, whatever the format

    def __init__(self, qweight: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # (O, I) int8
        self.register_buffer("scale", scale)  # (O,) fp32
        self.bias = bias

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None) -> Int8Linear:
        gemv.load()  # built before the first product, not inside a compiled one
        return cls(*quantize_rows(weight), None if bias is None else bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight, self.scale, self.bias)  # (..., O)

    def operands(self) -> tuple[Tensor, Tensor]:
        return self.qweight, self.scale

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
        self.register_buffer("scale", scale)  # (E, O) fp32

    @classmethod
    def quantize(cls, stacked: Node, dtype: torch.dtype) -> Int8Experts:
        """One expert at a time: the full-precision stack is never whole in memory (`stacked` may be a node of
        the checkpoint, read expert by expert)."""
        gemv.load()
        q = torch.empty(stacked.shape, dtype=torch.int8)  # (E, O, I)
        scale = torch.empty(stacked.shape[:2])  # (E, O)
        for e in range(stacked.shape[0]):
            q[e], scale[e] = quantize_rows(stacked[e].load().to(dtype))
        return cls(q, scale)

    def __getitem__(self, e: int) -> tuple[Tensor, Tensor]:
        return self.qweight[e], self.scale[e]

    def operands(self) -> tuple[Tensor, Tensor]:
        return self.qweight, self.scale


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
    lambda shape, dtype: math.prod(shape) + math.prod(shape[:-1]) * 4,
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
