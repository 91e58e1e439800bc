"""A loaded model made fast to serve, in one place for the server and the benchmarks: int8 weights, or the
projections through the few-row kernel (gemv.py) or oneDNN packing (packed.py); the weights moved into
transparent huge pages (huge_pages.py); the decode step and prefill scan compiled. On a GPU the MoE layers'
decode step dispatches with static shapes (moe.py), so that the step never waits on the device.

Each step is an optimisation: where one cannot work here (no C++ compiler, a CPU without bf16 instructions,
Linux without transparent huge pages) or fails, the paths before it serve and a note says why. `strict=True`
(the benchmarks, which must measure what a row names) raises `NotSupported` instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import gemv
from .build import reuse_freed_memory
from .huge_pages import huge_page_bytes, use_huge_pages
from .int4 import INT4
from .moe import use_static_dispatch
from .packed import NO_BF16_ENV, can_pack, pack_linears, packing_pays_here
from .quantized import INT8, quantized_layers

log = logging.getLogger(__name__)


QUANTIZERS = {q.name: q for q in (INT8, INT4)}


class NotSupported(RuntimeError):
    """A step asked for strictly cannot run on this machine (or failed)."""


@dataclass(frozen=True)
class Speedups:
    """What to do; the defaults are the server's."""

    quantize: str | None = None  # a name of quantized.QUANTIZERS ("int8"), replacing the kernel and packing
    pack: bool | None = None  # None: the few-row kernel, else packing where it pays; True: pack; False: F.linear
    pack_experts: bool = True  # with packing, the MoE experts too
    huge_pages: bool = True
    compile: bool = True


@dataclass
class Prepared:
    """What was done, for the startup log and the metrics."""

    linears: str = "F.linear"  # what serves the projections: int8, few-row kernel, oneDNN packed or F.linear
    huge_page_bytes: int = 0  # weights moved into the huge-page mapping
    compiled: bool = False
    notes: list[str] = field(default_factory=list)  # one line per step done, in the order they ran
    warnings: list[str] = field(default_factory=list)  # one line per step that could not run


def missing_compiler(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, or None. On CPU inductor builds C++ kernels, so it needs a C++ compiler
    ($CXX, g++ or c++); on CUDA, Triton builds a C helper for its launcher, so it needs a C compiler ($CC, gcc or
    clang). Both include Python.h: the Python development headers must be installed."""
    names = (
        [os.environ.get("CXX") or "g++", "c++"] if device.type == "cpu" else [os.environ.get("CC") or "gcc", "clang"]
    )
    kind = "C++" if device.type == "cpu" else "C"
    if not any(shutil.which(n) for n in names):
        return f"no {kind} compiler ({' / '.join(names)}) on PATH"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        return f"no Python development headers ({headers} is missing; e.g. apt-get install python3-dev)"
    return None


def _linears(model: nn.Module, s: Speedups, strict: bool, out: Prepared) -> None:
    if s.quantize is not None:
        quantizer = QUANTIZERS[s.quantize]
        done = quantized_layers(model)  # quantized while loading (model/build.py), or now
        n = len(done) if done else quantizer.quantize(model)
        out.linears = s.quantize
        out.notes.append(f"quantized {n} Linear layers and the MoE experts to {s.quantize}")
        if layers := gemv.use_moe_kernel(model):
            out.notes.append(f"MoE decode of {layers} layers in one kernel call each")
        return
    if s.pack is None and gemv.can_use(model) and (n := gemv.use_gemv(model)):
        out.linears = "few-row kernel"
        out.notes.append(f"few-row kernel (bf16: {gemv.bf16_kernel()}) serves {n} Linear layers and the MoE experts")
        return
    if not can_pack(model):
        if s.pack and strict:
            raise NotSupported(f"oneDNN weight packing: no bf16 instructions here, or {NO_BF16_ENV} is set")
        return
    pack = packing_pays_here(model.embeddings.weight.dtype) if s.pack is None else s.pack
    if pack:
        out.linears = "oneDNN packed"
        out.notes.append(f"packed {pack_linears(model, experts=s.pack_experts)} Linear layers for oneDNN")
    else:
        why = "--no-pack-weights" if s.pack is False else "MKL's fp32 GEMV is faster on Intel CPUs"
        out.notes.append(f"Linear layers left to F.linear ({why})")


def _compile(model: nn.Module, strict: bool, out: Prepared) -> None:
    if why := missing_compiler(model.embeddings.weight.device):
        if strict:
            raise NotSupported(f"torch.compile: {why}")
        out.warnings.append(f"not compiling: {why}; serving the eager path (install g++, or pass --no-compile)")
        return
    t0 = time.perf_counter()
    try:
        model.compile_inference()  # warms up too, so the first request does not pay for it
    except Exception as e:  # an optimisation: serve eagerly rather than not at all
        if strict:
            raise NotSupported(f"torch.compile ({type(e).__name__})") from e
        out.warnings.append(f"torch.compile failed ({type(e).__name__}: {str(e)[:300]}); decoding eagerly")
        return
    out.compiled = True
    out.notes.append(f"compiled the decode step and the prefill scan in {time.perf_counter() - t0:.1f} s")


def configure_cpu_for_serving() -> None:
    """Process-wide settings for serving on a CPU, which the server and the benchmarks apply after
    prepare_for_inference (that one only changes the model, so a test process that prepares models keeps its
    own settings). The allocator keeps freed memory for the next activations (build.py). Denormals flush to zero
    on this thread, its intra-op threads and the threads it starts (the engine's thread inherits it): the SSD's
    decays reach 1e-38 and below, where x86 arithmetic takes slow microcode assists (chunk matmuls 3x slower)
    for values far below what the fp32 sums they enter can hold."""
    reuse_freed_memory()
    torch.set_flush_denormal(True)
    gemv.flush_denormals()


def prepare_for_inference(model: nn.Module, speedups: Speedups = Speedups(), strict: bool = False) -> Prepared:
    """Apply `speedups` to a loaded model in place, in the order they compose: the projections' form, then
    huge pages (which move the final weights), then compiling (which traces the final modules)."""
    out = Prepared()
    _linears(model, speedups, strict, out)
    if model.embeddings.weight.device.type == "cuda" and model.moe_layers() and use_static_dispatch(model):
        out.notes.append("MoE decode: static dispatch, no host synchronisation")
    if speedups.huge_pages and (moved := use_huge_pages(model)):  # CPU weights only: 0 on a GPU
        out.huge_page_bytes = moved
        backed = huge_page_bytes(model.embeddings.weight)
        out.notes.append(f"weights in transparent huge pages: {moved >> 20} MiB moved, {backed >> 20} MiB backed")
    if speedups.compile:
        _compile(model, strict, out)
    return out
