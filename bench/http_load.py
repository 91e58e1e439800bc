"""The HTTP path: N concurrent streaming clients against a real server process; and its peak RSS."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import httpx


async def _client(c: httpx.AsyncClient, i: int, max_tokens: int) -> tuple[int, list[float], float]:
    """One streaming completion: (completion tokens per the usage chunk, arrival time of each text chunk, time
    to the first text chunk)."""
    body = {
        "model": "bench",
        "prompt": f"Story {i}: once upon a time",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    n, times, t0 = 0, [], time.perf_counter()
    async with c.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["text"]:
                times.append(now)
    return n or len(times), times, times[0] - t0 if times else float("nan")


def stream_clients(url: str, clients: int, max_tokens: int = 128, pid: int | None = None) -> dict:
    """Aggregate tokens/s, time to first token and inter-token latency percentiles; with the server's `pid`,
    also its CPU seconds per generated token (user + system, all threads), which the clients' own CPU use on
    the same cores does not count in.

    Two aggregates: over the whole run (from the first request to the last byte, so it includes the
    clients' start-up and the ramp while requests arrive), and `steady`: the tokens that arrived while
    every client was streaming (from the last client's first token to the first client's last token) over
    that window, which is what the offline engine's figure at the same batch measures."""

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            t = time.perf_counter()
            results = await asyncio.gather(*(_client(c, i, max_tokens) for i in range(clients)))
            return results, time.perf_counter() - t

    cpu0 = cpu_seconds(pid) if pid else 0.0
    results, seconds = asyncio.run(run())
    cpu = cpu_seconds(pid) - cpu0 if pid else None
    streams = [times for _, times, _ in results]
    tokens = sum(n for n, _, _ in results)
    gaps = sorted(b - a for times in streams for a, b in zip(times, times[1:]))
    start, end = max(t[0] for t in streams), min(t[-1] for t in streams)
    in_window = sum(start < x <= end for t in streams for x in t)
    return {
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1000 * statistics.median(t for _, _, t in results),
        "server_cpu_s_per_token": cpu / tokens if cpu is not None else None,
        "steady_tokens_per_s": in_window / (end - start) if end > start else None,
        "itl_p50_ms": 1000 * statistics.median(gaps),
        "itl_p99_ms": 1000 * gaps[int(0.99 * (len(gaps) - 1))],
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")
