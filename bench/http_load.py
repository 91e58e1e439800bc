"""The HTTP path: N concurrent streaming clients against a real server process; and its peak RSS."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx


async def _client(c: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[int, list[float]]:
    """One streaming completion: (completion tokens per the usage chunk, arrival time of each text chunk)."""
    body = {
        "model": "bench",
        "prompt": f"Story {i}: once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    n, times = 0, []
    async with c.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(now)
    return n, times


def stream_clients(url: str, clients: int, max_tokens: int = 128) -> dict:
    """Aggregate tokens/s (chunks carry one token each) and inter-token latency percentiles.

    Two aggregates: over the whole run (from the first request to the last byte, so it includes the
    clients' start-up and the ramp while requests arrive), and `steady`: the tokens that arrived while
    every client was streaming (from the last client's first token to the first client's last token) over
    that window, which is what the offline engine's figure at the same batch measures."""

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            t = time.perf_counter()
            results = await asyncio.gather(*(_client(c, i, max_tokens) for i in range(clients)))
            return results, time.perf_counter() - t

    results, seconds = asyncio.run(run())
    streams = [times for _, times in results]
    gaps = sorted(b - a for times in streams for a, b in zip(times, times[1:]))
    start, end = max(t[0] for t in streams), min(t[-1] for t in streams)
    in_window = sum(start < x <= end for t in streams for x in t)
    return {
        "tokens_per_s": sum(n for n, _ in results) / seconds,
        "steady_tokens_per_s": in_window / (end - start) if end > start else None,
        "itl_p50_ms": 1000 * statistics.median(gaps),
        "itl_p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")
