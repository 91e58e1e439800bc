"""Decode through CUDA graphs (server/cuda_graphs.py): which models and sizes get graphs, and, on a GPU, the
engine's outputs with graphs equal to those without. The GPU tests skip, saying so, where no GPU is present
(bench/gpu_check.sh runs them where there is one)."""

import random

import pytest
import torch

from model import HybridLM
from model.config import LayerSpec
from server.engine import cuda_graphs
from server.engine.core import CoreConfig, EngineCore
from server.engine.state_pool import StatePool
from server.engine_io import GenerationRequest, SamplingParams
from tests.helpers import tiny_config, toy_tokenizer

# Graph-eligible layouts (no MoE, no attention): Mamba-1, and Mamba-2 with a dense MLP.
LAYOUTS = {
    "mamba": dict(layers=[LayerSpec("mamba", None)] * 3),
    "mamba2-mlp": dict(
        layers=[LayerSpec("mamba2", "mlp"), LayerSpec("mamba2", None)], d_ff=40, mamba2_head_dim=8, n_groups=2
    ),
}
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")


def test_batch_sizes_cover_every_count_up_to_the_pool():
    assert cuda_graphs.batch_sizes(1) == [1]
    assert cuda_graphs.batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert cuda_graphs.batch_sizes(12) == [1, 2, 4, 8, 12]
    for max_batch in range(1, 70):
        sizes = cuda_graphs.batch_sizes(max_batch)
        assert all(any(b >= n for b in sizes) for n in range(1, max_batch + 1)) and max(sizes) == max_batch


NO_GRAPH = {"mamba-attention": dict(layers=[LayerSpec("mamba", None), LayerSpec("attention", None)], n_heads=4)}


def _model(layout: str, vocab: int = 97) -> HybridLM:
    kw = {**LAYOUTS, **NO_GRAPH}.get(layout, {})
    return HybridLM(tiny_config(vocab, None if kw else layout, **kw)).eval()


@pytest.mark.parametrize(
    "layout, reason",
    [
        ("mamba", "not on a CUDA device"),
        ("mamba2-mlp", "not on a CUDA"),
        ("moe-mamba", "MoE"),
        ("mamba-attention", "K/V"),
    ],
)
def test_which_models_a_graph_cannot_serve(layout, reason):
    assert reason in cuda_graphs.why_not(_model(layout))


def test_the_cpu_engine_captures_nothing():
    tok = toy_tokenizer()
    model = _model("mamba", tok.vocab_size)
    assert EngineCore(model, tok, CoreConfig(max_batch_size=4, prefill_budget=16)).runner.graphs is None


def _outputs(model, tok, cuda_graphs_on: bool, prompts, lengths) -> tuple[dict, EngineCore]:
    core = EngineCore(model, tok, CoreConfig(max_batch_size=6, prefill_budget=64, cuda_graphs=cuda_graphs_on))
    out: dict[str, list[int]] = {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        req = GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        core.add(req, lambda o: [out.setdefault(o.request_id, []).extend(d.token_ids) for d in o.deltas])
    while core.has_work():
        core.step()
    return out, core


class PaddedSteps:
    """What a DecodeGraphs replay does, without a GPU: the step of the smallest size >= n over the pool's first
    rows, tokens padded with zeros, logits of the first n rows."""

    def __init__(self, model, pool, sizes: list[int]) -> None:
        self.model, self.pool, self.sizes, self.calls = model, pool, sizes, 0

    def decode(self, ids: list[int]):
        b = next(b for b in self.sizes if b >= len(ids))
        rows = self.pool.state.rows(slice(0, b))
        tokens = torch.tensor(ids + [0] * (b - len(ids)), device=self.model.embeddings.weight.device)
        self.calls += 1
        return self.model.decode(tokens, rows, out=rows)[0][: len(ids)].clone()


def _prompts() -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randrange(1, 20))] for _ in range(9)]
    return prompts, [rng.randrange(1, 24) for _ in prompts]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_engine_through_padded_steps_writes_what_it_writes_without(layout, monkeypatch):
    """The engine's side of graphs on the CPU: every decode step goes to `decode(ids)` (a stand-in that pads as
    the graphs do, so free rows past the running ones get overwritten), and the greedy tokens equal the plain
    engine's while sequences join and finish."""
    tok = toy_tokenizer()
    model = _model(layout, tok.vocab_size)
    prompts, lengths = _prompts()
    want, _ = _outputs(model, tok, False, prompts, lengths)
    monkeypatch.setattr("server.engine.model_runner.capture", lambda m, pool, n: PaddedSteps(m, pool, [1, 2, 4, 6]))
    got, core = _outputs(model, tok, True, prompts, lengths)
    assert core.runner.graphs.calls >= max(lengths) - 1 and got == want  # the first token is from the prefill


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_engine_on_graphs_writes_what_it_writes_without(layout):
    """Sequences join and finish at different steps, so the running count passes through sizes that are and are
    not captured (padded rows); the greedy tokens equal the engine's without graphs (fp32: a padded batch may
    take other GEMM kernels, which in bf16 can flip a near-tie; the next test covers bf16 with a tolerance)."""
    tok = toy_tokenizer()
    model = _model(layout, tok.vocab_size).to("cuda")
    prompts, lengths = _prompts()
    want, plain = _outputs(model, tok, False, prompts, lengths)
    got, graphed = _outputs(model, tok, True, prompts, lengths)
    assert plain.runner.graphs is None
    assert [g.tokens.shape[0] for g in graphed.runner.graphs.graphs] == [1, 2, 4, 6]
    assert got == want


@needs_gpu
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_graph_steps_as_the_plain_step(layout, dtype):
    """n rows through the graph of the smallest captured size >= n (rows n..b-1 are padding) against the plain
    decode of the same n rows from the same state: logits and new states close."""
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    model = _model(layout).cast(dtype).to("cuda")
    pool = StatePool(model, 6, torch.device("cuda"))
    graphs = cuda_graphs.DecodeGraphs(model, pool, cuda_graphs.batch_sizes(6))
    for n in range(1, 7):
        rows = pool.state.rows(slice(0, n))
        for _, t, _ in rows.items():
            t.normal_()
        start = rows.clone()
        ids = [(7 * i + 3) % 97 for i in range(n)]
        got, got_state = graphs.decode(ids), rows.clone()
        rows.copy_rows_(slice(None), start)
        want, _ = model.decode(torch.tensor(ids, device="cuda"), rows, out=rows)
        torch.testing.assert_close(got, want, **tol)
        for (_, a, layer), (_, b, _) in zip(got_state.items(), rows.items()):
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=f"n={n}, layer {layer}")


@needs_gpu
def test_graphs_on_the_compiled_model():
    tok = toy_tokenizer()
    model = _model("mamba", tok.vocab_size).to("cuda")
    want, _ = _outputs(model, tok, False, [[5, 6, 7], [8, 9]], [12, 7])
    model.compile_inference()
    got, graphed = _outputs(model, tok, True, [[5, 6, 7], [8, 9]], [12, 7])
    assert graphed.runner.graphs is not None and got == want
