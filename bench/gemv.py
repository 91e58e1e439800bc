"""How fast one-row projections stream their weights: the batch-1 decode step is these GEMVs plus overhead.

For each projection shape of the 130m-size model (in_proj, out_proj, x_proj, the LM head) and each kernel the
engine can call (MKL through F.linear, oneDNN with a packed weight, our few-row kernel), GB/s of weight read
at M = 1 with 1 and 2 threads, cycling through enough copies (~300 MB) that they come from memory, not the
cache; then the cost of one call on a tiny weight (the per-call overhead) beside a one-element add. Compare
with the read bandwidth line printed first (a plain sum over 1 GiB). Last, the quantized kernels against the
bf16 one on Granite-4.0-H-shaped projections at M = 1 (bf16 tokens, 2 threads): microseconds a call, GB/s of
their own bytes, and the speed-up over bf16 that their bytes would allow (2x int8, 3.8x int4) beside the one
they reach.

    python -m bench.gemv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import best_seconds, read_bandwidth
from model import gemv
from model.int4 import quantize_int4
from model.packed import packable_dtype
from model.quantized import quantize_rows

SHAPES = {"in_proj": (3072, 768), "out_proj": (768, 1536), "x_proj": (80, 1536), "lm_head": (50280, 768)}


def kernels(dtype: torch.dtype) -> dict:
    """{name: (prepare weight, call)} for the kernels this CPU has in `dtype`."""
    out = {"F.linear": (lambda w: w, F.linear)}
    if gemv.load():
        out["few-row kernel"] = (lambda w: w, lambda x, w: torch.ops.aetheris_gemv.linear(x, w, None))
    if packable_dtype(dtype):
        out["oneDNN packed"] = (
            torch.ops.mkldnn._reorder_linear_weight,
            lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
        )
    return out


def seconds_per_call(call, x, weights: list, reps: int = 3) -> float:
    return best_seconds(lambda: [call(x, w) for w in weights], reps) / len(weights)


@torch.inference_mode()
def stream_rates(
    dtype: torch.dtype, shapes: dict = SHAPES, threads=(1, 2), total_bytes: int = 300_000_000
) -> list[tuple]:
    """[(kernel, shape name, threads, GB/s)] at M = 1."""
    rows, before = [], torch.get_num_threads()
    try:
        for shape_name, (o, i) in shapes.items():
            nbytes = o * i * torch.finfo(dtype).bits // 8
            plain = [torch.randn(o, i).to(dtype) for _ in range(max(2, total_bytes // nbytes))]
            x = torch.randn(1, i).to(dtype)
            for name, (prepare, call) in kernels(dtype).items():
                weights = [prepare(w) for w in plain]
                for n in threads:
                    torch.set_num_threads(n)
                    rows.append((name, shape_name, n, nbytes / seconds_per_call(call, x, weights) / 1e9))
    finally:
        torch.set_num_threads(before)
    return rows


@torch.inference_mode()
def call_overheads(dtype: torch.dtype, n: int = 5000) -> dict[str, float]:
    """Microseconds per call on a 128 x 64 weight (no bandwidth involved), and for `x + 1`."""
    w, x = torch.randn(128, 64).to(dtype), torch.randn(1, 64).to(dtype)
    out = {}
    for name, (prepare, call) in kernels(dtype).items():
        weight = prepare(w)
        out[name] = seconds_per_call(call, x, [weight] * n, reps=2) * 1e6
    out["x + 1"] = seconds_per_call(lambda x, _: x + 1, x, [None] * n, reps=2) * 1e6
    return out


QUANTIZED_SHAPES = {"mamba in_proj": (4384, 1024), "expert up": (512, 1024), "expert down": (1024, 512)}


@torch.inference_mode()
def quantized_rates(shapes: dict = QUANTIZED_SHAPES, total_bytes: int = 400_000_000) -> list[tuple]:
    """[(shape name, format, microseconds a call, GB/s of its bytes, speed-up over bf16)] at M = 1."""
    ops, rows = torch.ops.aetheris_gemv, []
    formats = {
        "bf16": (lambda w: (w.bfloat16(),), lambda x, w: ops.linear(x, w[0], None), 2.0),
        "int8": (quantize_rows, lambda x, w: ops.int8_mm(x, *w), 1 + 4 / 1024),
        "int4": (quantize_int4, lambda x, w: ops.int4_mm(x, *w, 64), 0.5 + 2 / 64),
    }
    for shape_name, (o, i) in shapes.items():
        x = torch.randn(1, i).bfloat16()
        bf16_s = None
        for name, (make, call, bytes_per_weight) in formats.items():
            weights = [make(torch.randn(o, i)) for _ in range(max(2, int(total_bytes / (o * i * bytes_per_weight))))]
            s = seconds_per_call(call, x, weights)
            bf16_s = bf16_s or s
            rows.append((shape_name, name, s * 1e6, o * i * bytes_per_weight / s / 1e9, bf16_s / s))
    return rows


def main() -> None:
    torch.set_num_threads(2)
    print(f"read bandwidth (sum over 1 GiB, 2 threads): {read_bandwidth() / 1e9:.1f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, n, rate in stream_rates(dtype):
            print(f"{str(dtype)[6:]:9s} {name:14s} {shape:9s} {n} thread(s): {rate:5.1f} GB/s")
        costs = ", ".join(f"{k} {v:.1f} us" for k, v in call_overheads(dtype).items())
        print(f"{str(dtype)[6:]:9s} one call on a 128 x 64 weight: {costs}")
    if gemv.load():
        for shape, name, us, rate, speedup in quantized_rates():
            print(f"{shape:13s} {name}: {us:7.1f} us, {rate:5.1f} GB/s, {speedup:.2f}x bf16")


if __name__ == "__main__":
    main()
