"""How fast one-row projections stream their weights: the batch-1 decode step is these GEMVs plus overhead.

For each projection shape of the 130m-size model (in_proj, out_proj, x_proj, the LM head) and each kernel the
engine can call (MKL through F.linear, oneDNN with a packed weight, our few-row kernel), GB/s of weight read
at M = 1 with 1 and 2 threads, cycling through enough copies (~300 MB) that they come from memory, not the
cache; then the cost of one call on a tiny weight (the per-call overhead) beside a one-element add. Compare
with the read bandwidth line printed first (a plain sum over 1 GiB).

    python -m bench.gemv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import best_seconds, read_bandwidth
from model import gemv
from model.packed import packable_dtype

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


def main() -> None:
    torch.set_num_threads(2)
    print(f"read bandwidth (sum over 1 GiB, 2 threads): {read_bandwidth() / 1e9:.1f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, n, rate in stream_rates(dtype):
            print(f"{str(dtype)[6:]:9s} {name:14s} {shape:9s} {n} thread(s): {rate:5.1f} GB/s")
        costs = ", ".join(f"{k} {v:.1f} us" for k, v in call_overheads(dtype).items())
        print(f"{str(dtype)[6:]:9s} one call on a 128 x 64 weight: {costs}")


if __name__ == "__main__":
    main()
