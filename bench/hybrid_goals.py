"""bench/hybrid_families.py's tables and goals, from its JSON results (decode / prefill keyed by the batch or
length as a string): one row per system, and each goal of the batch-1 issue marked met, not met or not measured.
"""

from __future__ import annotations

# The goals' floors: batch-1 decode against llama.cpp in the same format, the share of the read bandwidth a
# batch-1 token uses, batch 8 against llama.cpp, prefill against llama.cpp and transformers.
B1_VS_LLAMA = {"fp32": ("ours fp32", "llama.cpp f32", 1.0), "bf16": ("ours bf16", "llama.cpp bf16", 1.2)}
ROOFLINE = {"ours fp32": 0.85, "ours bf16": 0.75}
QUANTIZED = {"ours int8": ("llama.cpp Q8_0", 1.5), "ours int4": ("llama.cpp Q4_K_M", 2.5)}
B8_VS_LLAMA, PREFILL_VS_PEERS = 1.5, 2.0


def decode(results: dict, system: str, batch: int) -> float | None:
    return _measure(results, system, f"decode {batch}")


def roofline_share(results: dict, system: str, bandwidth: float) -> float | None:
    r = results.get(system, {})
    rate = decode(results, system, 1)
    return rate * r["bytes_per_token"] / bandwidth if rate and r.get("bytes_per_token") else None


def table_lines(results: dict, bandwidth: float) -> list[str]:
    batches = sorted({int(b) for r in results.values() for b in r.get("decode", {})})
    lengths = sorted({int(n) for r in results.values() for n in r.get("prefill", {})})
    head = [f"decode b{b}" for b in batches] + [f"prefill {n}" for n in lengths] + ["GB a token", "b1 roofline"]
    lines = ["| system | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for system, r in results.items():
        if "failed" in r:
            lines.append(f"| {system} | " + " | ".join(["failed"] * len(head)) + " |")
            continue
        cells = [f"{r['decode'][str(b)]:.1f}" for b in batches] + [f"{r['prefill'][str(n)]:.0f}" for n in lengths]
        size = r.get("bytes_per_token")
        share = roofline_share(results, system, bandwidth)
        cells += [f"{size / 1e9:.3f}" if size else "-", f"{share:.2f}" if share else "-"]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    failed = [f"- {system}: {r['failed']}" for system, r in results.items() if "failed" in r]
    return lines + ([""] + failed if failed else [])


def _ratio_goal(results: dict, name: str, ours: tuple[str, str], theirs: tuple[str, str], floor: float) -> str:
    """`ours` / `theirs` as (system, measure key: "decode 1" or "prefill 512") at least `floor`."""
    a, b = (_measure(results, *side) for side in (ours, theirs))
    if not a or not b:
        return f"- {name} >= {floor:.2f}x: not measured (a side failed or did not run)"
    return f"- {name} >= {floor:.2f}x: {a / b:.2f}x, {'met' if a / b >= floor else 'not met'}"


def _measure(results: dict, system: str, key: str) -> float | None:
    kind, size = key.split()
    return results.get(system, {}).get(kind, {}).get(size)


def goal_lines(results: dict, bandwidth: float) -> list[str]:
    lines = ["Goals:"]
    for ours, peer, floor in B1_VS_LLAMA.values():
        lines.append(_ratio_goal(results, f"batch 1, {ours} / {peer}", (ours, "decode 1"), (peer, "decode 1"), floor))
    for system, floor in ROOFLINE.items():
        share = roofline_share(results, system, bandwidth)
        verdict = "not measured" if share is None else f"{share:.2f}, {'met' if share >= floor else 'not met'}"
        lines.append(f"- batch-1 roofline share of {system} >= {floor:.2f}: {verdict}")
    for ours, (peer, floor_vs_bf16) in QUANTIZED.items():
        # the like-for-like format where llama.cpp runs it (as it loads by default, else without repacking)
        ran = next((p for p in (peer, f"{peer} no-repack") if decode(results, p, 1)), None)
        if ran:
            lines.append(_ratio_goal(results, f"batch 1, {ours} / {ran}", (ours, "decode 1"), (ran, "decode 1"), 1.0))
        if ran != peer:  # the floor against llama.cpp bf16 where its quantized model does not run
            name = f"batch 1, {ours} / llama.cpp bf16 ({peer} did not run)"
            lines.append(_ratio_goal(results, name, (ours, "decode 1"), ("llama.cpp bf16", "decode 1"), floor_vs_bf16))
    for ours, peer, _ in B1_VS_LLAMA.values():
        name = f"batch 8, {ours} / {peer}"
        lines.append(_ratio_goal(results, name, (ours, "decode 8"), (peer, "decode 8"), B8_VS_LLAMA))
    for n in sorted({int(n) for r in results.values() for n in r.get("prefill", {})}):
        for peer in ("llama.cpp f32", "transformers fp32"):
            name = f"prefill {n}, ours fp32 / {peer}"
            lines.append(
                _ratio_goal(results, name, ("ours fp32", f"prefill {n}"), (peer, f"prefill {n}"), PREFILL_VS_PEERS)
            )
    return lines
