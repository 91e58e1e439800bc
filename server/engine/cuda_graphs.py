"""Decode steps replayed as CUDA graphs: one graph per padded batch size, over the state pool's own rows.

Glossary: n running sequences, b a captured batch size (the smallest >= n serves), V vocab.

Why: on a GPU, a decode step of a model this size is hundreds of small kernels, each launched from Python for
a few microseconds of CPU time, and the GPU idles between them; a CUDA graph launches the whole step at once.
Each graph is captured at startup over static buffers: its token input (b,), the pool's first b rows (the pool
is allocated once, so their addresses never move) and its logits output (b, V). A step of n sequences copies
its tokens into the graph of the smallest b >= n and replays it. Rows n..b-1 are free: the step overwrites
their state, and the pool writes a row's whole state when it hands the row out (StatePool.add).

Steps that cannot be captured keep the uncaptured path: MoE dispatch waits on the CPU for its expert counts,
and attention layers index per-row K/V that grows. Each graph is checked once against the uncaptured step on
the same inputs before it serves; an error or a mismatch logs a warning and the engine decodes without graphs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from model import HybridLM
from model.state import ModelState

from .state_pool import StatePool

log = logging.getLogger("aetheris.engine")


def batch_sizes(max_batch: int) -> list[int]:
    """The captured sizes: powers of two below max_batch, then max_batch itself."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return sizes + [max_batch]


def why_not(model: HybridLM) -> str | None:
    """Why this model's decode step cannot be replayed as a CUDA graph, or None."""
    if model.moe_layers():
        return "its MoE layers dispatch experts with the CPU in the loop"
    if any(spec.seq_axis is not None for layer in model.state_specs() for spec in layer.values()):
        return "its attention layers' K/V grows"
    if model.embeddings.weight.device.type != "cuda":
        return "not on a CUDA device"
    return None


@dataclass
class Graph:
    graph: torch.cuda.CUDAGraph
    tokens: Tensor  # (b,) the input the replay reads
    logits: Tensor  # (b, V) the output the replay writes


class DecodeGraphs:
    def __init__(self, model: HybridLM, pool: StatePool, sizes: list[int]) -> None:
        """Capture and check a graph per size (the pool must be empty: capturing runs steps on its rows)."""
        self.model, self.pool = model, pool
        self.mempool = torch.cuda.graph_pool_handle()  # the graphs' intermediates share one pool
        self.graphs = [self._capture(b) for b in sorted(sizes, reverse=True)][::-1]  # largest first

    def _rows(self, b: int) -> ModelState:
        return self.pool.state.rows(slice(0, b))  # a view: the pool's own memory

    def _capture(self, b: int) -> Graph:
        rows, device = self._rows(b), self.model.embeddings.weight.device
        tokens = torch.zeros(b, dtype=torch.long, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up off the capture (compiles, autotunes, allocates workspaces)
            for _ in range(2):
                self.model.decode(tokens, rows, out=rows)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            logits, _ = self.model.decode(tokens, rows, out=rows)  # (b, V)
        captured = Graph(graph, tokens, logits)
        self._check(captured, b)
        return captured

    def _check(self, g: Graph, b: int) -> None:
        """One replay against the uncaptured step from the same state and tokens: logits and new state equal."""
        rows = self._rows(b)
        for _, t, _ in rows.items():
            t.normal_()  # a state that is not all zeros, so the update is exercised
        start = rows.clone()
        tokens = torch.arange(b, device=g.tokens.device) % self.model.config.vocab_size
        want, _ = self.model.decode(tokens, rows, out=rows)
        want, want_state = want.clone(), rows.clone()
        rows.copy_rows_(slice(None), start)
        g.tokens.copy_(tokens)
        g.graph.replay()
        torch.testing.assert_close(g.logits, want, atol=1e-3, rtol=1e-3, msg=f"CUDA graph of batch {b}: logits")
        for (_, got, layer), (_, ref, _) in zip(rows.items(), want_state.items()):
            torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-3, msg=f"CUDA graph of batch {b}: layer {layer}")

    def decode(self, tokens: list[int]) -> Tensor:
        """One step of the pool's first n = len(tokens) rows -> logits (n, V). The sizes end at the pool's, so a
        graph always fits."""
        n = len(tokens)
        g = next(g for g in self.graphs if g.tokens.shape[0] >= n)
        g.tokens[:n].copy_(torch.tensor(tokens), non_blocking=True)
        g.graph.replay()
        return g.logits[:n].clone()  # the next replay overwrites the buffer; snapshots may keep these logits


def capture(model: HybridLM, pool: StatePool, max_batch: int) -> DecodeGraphs | None:
    """DecodeGraphs for this model and pool, or None (logged) where a graph cannot serve."""
    if (why := why_not(model)) is not None:
        if model.embeddings.weight.device.type == "cuda":
            log.info("decoding without CUDA graphs: %s", why)
        return None
    t0 = time.perf_counter()
    try:
        graphs = DecodeGraphs(model, pool, batch_sizes(max_batch))
    except Exception as e:  # capture unsupported by some kernel, or a replay that differs from the step
        log.warning("decoding without CUDA graphs: %s: %s", type(e).__name__, str(e)[:300])
        return None
    sizes = [g.tokens.shape[0] for g in graphs.graphs]
    log.info("CUDA graphs: decode captured for batch sizes %s in %.1f s", sizes, time.perf_counter() - t0)
    return graphs
