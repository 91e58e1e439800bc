"""Every hybrid family we load (Jamba with attention; Mamba2, Bamba, Granite 4.0-H dense and MoE, Nemotron-H), as a
random HF checkpoint served by a real server process: greedy text equals transformers' greedy loop for concurrent
requests of different lengths, forks and prefix-snapshot resumes equal a fresh run, and the context limit
answers as vLLM does."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from aetheris.serverproc import ServerProcess
from model.checkpoint import load_model
from tests.helpers import FAMILIES, hybrid_jamba, save_hf_family, toy_tokenizer

pytest.importorskip("transformers", reason="transformers is the reference implementation")
MAX_LEN = 96


@pytest.fixture(scope="module", params=["jamba", *FAMILIES])
def hf_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    tok = toy_tokenizer()
    if request.param == "jamba":
        hf = hybrid_jamba(directory, vocab_size=tok.vocab_size)
    else:
        hf = save_hf_family(request.param, directory, tok.vocab_size)
    tok.save(directory)
    return directory, hf, tok


@pytest.fixture(scope="module")
def server(hf_dir):
    s = ServerProcess(hf_dir[0], "--max-batch-size", "4", "--prefill-budget", "7", "--max-model-len", str(MAX_LEN))
    yield s
    s.stop()


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """The obvious loop: HF's full forward without a cache over the whole sequence, argmax, repeat."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def complete(url: str, prompt: list[int], max_tokens: int, **kw) -> dict:
    body = {"model": "x", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}
    r = httpx.post(url + "/v1/completions", json={**body, "model": served_name(url)}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def served_name(url: str) -> str:
    return httpx.get(url + "/v1/models").json()["data"][0]["id"]


def test_concurrent_requests_of_different_lengths_equal_hf_greedy(hf_dir, server):
    _, hf, tok = hf_dir
    prompts = [tok.encode("Once upon a time there was a little cat named Tom."), tok.encode("The sun was warm.")]
    assert len(prompts[0]) != len(prompts[1])
    name = served_name(server.url)

    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            bodies = [
                {"model": name, "prompt": p, "max_tokens": 14, "temperature": 0, "ignore_eos": True} for p in prompts
            ]
            return await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies))

    for p, r in zip(prompts, asyncio.run(both())):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(hf_greedy(hf, p, 14))


def test_fork_and_snapshot_resume_equal_a_fresh_run(hf_dir, server):
    _, hf, tok = hf_dir
    prompt = tok.encode("One day, Lily went to the park with her mom. She saw a big dog.")
    want = tok.decode(hf_greedy(hf, prompt, 10))
    forked = complete(server.url, prompt, 10, n=2)
    assert [c["text"] for c in forked["choices"]] == [want, want]
    longer = prompt + tok.encode(" And then")  # extends the snapshot of `prompt`: resumes its SSM state and K/V
    resumed = complete(server.url, longer, 10)
    assert resumed["usage"]["prompt_tokens_details"]["cached_tokens"] == len(prompt)
    assert resumed["choices"][0]["text"] == tok.decode(hf_greedy(hf, longer, 10))


def test_context_limit(hf_dir, server):
    directory, _, tok = hf_dir
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == MAX_LEN
    prompt = list(range(5, 5 + MAX_LEN - 4))
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": card["id"], "prompt": prompt, "max_tokens": 10, "temperature": 0},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["type"] == "invalid_request_error"
    assert err["message"].startswith(f"This model's maximum context length is {MAX_LEN} tokens")
    assert f"{MAX_LEN + 6} tokens ({MAX_LEN - 4} in the messages, 10 in the completion)" in err["message"]
    assert complete(server.url, prompt, 4)["usage"]["completion_tokens"] == 4  # at the limit: served
    metrics = httpx.get(server.url + "/metrics").text
    kv = [line for line in metrics.splitlines() if line.startswith('aetheris_slot_state_bytes{kind="kv"}')]
    cfg = load_model(directory)[0].config  # K and V of each attention layer, fp32, MAX_LEN tokens
    want = len(cfg.attention_layers) * 2 * cfg.n_kv_heads * cfg.attn_head_dim * 4 * MAX_LEN
    assert kv and float(kv[0].split()[-1]) == want
