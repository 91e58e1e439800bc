"""Weight-only 4-bit quantization (`--quantize int4`): group-wise scales, decoded by a kernel that reads the
packed weights as they are.

Glossary: M rows of input (batch x tokens), I in_features, O out_features, G group size, E experts.

Each row of a weight is cut into groups of G consecutive inputs; a group keeps one scale s = max|w| / 7 (bf16)
and its weights as q = round(w / s) in [-7, 7], two to a byte: byte j of a group holds q[j] + 8 in its low
nibble and q[j + G/2] + 8 in its high one (llama.cpp's Q4_0 layout, symmetric). That is 4 bits per weight
plus 16 bits per group: 4.25 bits at G = 64. Decode-sized products (up to 16 rows) run in gemv.cpp's int4
kernel, which unpacks each group in registers, so a step reads the packed bytes and nothing else (bf16 tokens,
where the CPU has AVX512-BF16, multiply as they are: docs/architecture.md says how); the MoE experts' decode
step runs in moe_decode.cpp on the same inner loops. Larger products (prefill) dequantize the weight for one
GEMM. `int4_linear_reference` is the plain dequantize-then-matmul a test holds both equal to.

A Linear whose in_features is not a multiple of G stays in the model's dtype (it is small: none of the
projections of the families served is).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import gemv
from .quantized import Quantizer
from .weights import Node

GROUP = 64  # inputs per scale: bench/results/README.md ("int4") has the measurement behind the choice
QMAX = 7
KERNEL_MAX_ROWS = 16  # gemv.cpp's MAX_ROWS; past ~16-32 rows dequantize + GEMM is the faster (bench/results)
ROWS = 4096  # rows quantized at a time


def quantize_int4(w: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor]:
    """w (O, I) -> packed (O, I/2) uint8 and scales (O, I/G) bf16, w ~= dequantize_int4(packed, scales). Large
    weights go ROWS rows at a time, so the fp32 temporaries stay small (a head is ~100k rows)."""
    if w.shape[0] > ROWS:
        parts = [_quantize_rows(w[r : r + ROWS], group) for r in range(0, w.shape[0], ROWS)]
        return torch.cat([p for p, _ in parts]), torch.cat([s for _, s in parts])
    return _quantize_rows(w, group)


def _quantize_rows(w: Tensor, group: int) -> tuple[Tensor, Tensor]:
    O, I = w.shape  # noqa: E741
    g = w.detach().float().reshape(O, I // group, group)  # (O, I/G, G)
    scale = (g.abs().amax(dim=-1) / QMAX).to(torch.bfloat16)  # (O, I/G), rounded as it is stored
    s = scale.float().clamp(min=1e-30).unsqueeze(-1)
    q = (torch.round(g / s).clamp(-QMAX, QMAX) + 8).to(torch.uint8)  # (O, I/G, G) in [1, 15]
    half = group // 2
    packed = q[..., :half] | (q[..., half:] << 4)  # (O, I/G, G/2): low nibble j, high nibble j + G/2
    return packed.reshape(O, I // 2), scale


def dequantize_int4(packed: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """packed (O, I/2), scale (O, I/G) -> w (O, I) in `dtype`."""
    O, groups = scale.shape  # noqa: E741
    half = packed.shape[1] // groups
    b = packed.reshape(O, groups, half)
    q = torch.cat([(b & 15), (b >> 4)], dim=-1).float() - 8  # (O, I/G, G)
    return (q * scale.float().unsqueeze(-1)).reshape(O, groups * half * 2).to(dtype)


def int4_linear(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., I) @ dequantized weight^T + bias -> (..., O) in x's dtype: a few rows through the kernel (fp32
    accumulation), more through the weight dequantized in one pass (gemv.cpp) and one GEMM."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # (M, I)
    group = 2 * packed.shape[1] // scale.shape[1]
    if x.device.type != "cpu" or not gemv.loaded():
        y = F.linear(x2, dequantize_int4(packed, scale, x.dtype))  # (M, O)
    elif x2.shape[0] <= KERNEL_MAX_ROWS:
        y = torch.ops.aetheris_gemv.int4_mm(x2, packed, scale, group).to(x.dtype)  # (M, O)
    else:
        y = F.linear(x2, torch.ops.aetheris_gemv.int4_dequant(packed, scale, group, x.dtype))  # (M, O)
    y = y.reshape(*shape[:-1], packed.shape[0])  # (..., O)
    return y if bias is None else y + bias


def int4_linear_reference(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same product the obvious way: dequantize in fp32, multiply in fp32, round to x's dtype once."""
    y = F.linear(x.float(), dequantize_int4(packed, scale))
    return (y if bias is None else y + bias.float()).to(x.dtype)


class Int4Linear(nn.Module):
    """nn.Linear with a group-wise int4 weight; x (..., I) -> (..., O) in x's dtype."""

    QUANTIZED = "linear"

    def __init__(self, packed: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.register_buffer("packed", packed)  # (O, I/2) uint8
        self.register_buffer("scale", scale)  # (O, I/G) bf16
        self.bias = bias

    @classmethod
    def quantize(cls, weight: Tensor, bias: Tensor | None, group: int = GROUP) -> nn.Module:
        if weight.shape[1] % group:  # left as it is (see the module's docstring)
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
            return linear
        gemv.load()  # built before the first product, not inside a compiled one
        return cls(*quantize_int4(weight, group), None if bias is None else bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        return int4_linear(x, self.packed, self.scale, self.bias)  # (..., O)

    def operands(self) -> tuple[Tensor, Tensor]:
        return self.packed, self.scale

    def extra_repr(self) -> str:
        group = 2 * self.packed.shape[1] // self.scale.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, group={group}"


class Int4Experts(nn.Module):
    """A MoE layer's stacked expert weights (E, O, I) in int4; indexing gives expert e's (packed, scale)."""

    QUANTIZED = "experts"

    def __init__(self, packed: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("packed", packed)  # (E, O, I/2) uint8
        self.register_buffer("scale", scale)  # (E, O, I/G) bf16

    @classmethod
    def quantize(cls, stacked: Node, dtype: torch.dtype, group: int = GROUP) -> Int4Experts:
        """One expert at a time (`stacked` may be a node of the checkpoint, read expert by expert)."""
        gemv.load()
        E, O, I = stacked.shape  # noqa: E741
        if I % group:
            raise ValueError(f"--quantize int4: experts with {I} inputs are not a whole number of groups of {group}")
        packed = torch.empty(E, O, I // 2, dtype=torch.uint8)
        scale = torch.empty(E, O, I // group, dtype=torch.bfloat16)
        for e in range(E):
            packed[e], scale[e] = quantize_int4(stacked[e].load().to(dtype), group)
        return cls(packed, scale)

    def __getitem__(self, e: int) -> tuple[Tensor, Tensor]:
        return self.packed[e], self.scale[e]

    def operands(self) -> tuple[Tensor, Tensor]:
        return self.packed, self.scale


def int4_expert_linear(x: Tensor, weight: tuple[Tensor, Tensor], bias: Tensor | None) -> Tensor:
    return int4_linear(x, *weight, bias)


def int4_bytes(shape: tuple[int, ...], dtype: torch.dtype, group: int = GROUP) -> int:
    """Bytes of a weight of this shape once quantized (in the model's dtype when it cannot be)."""
    if shape[-1] % group:
        return math.prod(shape) * dtype.itemsize
    return math.prod(shape) // 2 + math.prod(shape) // group * 2


def quantizer(group: int = GROUP) -> Quantizer:
    """int4 with groups of `group` inputs (the server's is GROUP; the quality benchmark compares others)."""
    return Quantizer(
        "int4" if group == GROUP else f"int4-g{group}",
        functools.partial(Int4Linear.quantize, group=group),
        functools.partial(Int4Experts.quantize, group=group),
        int4_expert_linear,
        functools.partial(int4_bytes, group=group),
    )


INT4 = quantizer()


def why_not(device: torch.device, dtype: torch.dtype | None) -> str | None:
    """Why --quantize int4 cannot serve a model on this device in this dtype (None: not known yet), or None."""
    if device.type != "cpu":
        return f"its kernel runs on the CPU only, not on {device.type}"
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16):
        return f"its kernel takes float32 or bfloat16 activations, not {dtype}"
    if not gemv.load():
        return "its kernel could not be built (no C++ compiler)"
    return None
