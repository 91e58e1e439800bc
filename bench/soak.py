"""Soak: C concurrent clients against a real server for M minutes: python bench/soak.py --minutes M --clients C

Each client loops over a random mix: chat and completions, streaming and not, n > 1, stop strings, a shared
system prompt (prefix snapshots), streams dropped mid-way (disconnects), oversized and malformed bodies. It
records every outcome by kind, and from the server: slots in use at the end (must be 0), RSS after warm-up,
in the middle and at the end (flat within 5%), and the prefix-cache bytes against their limit. Prints a JSON
summary, writes bench/results/soak.md, and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/soak.py` from anywhere

from aetheris.serverproc import ServerProcess  # noqa: E402

CACHE_MB = 8
BODY_MB = 1
SYSTEM = "You are a storyteller. Keep every story short, kind and simple. " * 4


def _messages(rng: random.Random) -> list[dict]:
    question = {"role": "user", "content": f"Tell story {rng.randrange(10_000)} about a {rng.choice(ANIMALS)}."}
    return [{"role": "system", "content": SYSTEM}, question] if rng.random() < 0.5 else [question]


ANIMALS = ["cat", "dog", "fox", "frog", "bird", "bear"]


async def _chat(c: httpx.AsyncClient, model: str, rng: random.Random, **kw) -> str:
    body = {"model": model, "messages": _messages(rng), "max_tokens": rng.randrange(1, 48), **kw}
    r = await c.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        return f"http_{r.status_code}"
    choices = r.json()["choices"]
    ok = len(choices) == body.get("n", 1) and all(ch["finish_reason"] in ("stop", "length") for ch in choices)
    return "ok" if ok else "bad_response"


async def _stream(c: httpx.AsyncClient, model: str, rng: random.Random, drop_after: int | None = None) -> str:
    body = {"model": model, "messages": _messages(rng), "max_tokens": rng.randrange(8, 96), "stream": True}
    async with c.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return f"http_{r.status_code}"
        seen = []
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                seen.append(line[6:])
                if drop_after is not None and len(seen) >= drop_after:
                    return "disconnected"
        if not seen or seen[-1] != "[DONE]" or any('"error"' in s for s in seen[:-1]):
            return "bad_stream"
    return "ok"


async def _completions(c: httpx.AsyncClient, model: str, rng: random.Random) -> str:
    body = {"model": model, "prompt": ["Once upon a time", "The dog"], "max_tokens": rng.randrange(1, 24)}
    body |= {"n": rng.choice([1, 2, 3]), "stop": rng.choice([None, ["."], [" the", "!"]])}
    r = await c.post("/v1/completions", json=body)
    if r.status_code != 200:
        return f"http_{r.status_code}"
    return "ok" if len(r.json()["choices"]) == 2 * body["n"] else "bad_response"


async def _bad_body(c: httpx.AsyncClient, model: str, rng: random.Random) -> str:
    if rng.random() < 0.5:
        content = b'{"model": "%s", "messages": [{"role": "user", "content": "' % model.encode()
        content += b"a" * ((BODY_MB << 20) + 1000) + b'"}]}'
        want = 413
    else:
        content, want = rng.choice([b"{not json", b'{"messages": 3}', b"\xff\xfe", b'{"model": 1}']), 400
    r = await c.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    ok = r.status_code == want and set(r.json()["error"]) == {"message", "type", "param", "code"}
    return "rejected_as_expected" if ok else f"http_{r.status_code}"


SCENARIOS = {
    "chat": lambda c, m, rng: _chat(c, m, rng),
    "chat_n_stop": lambda c, m, rng: _chat(c, m, rng, n=rng.choice([2, 3]), stop=[".", "!"], temperature=0.8),
    "stream": lambda c, m, rng: _stream(c, m, rng),
    "disconnect": lambda c, m, rng: _stream(c, m, rng, drop_after=rng.randrange(1, 6)),
    "completions": _completions,
    "bad_body": _bad_body,
}
WEIGHTS = {"chat": 4, "chat_n_stop": 2, "stream": 3, "disconnect": 2, "completions": 2, "bad_body": 1}
EXPECTED = {"ok", "disconnected", "rejected_as_expected", "http_503"}  # 503: overload, answered with Retry-After


async def client(i: int, url: str, model: str, until: float, outcomes: Counter) -> None:
    rng = random.Random(i)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        while time.time() < until:
            kind = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
            try:
                result = await SCENARIOS[kind](c, model, rng)
            except httpx.HTTPError as e:
                result = f"client_{type(e).__name__}"
            outcomes[f"{kind}:{result}"] += 1
            if result == "http_503":
                await asyncio.sleep(0.2)


async def warm_up(url: str, model: str, clients: int, seconds: float, outcomes: Counter) -> None:
    """One burst of the full load, then a drain. The first time the load drains, the server's RSS steps up
    once (about 25 MB on the embedded model, measured, not traced to its allocations), later cycles by a few
    MB; after this warm-up the RSS check sees growth under load rather than that first step."""
    until = time.time() + seconds
    await asyncio.gather(*(client(10_000 + i, url, model, until, outcomes) for i in range(clients)))
    await asyncio.sleep(2.0)


async def soak(server: ServerProcess, minutes: float, clients: int) -> dict:
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    proc = psutil.Process(server.proc.pid)
    outcomes: Counter = Counter()
    await warm_up(server.url, model, clients, max(15.0, 6.0 * minutes), outcomes)
    t0 = time.time()
    until = t0 + minutes * 60
    tasks = [asyncio.create_task(client(i, server.url, model, until, outcomes)) for i in range(clients)]
    rss, cache, series = {}, [], []
    marks = {"warm": t0 + 0.3 * (until - t0), "middle": t0 + 0.65 * (until - t0)}
    while time.time() < until:
        await asyncio.sleep(1.0)
        cache.append(server.metrics()["aetheris_state_cache_bytes"])
        now = proc.memory_info().rss
        if not series or time.time() - series[-1][0] >= (until - t0) / 20:
            series.append((time.time(), now))
        for name, at in marks.items():
            if name not in rss and time.time() >= at:
                rss[name] = now
    await asyncio.gather(*tasks)
    await asyncio.sleep(2.0)  # aborted streams free their slots at the next iteration
    rss["end"] = proc.memory_info().rss
    m = server.metrics()
    trace = [(round(t - t0), round(b / 2**20, 1)) for t, b in series]
    return {
        "outcomes": dict(sorted(outcomes.items())),
        "rss": rss,
        "trace": trace,
        "cache_max": max(cache),
        "metrics": m,
    }


def verdict(got: dict, minutes: float, clients: int) -> dict:
    unexpected = {k: v for k, v in got["outcomes"].items() if k.split(":", 1)[1] not in EXPECTED}
    rss = got["rss"]
    growth = max(rss["middle"], rss["end"]) / rss["warm"] - 1
    limit = CACHE_MB << 20
    return {
        "minutes": minutes,
        "clients": clients,
        "requests": sum(got["outcomes"].values()),
        "outcomes": got["outcomes"],
        "unexpected": unexpected,
        "slots_used_at_end": got["metrics"]["aetheris_slots_used"],
        "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
        "rss_growth_after_warmup": round(growth, 4),
        "rss_trace_s_mib": got["trace"],
        "cache_bytes_max": int(got["cache_max"]),
        "cache_bytes_limit": limit,
        "generation_tokens": int(got["metrics"]["aetheris_generation_tokens_total"]),
        "passed": not unexpected
        and got["metrics"]["aetheris_slots_used"] == 0
        and growth <= 0.05
        and got["cache_max"] <= limit,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded model)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "soak.md"))
    args = p.parse_args(argv)
    flags = ("--state-cache-mb", str(CACHE_MB), "--max-body-mb", str(BODY_MB), "--max-queue", "128")
    server = ServerProcess(Path(args.model) if args.model else None, *flags, "--log-level", "warning")
    try:
        result = verdict(asyncio.run(soak(server, args.minutes, args.clients)), args.minutes, args.clients)
    finally:
        server.stop()
    text = json.dumps(result, indent=2)
    print(text)
    Path(args.out).write_text(f"# Soak: {args.minutes:g} min, {args.clients} clients\n\n```json\n{text}\n```\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
