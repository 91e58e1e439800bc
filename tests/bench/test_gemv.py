import math

import torch

from bench import gemv


def test_stream_rates_cover_every_kernel_shape_and_thread_count():
    shapes = {"a": (64, 32), "b": (16, 128)}
    for dtype in (torch.float32, torch.bfloat16):
        rows = gemv.stream_rates(dtype, shapes, threads=(1, 2), total_bytes=1 << 16)
        kernels = list(gemv.kernels(dtype))
        assert [(k, s, n) for k, s, n, _ in rows] == [(k, s, n) for s in shapes for k in kernels for n in (1, 2)]
        assert all(math.isfinite(rate) and rate > 0 for *_, rate in rows)
        assert set(gemv.call_overheads(dtype, n=10)) == {*kernels, "x + 1"}
