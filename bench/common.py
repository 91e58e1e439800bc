"""Shared benchmark helpers: the machine line, repeat-and-summarise timing, peers in their own process, and the
roofline probes."""

from __future__ import annotations

import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import torch

from model.packed import PackedLinear, can_pack
from model.prepare import Speedups

# Our engine as `python -m server` serves it with each flag (model/prepare.py's Speedups; the defaults are
# the server's: the few-row kernel, weights in huge pages, compiled).
OURS = {
    "ours": Speedups(),
    "ours --pack-weights": Speedups(pack=True),
    "ours --no-pack-weights": Speedups(pack=False),
    "ours --no-compile": Speedups(compile=False),
    "ours --no-huge-pages": Speedups(huge_pages=False),
    "ours --quantize int8": Speedups(quantize="int8"),
}


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


class Crashed(RuntimeError):
    """A measurement's process ended abnormally (a peer's segfault, an abort)."""


def isolated(fn: Callable, *args) -> float:
    """fn(*args) in a fresh process of its own: a peer that crashes there (llama.cpp segfaults inside its AMX
    repacking on some CPUs) ends that process, not the run, and raises Crashed here. `fn` must be importable
    (a module-level function); it times itself, so the process's start does not count."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(fn, *args).result()
        except BrokenProcessPool as e:
            raise Crashed(f"{fn.__module__}.{fn.__name__} crashed (its process ended abnormally)") from e


def interleaved(n: int, runs: dict) -> dict:
    """{key: (fn, *args)} -> {key: summary}, running every key once per round for n rounds. On a shared VM
    whose speed drifts (its memory bandwidth moves with the neighbours' load), round-robin spreads the drift
    over all systems instead of handing it to whichever ran during a slow minute. A key whose run raises
    Crashed is recorded as {"crashed": why} and not run again; the others go on."""
    values: dict = {key: [] for key in runs}
    crashed: dict = {}
    for _ in range(n):
        for key, (fn, *args) in runs.items():
            if key in crashed:
                continue
            try:
                values[key].append(fn(*args))
            except Crashed as e:
                crashed[key] = str(e)
                print(f"{key}: {e}", flush=True)
    return {key: {"crashed": crashed[key]} if key in crashed else summary(v) for key, v in values.items()}


def fmt(stat: dict | None, digits: int = 1) -> str:
    if not stat:
        return "-"
    if "crashed" in stat:
        return "crashed"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}-{stat['max']:.{digits}f})"


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """The fastest of `reps` timed calls of `fn`, after one untimed call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """The machine's matmul FLOP/s: the best of torch.mm (MKL) and oneDNN with a packed weight. MKL does not
    take its AVX-512 path on AMD CPUs, so on Zen torch.mm alone reports half of what the cores do."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = best_seconds(lambda: a @ b, reps)
    linear = torch.nn.Linear(n, n, bias=False, dtype=dtype)
    if can_pack(linear):
        packed = PackedLinear(linear)
        seconds = min(seconds, best_seconds(lambda: packed(a), reps))
    return 2 * n**3 / seconds


def read_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / best_seconds(x.sum, reps)
