"""Decode through graphs (server/engine/cuda_graphs.py): which models and sizes get graphs; the decode step of
every layout reads nothing back from the device (what capture needs); the engine through the graph machinery
(EagerGraph on the CPU: padded batches, extents captured while sequences run, the scratch K/V block) writes
what it writes without; and, on a GPU, the same through real CUDA graphs. The GPU tests skip, saying so, where
no GPU is present (bench/gpu_check.sh runs them where there is one)."""

import random

import pytest
import torch

from model import HybridLM
from model.config import LayerSpec
from model.moe import use_static_dispatch
from server.engine import cuda_graphs
from server.engine.core import CoreConfig, EngineCore
from server.engine.state_pool import StatePool
from server.engine_io import GenerationRequest, SamplingParams
from server.metrics import Metrics
from tests.helpers import HostReads, tiny_config, toy_tokenizer

OWN = {
    "mamba2-mlp": dict(
        layers=[LayerSpec("mamba2", "mlp"), LayerSpec("mamba2", None)], d_ff=40, mamba2_head_dim=8, n_groups=2
    ),
    "mamba-attention": dict(layers=[LayerSpec("mamba", None), LayerSpec("attention", None)], n_heads=4),
}
# Every kind of layer: Mamba-1 / Mamba-2, attention, softmax and sigmoid MoE with shared experts, dense MLPs.
GRAPHED = ["mamba", "mamba2-mlp", "hybrid", "mamba2-hybrid", "nemotron-h"]
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")


def _model(layout: str, vocab: int = 97, static: bool = True) -> HybridLM:
    kw = OWN.get(layout, {})
    model = HybridLM(tiny_config(vocab, None if kw else layout, **kw)).eval()
    if static:
        use_static_dispatch(model)
    return model


def test_batch_sizes_cover_every_count_up_to_the_pool():
    assert cuda_graphs.batch_sizes(1) == [1]
    assert cuda_graphs.batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert cuda_graphs.batch_sizes(12) == [1, 2, 4, 8, 12]
    for max_batch in range(1, 70):
        sizes = cuda_graphs.batch_sizes(max_batch)
        assert all(any(b >= n for b in sizes) for n in range(1, max_batch + 1)) and max(sizes) == max_batch


def test_extents_run_from_a_block_to_the_context():
    model = _model("hybrid")
    cpu = torch.device("cpu")
    assert cuda_graphs.extents(StatePool(model, 2, cpu, 40, kv_blocks=8, block_size=4)) == [4, 8, 16, 32, 40]
    assert cuda_graphs.extents(StatePool(model, 2, cpu, 40)) == [16, 32, 40]
    assert cuda_graphs.extents(StatePool(model, 2, cpu, 8)) == [8]
    assert cuda_graphs.extents(StatePool(_model("mamba"), 2, cpu)) == [1]


@pytest.mark.parametrize(
    "layout, cuda, reason",
    [("mamba", True, "not on a CUDA device"), ("hybrid", True, "not on a CUDA"), ("mamba-attention", False, None)],
)
def test_which_models_a_graph_can_serve(layout, cuda, reason):
    why = cuda_graphs.why_not(_model(layout), cuda=cuda)
    assert why is None if reason is None else reason in why
    grouped = _model("hybrid", static=False)  # the MoE dispatch that reads expert counts back to the host
    assert "MoE" in cuda_graphs.why_not(grouped, cuda=False)


def test_the_cpu_engine_captures_nothing():
    tok = toy_tokenizer()
    model = _model("mamba", tok.vocab_size)
    assert EngineCore(model, tok, CoreConfig(max_batch_size=4, prefill_budget=16)).runner.graphs is None


@pytest.mark.parametrize("kv_blocks", [0, 64], ids=["contiguous", "paged"])
@pytest.mark.parametrize("layout", GRAPHED)
@torch.inference_mode()
def test_the_decode_step_reads_nothing_back_from_the_device(layout, kv_blocks):
    """One decode step of running rows of different lengths, as the engine calls it, under HostReads: no read
    (no .item(), .tolist(), nonzero, bincount ...), so a GPU never waits and the step can be captured. The
    grouped MoE dispatch, which does read its expert counts, is caught by the same check."""
    model = _model(layout)
    pool = StatePool(model, 4, torch.device("cpu"), 64, kv_blocks, block_size=4)
    for n in (5, 9, 2):
        _, state = model.prefill(torch.randint(0, 97, (1, n)), model.empty_state(1))
        pool.add([_Seq()], state, n, reserve=n + 4)
    rows = pool.view()
    with HostReads() as reads:
        model.decode(torch.tensor([1, 2, 3]), rows, out=rows)
    assert reads.reads == []
    if model.moe_layers():
        use_static_dispatch(model)
        for moe in model.moe_layers().values():
            moe.static_dispatch = False
        with HostReads() as reads:
            model.decode(torch.tensor([1, 2, 3]), rows, out=rows)
        assert "tolist" in reads.reads


class _Seq:
    slot = -1


def _outputs(model, tok, cfg: CoreConfig, prompts, lengths) -> tuple[dict, EngineCore]:
    core = EngineCore(model, tok, cfg)
    out: dict[str, list[int]] = {}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        req = GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        core.add(req, lambda o: [out.setdefault(o.request_id, []).extend(d.token_ids) for d in o.deltas])
    while core.has_work():
        core.step()
    return out, core


def _prompts() -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 300) for _ in range(rng.randrange(1, 20))] for _ in range(9)]
    return prompts, [rng.randrange(1, 24) for _ in prompts]


@pytest.mark.parametrize("kv_blocks", [0, 128], ids=["contiguous", "paged"])
@pytest.mark.parametrize("layout", GRAPHED)
def test_the_engine_through_graphs_writes_what_it_writes_without(layout, kv_blocks, monkeypatch):
    """The engine's side of graphs on the CPU: every decode step goes through DecodeGraphs with EagerGraph, so
    steps are padded to a captured size (free rows past the running ones overwritten, their K/V sent to the
    scratch block) and longer extents are captured while sequences run (their state put back). The greedy
    tokens equal the plain engine's while sequences join and finish."""
    tok = toy_tokenizer()
    model = _model(layout, tok.vocab_size)
    prompts, lengths = _prompts()
    cfg = dict(max_batch_size=6, prefill_budget=64, max_model_len=64, kv_blocks=kv_blocks, kv_block_size=4)
    want, _ = _outputs(model, tok, CoreConfig(**cfg, cuda_graphs=False), prompts, lengths)
    eager = lambda m, pool, n: cuda_graphs.capture(m, pool, n, cuda_graphs.EagerGraph)  # noqa: E731
    monkeypatch.setattr("server.engine.model_runner.capture", eager)
    got, core = _outputs(model, tok, CoreConfig(**cfg, cuda_graphs=True), prompts, lengths)
    graphs = core.runner.graphs
    assert graphs is not None and got == want
    captured = sorted(graphs.graphs)
    assert {b for b, _ in captured} == {1, 2, 4, 6}
    if model.config.attention_layers:  # prompts up to 19 tokens + up to 23 new: extents captured mid-run
        assert {x for _, x in captured} >= {graphs.extents[0], 32}, captured


@torch.inference_mode()
def test_one_engine_step_reads_back_once(monkeypatch):
    """A decode step of the engine with every sampling feature a request can ask for but logprobs (penalties,
    logit bias, top-k / top-p, seeded and unseeded draws, greedy rows) and with metrics reads from the device
    once: the tokens and the rows whose logits were NaN, together."""
    tok = toy_tokenizer()
    model = _model("hybrid", tok.vocab_size)
    cfg = CoreConfig(max_batch_size=4, max_model_len=64, kv_blocks=64, kv_block_size=4)
    monkeypatch.setattr("server.metrics.EXPERTS_READ_S", 3600.0)  # its once-a-second read of the routing counts
    core = EngineCore(model, tok, cfg, metrics=Metrics())
    params = [
        SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=20, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.7, logit_bias={5: 3.0, 9: -100.0}, ignore_eos=True),
    ]
    for i, p in enumerate(params):
        core.add(GenerationRequest(f"r{i}", [5 + i, 6, 7], p), lambda o: None)
    while len(core.runner.running) < 4:
        core.step()
    for _ in range(3):
        with HostReads() as reads:
            core.step()
        assert reads.reads == ["tolist"]


@needs_gpu
@pytest.mark.parametrize("layout", GRAPHED)
def test_the_decode_step_never_synchronises_on_a_gpu(layout):
    tok = toy_tokenizer()
    model = _model(layout, tok.vocab_size).to("cuda")
    pool = StatePool(model, 4, torch.device("cuda"), 64, 64, block_size=4)
    _, state = model.prefill(torch.tensor([[5, 6, 7]], device="cuda"), model.empty_state(1, "cuda"))
    pool.add([_Seq(), _Seq()], state, 3, reserve=8)
    rows, tokens = pool.view(), torch.tensor([1, 2], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.decode(tokens, rows, out=rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
@pytest.mark.parametrize("kv_blocks", [0, 128], ids=["contiguous", "paged"])
@pytest.mark.parametrize("layout", GRAPHED)
def test_the_engine_on_graphs_writes_what_it_writes_without(layout, kv_blocks):
    """As the EagerGraph test, through real CUDA graphs (fp32: a padded batch may take other GEMM kernels, which
    in bf16 can flip a near-tie); the graphs must be active, or the test fails."""
    tok = toy_tokenizer()
    model = _model(layout, tok.vocab_size).to("cuda")
    prompts, lengths = _prompts()
    cfg = dict(max_batch_size=6, prefill_budget=64, max_model_len=64, kv_blocks=kv_blocks, kv_block_size=4)
    want, plain = _outputs(model, tok, CoreConfig(**cfg, cuda_graphs=False), prompts, lengths)
    got, graphed = _outputs(model, tok, CoreConfig(**cfg, cuda_graphs=True), prompts, lengths)
    assert plain.runner.graphs is None and graphed.runner.graphs is not None
    assert {b for b, _ in graphed.runner.graphs.graphs} == {1, 2, 4, 6}
    assert got == want


@needs_gpu
@pytest.mark.parametrize("layout", GRAPHED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_padded_graph_steps_as_the_plain_step(layout, dtype):
    """n rows through the graph of the smallest captured size >= n (rows n..b-1 are padding) against the plain
    decode of the same n rows from the same state: logits and new states close."""
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    model = _model(layout).cast(dtype).to("cuda")
    pool = StatePool(model, 6, torch.device("cuda"), 32, 16, block_size=4)
    graphs = cuda_graphs.DecodeGraphs(model, pool, cuda_graphs.batch_sizes(6))
    _, state = model.prefill(torch.tensor([[5, 6, 7]], device="cuda"), model.empty_state(1, "cuda"))
    for n in range(1, 7):
        pool.add([_Seq()], state, 3, reserve=8)
        own = pool.state.rows(slice(0, n))
        start = own.clone()
        ids = [(7 * i + 3) % 97 for i in range(n)]
        got, got_state = graphs.decode(ids), own.clone()
        own.copy_rows_(slice(None), start)
        rows = pool.view()
        want, _ = model.decode(torch.tensor(ids, device="cuda"), rows, out=rows)
        torch.testing.assert_close(got, want, **tol)
        for (_, a, layer), (_, b, _) in zip(got_state.items(), own.items()):
            torch.testing.assert_close(a.float(), b.float(), **tol, msg=f"n={n}, layer {layer}")
        own.copy_rows_(slice(None), start)


@needs_gpu
def test_graphs_on_the_compiled_model():
    tok = toy_tokenizer()
    model = _model("mamba2-hybrid", tok.vocab_size).to("cuda")
    cfg = dict(max_batch_size=4, max_model_len=64, kv_blocks=64, kv_block_size=4)
    want, _ = _outputs(model, tok, CoreConfig(**cfg, cuda_graphs=False), [[5, 6, 7], [8, 9]], [12, 7])
    model.compile_inference()
    got, graphed = _outputs(model, tok, CoreConfig(**cfg, cuda_graphs=True), [[5, 6, 7], [8, 9]], [12, 7])
    assert graphed.runner.graphs is not None and got == want
