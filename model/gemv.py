"""Decode-sized projections through our own few-row kernel (gemv.cpp), built for this CPU at load time.

Glossary: M rows of input (batch x tokens), I in_features, O out_features.

Why: a decode step at batch 1 is one matrix-vector product per projection, bounded by how fast the weights
stream from memory, and the library kernels fall short of the memory's rate there on CPU: oneDNN's packed
bf16 product and MKL's bf16 one stream well below it, and a packed call's overhead in PyTorch's binding is
several times ours; MKL's fp32 product reads at the memory's rate on Intel CPUs but takes no AVX-512 path on
AMD ones. gemv.cpp reads each block of weight rows once, multiplies every token against it while it sits in
L1, prefetches the next block, and uses AVX512-BF16's pair dot products for bf16 where the CPU has them, which
streams bf16 faster than either library and fp32 at MKL's rate (`python -m bench.gemv` compares them;
bench/results/README.md has the figures). It keeps the plain row-major weight (nothing is copied or
reordered), and products of more than 16 rows (prefill) go to the BLAS kernels through `at::linear`.
`F.linear` is the reference a test holds it equal to.

The kernel is compiled once per CPU and torch build with the C++ compiler torch.compile already needs, into
inductor's cache folder (the compose volume keeps it across restarts). Without a compiler it is not used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .packed import called_linears

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("gemv.cpp", "moe_decode.cpp")]
HEADER = Path(__file__).with_name("gemv_kernels.h")
NAMESPACE = "aetheris_gemv"
NATIVE = ("-march=native",)
_lock = threading.Lock()
_loaded: dict[str, bool] = {}


def compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++") if c and shutil.which(c)), None)


def cpu_signature() -> str:
    """The CPU's model and instruction-set flags: a build for one CPU (-march=native) is not reused on another."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))[:8192]
    except OSError:
        import platform

        return platform.processor()


def cache_folder() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "aetheris"


def build(isa_flags: tuple[str, ...] = NATIVE, namespace: str = NAMESPACE) -> Path:
    """Compile gemv.cpp and moe_decode.cpp for this CPU (`isa_flags`) into a shared library whose ops live in
    `namespace`; a build with the same sources, flags, compiler and torch is reused. Raises if there is no
    compiler or the build fails."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler ($CXX, g++ or c++) on PATH")
    from torch.utils import cpp_extension

    flags = ["-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w", *isa_flags, f"-DAETHERIS_NS={namespace}"]
    flags.append(f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    flags += [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [*(f"-L{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu"]
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    identity = [*(p.read_text() for p in (*SOURCES, HEADER)), *flags, version, torch.__version__, cpu_signature()]
    key = hashlib.sha256("\0".join(identity).encode()).hexdigest()
    target = cache_folder() / f"{namespace}-{key[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        done = subprocess.run(
            [cxx, *flags, *map(str, SOURCES), "-o", str(partial), *libs], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"building the few-row kernels failed: {done.stderr.strip()[-500:]}")
        partial.replace(target)  # atomic: a concurrent process sees the whole library or none
    return target


def load(isa_flags: tuple[str, ...] = NATIVE, namespace: str = NAMESPACE) -> bool:
    """Build (or reuse) and load the kernel into `torch.ops.<namespace>`; False, after one warning, where it
    cannot be built (no compiler, or a compiler error)."""
    with _lock:
        if namespace not in _loaded:
            try:
                torch.ops.load_library(str(build(isa_flags, namespace)))
                torch.library.register_fake(f"{namespace}::linear")(_linear_shape)
                torch.library.register_fake(f"{namespace}::int4_mm")(_quantized_mm_shape)
                torch.library.register_fake(f"{namespace}::int8_mm")(_quantized_mm_shape)
                torch.library.register_fake(f"{namespace}::int4_dequant")(_int4_dequant_shape)
                torch.library.register_fake(f"{namespace}::int8_dequant")(_int8_dequant_shape)
                torch.library.register_fake(f"{namespace}::moe_decode")(_moe_decode_shape)
                _loaded[namespace] = True
            except (RuntimeError, OSError) as e:
                log.warning("few-row kernel unavailable (%s); projections use the library kernels", str(e)[:300])
                _loaded[namespace] = False
        return _loaded[namespace]


def loaded() -> bool:
    """Whether the default build is loaded: what the quantized products check (a dict lookup, which compiled code
    guards on, where calling load() would break the graph); quantizing loads it first."""
    return _loaded.get(NAMESPACE, False)


def _linear_shape(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))  # (..., O)


def _quantized_mm_shape(x: Tensor, weight: Tensor, scales: Tensor, *group: int) -> Tensor:
    return x.new_empty((x.numel() // x.shape[-1], weight.shape[0]), dtype=torch.float32)  # (M, O)


def _int4_dequant_shape(packed: Tensor, scales: Tensor, group: int, dtype: torch.dtype) -> Tensor:
    return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=dtype)  # (O, I)


def _int8_dequant_shape(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(q, dtype=dtype)  # (..., O, I)


def _moe_decode_shape(x: Tensor, *args) -> Tensor:
    return torch.empty_like(x)  # (T, D)


def flush_denormals() -> int:
    """Denormals flushed to zero (FTZ and DAZ) on every intra-op thread of the caller; the threads set, 0 where
    the kernel library cannot load or the CPU is not x86-64."""
    return torch.ops.aetheris_gemv.flush_denormals() if load() else 0


def bf16_kernel(namespace: str = NAMESPACE) -> str:
    """Which inner kernel the loaded build uses for bf16 weights: "avx512_bf16" or "portable"."""
    return getattr(torch.ops, namespace).bf16_kernel()


def kernel_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.bfloat16)


class GemvLinear(nn.Module):
    """y = x W^T + b through gemv.cpp; x (..., I) -> (..., O), with the nn.Linear's own weight and bias."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if not kernel_dtype(linear.weight.dtype) or linear.weight.device.type != "cpu":
            raise ValueError(f"the few-row kernel takes CPU float32 / bfloat16 weights, not {linear.weight.dtype}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight  # (O, I); the same Parameter, so state_dict() and a tie to the embeddings are kept
        self.weight = w if w.is_contiguous() else nn.Parameter(w.detach().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.aetheris_gemv.linear(x, self.weight, self.bias)  # (..., O)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def expert_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The MoE's expert product (called as linear(x, experts[e], None)) through the kernel."""
    return torch.ops.aetheris_gemv.linear(x, weight.contiguous(), bias)


def can_use(model: nn.Module) -> bool:
    p = next(model.parameters())
    return p.device.type == "cpu" and kernel_dtype(p.dtype)


@torch.no_grad()
def use_gemv(model: nn.Module) -> int:
    """Route every called nn.Linear of `model` (model.packed.called_linears) and the MoE experts through the
    kernel, building it first; returns how many Linear layers (0 where it cannot be built)."""
    if not can_use(model):
        raise ValueError("the few-row kernel needs a CPU model in float32 or bfloat16")
    if not load():
        return 0
    from .moe import MoE

    targets = called_linears(model)
    for parent, name, child in targets:
        setattr(parent, name, GemvLinear(child))
    for moe in model.modules():
        if isinstance(moe, MoE):
            moe.linear = expert_linear
    use_moe_kernel(model)
    return len(targets)


def use_moe_kernel(model: nn.Module) -> int:
    """Give the decode step of every MoE layer whose weights moe_decode.cpp takes (routed and shared experts
    contiguous, in one format: the model's dtype, int8 or int4) to the kernel, building it first; returns how
    many layers."""
    from .moe import MoE

    layers = [m for m in model.modules() if isinstance(m, MoE) and m.kernel_operands() is not None]
    if not layers or not load():
        return 0
    for moe in layers:
        moe.kernel_step = True
    return len(layers)
