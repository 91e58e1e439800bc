"""A ~1 GiB checkpoint loads in about its own size: a random Granite-4.0-H-layout checkpoint (539M parameters,
sharded bf16 safetensors, fused experts split while loading) served by a real server, in bf16 (compiled, as
served by default) and in int8 and int4 quantized while loading. The peak resident memory of the server process
(VmHWM) through startup and a first request stays within 1.10x the weights it ends up holding + 0.6 GiB (the
interpreter, torch and the server themselves); the startup log states both."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from aetheris.serverproc import ServerProcess
from bench.weights import write_random_hf
from tests.helpers import toy_tokenizer

transformers = pytest.importorskip("transformers", reason="transformers writes the random checkpoint's config")
GiB = 1 << 30


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    directory = tmp_path_factory.mktemp("granite-1g")
    layers = ["mamba"] * 3 + ["attention"] + ["mamba"] * 3 + ["attention"]
    cfg = transformers.GraniteMoeHybridConfig(
        vocab_size=32768, hidden_size=1024, num_hidden_layers=8, layer_types=layers, intermediate_size=512,
        shared_intermediate_size=1024, num_local_experts=32, num_experts_per_tok=4, num_attention_heads=16,
        num_key_value_heads=4, mamba_n_heads=32, mamba_d_head=64, mamba_d_state=64, mamba_n_groups=1,
        tie_word_embeddings=False, max_position_embeddings=4096,
    )  # fmt: skip
    assert write_random_hf(cfg, directory, shard_bytes=256 << 20) == 539_260_224
    toy_tokenizer().save(directory)
    return directory


def _peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


@pytest.mark.parametrize(
    "flags",
    [("--dtype", "bfloat16", "--compile"), *(("--dtype", "bfloat16", "--quantize", q) for q in ("int8", "int4"))],
)
def test_peak_memory_is_about_the_weights(big, flags):
    server = ServerProcess(big, *flags, timeout=600)
    try:
        body = {"model": big.name, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=300).status_code == 200
        peak = _peak_kib(server.proc.pid) * 1024
        line = re.search(
            r"weights: ([\d.]+) GiB in memory; peak memory of the process so far: ([\d.]+) GiB",
            Path(server.log.name).read_text(),
        )
        assert line, server.output()
        weights = float(line[1]) * GiB
        assert weights < {"int8": 0.6, "int4": 0.35}.get(flags[-1], 1.1) * GiB  # what the model holds in that form
        assert peak <= 1.10 * weights + 0.6 * GiB, (peak / GiB, weights / GiB)
    finally:
        server.stop()
