"""The HTTP path: N concurrent streaming clients against a real server process; and its peak RSS."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx


async def _client(c: httpx.AsyncClient, i: int, max_tokens: int, gaps: list[float]) -> int:
    body = {
        "model": "bench",
        "prompt": f"Story {i}: once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    n, last = 0, None
    async with c.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                if last is not None:
                    gaps.append(now - last)
                last = now
    return n


def stream_clients(url: str, clients: int, max_tokens: int = 128) -> dict:
    """Aggregate tokens/s (chunks carry one token each) and inter-token latency percentiles."""
    gaps: list[float] = []

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            t = time.perf_counter()
            counts = await asyncio.gather(*(_client(c, i, max_tokens, gaps) for i in range(clients)))
            return sum(counts), time.perf_counter() - t

    tokens, seconds = asyncio.run(run())
    gaps.sort()
    return {
        "tokens_per_s": tokens / seconds,
        "itl_p50_ms": 1000 * statistics.median(gaps),
        "itl_p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")
