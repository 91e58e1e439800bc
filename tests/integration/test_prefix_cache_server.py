"""Prefix reuse as a client sees it: `usage.prompt_tokens_details.cached_tokens` through the official SDK, the
cache counters in /metrics, and pinned system-prompt snapshots that survive a restart (--state-cache-dir)."""

from __future__ import annotations

import httpx
import openai
import pytest

from aetheris.serverproc import ServerProcess
from tests.helpers import make_tiny_checkpoint

SYSTEM = {"role": "system", "content": "You are a storyteller who tells short, kind stories. " * 4}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


def ask(url: str, question: str) -> tuple[str, int]:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(
        model="tiny", messages=[SYSTEM, {"role": "user", "content": question}], max_tokens=5, temperature=0
    )
    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens


def system_tokens(url: str) -> int:
    body = {"messages": [SYSTEM], "add_generation_prompt": False}
    return httpx.post(url + "/tokenize", json=body).json()["count"]


def test_pinned_system_prompt_survives_a_restart(ckpt, tmp_path):
    store = tmp_path / "state-cache"
    s = ServerProcess(ckpt, "--state-cache-dir", str(store))
    try:
        n_system = system_tokens(s.url)
        first, cached = ask(s.url, "Tell me about a dog.")
        assert cached == 0
        text, cached = ask(s.url, "Tell me about the moon.")  # another user, the same system prompt
        assert cached >= n_system
        m = s.metrics()
        assert m["aetheris_state_cache_hits_total"] >= 1 and m["aetheris_state_cache_misses_total"] >= 1
        assert m["aetheris_cached_prompt_tokens_total"] >= n_system and m["aetheris_state_cache_bytes"] > 0
        assert m["aetheris_state_cache_evictions_total"] == 0
    finally:
        s.stop()
    files = list(store.glob("*.safetensors"))
    assert len(files) == 1  # the system prompt's snapshot: the only pinned one
    (store / "junk.safetensors").write_bytes(b"not a snapshot")  # skipped with a warning, never fatal
    s = ServerProcess(ckpt, "--state-cache-dir", str(store))
    try:
        again, cached = ask(s.url, "Tell me about the moon.")  # the first request after the restart
        assert cached == n_system and again == text
        assert "skipping junk.safetensors" in s.output()
    finally:
        s.stop()
