"""Decode steps replayed as CUDA graphs: one graph per padded batch size and attention extent, over the state
pool's own memory.

Glossary: n running sequences, b a captured batch size (the smallest >= n serves), X a captured extent: the
positions attention layers attend over (the smallest >= the longest row's after the step), V vocab.

Why: on a GPU, a decode step of a model this size is hundreds of small kernels, each launched from Python for
a few microseconds of CPU time, and the GPU idles between them; a CUDA graph launches the whole step at once.
A graph reads and writes fixed addresses: its token input (b,), the pool's first b rows (the pool is allocated
once, so their addresses never move), with paged K/V the pool's blocks and the first X / bs columns of its
block table (a view of the table's memory, so a replay sees the current table), and its logits output (b, V).
A step of n sequences copies its tokens into the graph of the smallest b >= n and replays it. Rows n..b-1 are
free: the step overwrites their fixed state (the pool writes a row's whole state when it hands the row out),
and their K/V writes land in the pool's scratch block, where every table entry no sequence owns points.

Every batch size is captured at startup at the smallest extent, while the pool is empty. A larger extent is
captured when a step first needs it: the running rows' own state is copied aside, the capture and its check
run on it, and the copy is put back. Each graph is checked once against the uncaptured step on the same inputs
before it serves; an error or a mismatch logs a warning and the engine decodes without graphs from then on.
A step can be captured only if it never waits on the host: MoE layers need the static dispatch (model/moe.py),
which the loader gives them on CUDA; attention takes its extent from the table it is given (model/attention.py).

`EagerGraph` stands in for a CUDA graph where there is none: it records the step as a function and replays it
by calling it again on the same buffers, so everything above but CUDA itself runs in the CPU tests.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from model import HybridLM
from model.sampling import upload
from model.state import ModelState

from .state_pool import StatePool

log = logging.getLogger("aetheris.engine")


def batch_sizes(max_batch: int) -> list[int]:
    """The captured sizes: powers of two below max_batch, then max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


def extents(pool: StatePool, smallest: int = 16) -> list[int]:
    """The captured attention extents: powers of two from `smallest` (a K/V block, when paged) up to the pool's
    capacity, then the capacity. One extent, 1, for a model without growing state."""
    if not pool.grows:
        return [1]
    smallest = pool.paged.block_size if pool.paged else smallest
    return [x for x in batch_sizes(pool.capacity) if x >= min(smallest, pool.capacity)]


def why_not(model: HybridLM, cuda: bool = True) -> str | None:
    """Why this model's decode step cannot be replayed as a graph, or None. `cuda=False`: as an EagerGraph."""
    if any(not moe.static_dispatch for moe in model.moe_layers().values()):
        return "its MoE layers dispatch experts with the CPU in the loop (packed or quantized experts)"
    if cuda and model.embeddings.weight.device.type != "cuda":
        return "not on a CUDA device"
    return None


class CudaGraph:
    """A function's kernels, recorded once after two warm-up runs (which compile, autotune and allocate
    workspaces off the capture), then replayed."""

    def __init__(self, mempool) -> None:
        self.graph, self.mempool = torch.cuda.CUDAGraph(), mempool

    def record(self, fn) -> Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self.graph, pool=self.mempool):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


class EagerGraph:
    """CudaGraph's stand-in without a GPU: replaying calls the function again and writes its output in place."""

    def __init__(self, mempool=None) -> None:
        self.fn, self.out = None, None

    def record(self, fn) -> Tensor:
        self.fn, self.out = fn, fn()
        return self.out

    @torch.inference_mode()
    def replay(self) -> None:
        self.out.copy_(self.fn())


@dataclass
class Graph:
    graph: CudaGraph | EagerGraph
    tokens: Tensor  # (b,) the input the replay reads
    logits: Tensor  # (b, V) the output the replay writes


class DecodeGraphs:
    def __init__(self, model: HybridLM, pool: StatePool, sizes: list[int], graph=CudaGraph) -> None:
        """Capture and check a graph per size at the smallest extent (the pool must be empty)."""
        self.model, self.pool, self.sizes, self.make = model, pool, sorted(sizes), graph
        self.extents = extents(pool)
        self.device = model.embeddings.weight.device
        self.mempool = torch.cuda.graph_pool_handle() if graph is CudaGraph else None  # shared intermediates
        self.graphs: dict[tuple[int, int], Graph] = {}
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
            self.graphs[b, self.extents[0]] = self._capture(b, self.extents[0], randomize=True)

    def _own(self, b: int, x: int) -> ModelState:
        """The first b rows' own tensors at extent x, as a view (the paged block pool is shared, not theirs)."""
        return self.pool.state.rows(slice(0, b)).narrowed(x)

    @torch.inference_mode()
    def _capture(self, b: int, x: int, randomize: bool = False) -> Graph:
        """Record the step of b rows at extent x and check it, leaving the rows' state as it found it."""
        rows, own = self.pool.view(b, x), self._own(b, x)
        if randomize:  # a state that is not all zeros, so the check exercises the update
            for _, t, _ in own.items():
                if t.is_floating_point():
                    t.normal_()
        start = own.clone()
        tokens = torch.arange(b, device=self.device) % self.model.config.vocab_size
        try:
            graph = self.make(self.mempool)
            captured = Graph(graph, tokens, graph.record(lambda: self.model.decode(tokens, rows, out=rows)[0]))
            own.copy_rows_(slice(None), start)
            self._check(captured, rows, own, start)
        finally:
            own.copy_rows_(slice(None), start)
        return captured

    def _check(self, g: Graph, rows: ModelState, own: ModelState, start: ModelState) -> None:
        """One replay against the uncaptured step from the same state and tokens: logits and new state equal."""
        g.graph.replay()
        got, got_state = g.logits.clone(), own.clone()
        own.copy_rows_(slice(None), start)
        want, _ = self.model.decode(g.tokens, rows, out=rows)
        b = g.tokens.shape[0]
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3, msg=f"graph of batch {b}: logits")
        for (_, a, layer), (_, ref, _) in zip(got_state.items(), own.items()):
            torch.testing.assert_close(a, ref, atol=1e-3, rtol=1e-3, msg=f"graph of batch {b}: layer {layer}")

    def decode(self, tokens: list[int]) -> Tensor | None:
        """One step of the pool's first n = len(tokens) rows -> logits (n, V); None (logged) where a graph it
        needs cannot be captured. The sizes and extents end at the pool's, so a graph always fits."""
        n, held = len(tokens), max(self.pool.held, default=0) + 1
        b = next(b for b in self.sizes if b >= n)
        x = next((x for x in self.extents if x >= held), self.extents[-1])
        if (b, x) not in self.graphs:
            t0 = time.perf_counter()
            try:
                self.graphs[b, x] = self._capture(b, x)
            except Exception as e:
                if isinstance(e, torch.AcceleratorError):
                    raise
                log.warning("decoding without CUDA graphs from now on: %s: %s", type(e).__name__, str(e)[:300])
                return None
            log.info("CUDA graphs: captured batch %d at extent %d in %.2f s", b, x, time.perf_counter() - t0)
        g = self.graphs[b, x]
        g.tokens[:n].copy_(upload(torch.tensor(tokens), self.device))
        g.graph.replay()
        return g.logits[:n].clone()  # the next replay overwrites the buffer; snapshots may keep these logits


def capture(model: HybridLM, pool: StatePool, max_batch: int, graph=CudaGraph) -> DecodeGraphs | None:
    """DecodeGraphs for this model and pool, or None (logged) where a graph cannot serve."""
    if (why := why_not(model, cuda=graph is CudaGraph)) is not None:
        if model.embeddings.weight.device.type == "cuda":
            log.info("decoding without CUDA graphs: %s", why)
        return None
    t0 = time.perf_counter()
    try:
        graphs = DecodeGraphs(model, pool, batch_sizes(max_batch), graph)
    except Exception as e:  # capture unsupported by some kernel, or a replay that differs from the step
        log.warning("decoding without CUDA graphs: %s: %s", type(e).__name__, str(e)[:300])
        return None
    log.info(
        "CUDA graphs: decode captured for batch sizes %s in %.1f s (extents up to %d captured when first needed)",
        graphs.sizes, time.perf_counter() - t0, graphs.extents[-1],
    )  # fmt: skip
    return graphs
