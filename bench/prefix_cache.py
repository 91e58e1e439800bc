"""Prefix reuse, measured offline on the engine core with the embedded model: python -m bench.prefix_cache

Time to first token (TTFT) of requests arriving one after another, each timed from `add` to its first token:
  - a ~1,000-token system prompt shared by 16 users with different questions, with the cache on and off;
  - a 10-turn chat (each turn's prompt is the whole history): turn 10 vs turn 1;
  - regenerate (the same prompt again) and edit-the-last-message, vs the same prompt cold;
and the radix tree's bookkeeping (lookup + inserting 128 interval snapshots) for a 32k-token prompt as a share
of that prompt's prefill time. Writes bench/results/prefix_cache.md and prints it.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from aetheris.defaults import DEFAULT_MODEL_DIR
from model.checkpoint import load_model
from server.api.prompts import ChatPrompt, message_boundaries
from server.engine.core import CoreConfig, EngineCore
from server.engine.prefix_cache import PrefixCache
from server.engine_io import GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT / "data" / "corpus" / "tinystories_valid_first1000.txt"


def ttft(core: EngineCore, tok, messages: list[dict], rid: str, max_tokens: int = 4) -> tuple[float, list[int]]:
    """Seconds from `add` to the first token, and the tokens generated (greedy)."""
    prompt = tok.encode_chat(messages)
    points, pinned = message_boundaries(tok, ChatPrompt(messages), prompt)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    first: list[float] = []
    tokens: list[int] = []

    def emit(out) -> None:
        new = [t for d in out.deltas for t in d.token_ids]
        if new and not first:
            first.append(time.perf_counter())
        tokens.extend(new)

    t0 = time.perf_counter()
    core.add(GenerationRequest(rid, prompt, params, points, pinned), emit)
    while core.has_work():
        core.step()
    return first[0] - t0, tokens


def system_prompt(tok, n_tokens: int) -> str:
    words = STORIES.read_text().split()
    text, size = [], 0
    while size < n_tokens:
        text.append(words[len(text)])
        size = len(tok.encode(" ".join(text)))
    return " ".join(text)


def shared_system(model, tok, cache_mb: float) -> list[float]:
    core = EngineCore(model, tok, CoreConfig(max_batch_size=4, state_cache_bytes=int(cache_mb * 2**20)))
    system = {"role": "system", "content": system_prompt(tok, 1000)}
    questions = [f"Tell me a story about animal number {i} and its friend." for i in range(16)]
    return [ttft(core, tok, [system, {"role": "user", "content": q}], f"u{i}")[0] for i, q in enumerate(questions)]


def chat_turns(model, tok) -> list[float]:
    """Each turn's reply is the model's own (48 tokens), as in a chat UI, so the next turn resumes after it."""
    core = EngineCore(model, tok, CoreConfig(max_batch_size=4, state_cache_bytes=256 << 20))
    history, times = [{"role": "system", "content": "You tell stories."}], []
    for turn in range(10):
        history.append({"role": "user", "content": f"Go on with part {turn + 1}."})
        seconds, reply = ttft(core, tok, history, f"t{turn}", max_tokens=48)
        times.append(seconds)
        history.append({"role": "assistant", "content": tok.decode(reply)})
    return times


def regenerate_and_edit(model, tok) -> dict[str, float]:
    history = [{"role": "system", "content": system_prompt(tok, 600)}, {"role": "user", "content": "A story?"}]
    history += [{"role": "assistant", "content": system_prompt(tok, 300)}, {"role": "user", "content": "More."}]
    edited = [*history[:-1], {"role": "user", "content": "Something else."}]
    warm = EngineCore(model, tok, CoreConfig(max_batch_size=4, state_cache_bytes=256 << 20))
    ttft(warm, tok, history, "first")
    out = {"regenerate": ttft(warm, tok, history, "again")[0], "edit": ttft(warm, tok, edited, "edited")[0]}
    cold = EngineCore(model, tok, CoreConfig(max_batch_size=4, state_cache_bytes=0))
    out["cold"] = statistics.median(ttft(cold, tok, history, f"c{i}")[0] for i in range(3))
    return out


def bookkeeping(model, tok, length: int = 32768) -> dict[str, float]:
    prompt = [int(t) for t in torch.randint(5, tok.vocab_size, (length,))]
    _, state = model.prefill(torch.tensor([prompt[:16]]), model.empty_state(1))
    cache = PrefixCache(1 << 30)
    t0 = time.perf_counter()
    cache.lookup(prompt)
    for end in range(256, length + 1, 256):
        cache.put(prompt[:end], state, torch.zeros(8))
    cache.lookup(prompt + [1])
    tree = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.prefill(torch.tensor([prompt]), model.empty_state(1))
    return {"tree_s": tree, "prefill_s": time.perf_counter() - t0, "snapshots": cache.entries}


def main() -> None:
    torch.set_num_threads(2)
    model, tok = load_model(DEFAULT_MODEL_DIR)
    ttft(
        EngineCore(model, tok, CoreConfig(max_batch_size=4, state_cache_bytes=0)),
        tok,
        [{"role": "user", "content": "warm up"}],
        "w",
    )
    regen = regenerate_and_edit(model, tok)
    on, off = shared_system(model, tok, 256), shared_system(model, tok, 0)
    turns = chat_turns(model, tok)
    book = bookkeeping(model, tok)
    mean = statistics.mean
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    rows = [
        ("shared 1k system prompt: users 2-16 / user 1", mean(on[1:]) / on[0], "<= 0.2x", ms(mean(on[1:]))),
        ("... users 2-16 with the cache / without", mean(on[1:]) / mean(off[1:]), "", ms(mean(off[1:]))),
        ("10-turn chat: turn 10 / turn 1", turns[-1] / turns[0], "<= 1.2x", f"{ms(turns[0])} -> {ms(turns[-1])}"),
        ("regenerate / cold", regen["regenerate"] / regen["cold"], "", ms(regen["regenerate"])),
        ("edit last message / cold", regen["edit"] / regen["cold"], "", ms(regen["edit"])),
        ("radix tree bookkeeping / prefill, 32k tokens", book["tree_s"] / book["prefill_s"], "", ms(book["tree_s"])),
    ]
    lines = [
        "# Prefix reuse (python -m bench.prefix_cache)",
        "",
        f"Embedded model, {time.strftime('%Y-%m-%d %H:%M')}, 2 threads; TTFT from `add` to the first token, requests "
        f"one after another through the engine core. Cold TTFT of the 1k-system-prompt users: {ms(on[0])}; "
        f"32k-token prefill {book['prefill_s']:.2f} s with {book['snapshots']} interval snapshots in the tree.",
        "",
        "| measure | ratio | goal | TTFT / time |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {ratio:.3f} | {goal} | {t} |" for name, ratio, goal, t in rows),
        "",
    ]
    (ROOT / "bench" / "results" / "prefix_cache.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
