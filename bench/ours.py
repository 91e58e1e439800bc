"""Our engine, offline: decode through EngineCore (scheduler, state pool, sampling included), prefill and the
O(1) check through the model."""

from __future__ import annotations

import time

import torch

from model import HybridLM
from model.tokenizer import Tokenizer
from server.engine.core import CoreConfig, EngineCore
from server.engine_io import GenerationRequest, SamplingParams


def decode_tokens_per_s(
    model: HybridLM,
    tok: Tokenizer,
    batch: int,
    new_tokens: int = 128,
    prompt_len: int = 16,
    grammar=None,
    cuda_graphs: bool = True,
) -> float:
    """B greedy sequences of `new_tokens` after a short prompt (each under `grammar` when given, a compiled
    server.engine.grammar spec); only iterations where all B decode count. On a GPU the engine replays CUDA graphs
    as the server does, unless `cuda_graphs` is False; asked for and not serving, they raise."""
    # K/V (attention layers) paged as the server keeps it, with blocks for every sequence's whole length
    blocks = batch * -(-(prompt_len + new_tokens) // 16)
    cfg = CoreConfig(
        max_batch_size=batch,
        prefill_budget=batch * prompt_len,
        state_cache_bytes=0,
        max_model_len=prompt_len + new_tokens,
        kv_blocks=blocks,
        cuda_graphs=cuda_graphs,
    )
    core = EngineCore(model, tok, cfg)
    done = []
    for i in range(batch):
        prompt = [(7 * i + j) % min(tok.vocab_size, model.config.vocab_size) for j in range(prompt_len)]
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, grammar=grammar)
        core.add(GenerationRequest(f"b{i}", prompt, params), lambda out: out.finished and done.append(out))
    while len(core.running) < batch:
        core.step()
    tokens, t0 = 0, time.perf_counter()
    while len(core.running) == batch:
        core.step()
        tokens += batch
    seconds = time.perf_counter() - t0
    while core.has_work():
        core.step()
    assert len(done) == batch
    if cuda_graphs and model.embeddings.weight.device.type == "cuda" and core.runner.graphs is None:
        raise RuntimeError("CUDA graphs were asked for but did not serve (the server log says why)")
    return tokens / seconds


@torch.inference_mode()
def prefill_tokens_per_s(model: HybridLM, length: int) -> float:
    tokens = torch.randint(0, model.config.vocab_size, (1, length), device=model.embeddings.weight.device)
    model.prefill(tokens, model.empty_state(1))  # warm, as a serving process is: allocations, compiled shapes
    t = time.perf_counter()
    logits, _ = model.prefill(tokens, model.empty_state(1))
    logits.cpu()  # waits for the device to finish (CUDA runs asynchronously)
    return length / (time.perf_counter() - t)


@torch.inference_mode()
def decode_latency_at(model: HybridLM, position: int, steps: int = 32) -> float:
    """Median seconds of one decode step after `position` tokens of one sequence."""
    tokens = torch.randint(0, model.config.vocab_size, (1, position))
    _, state = model.prefill(tokens, model.empty_state(1))
    tok = torch.tensor([1])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        _, state = model.decode(tok, state)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
