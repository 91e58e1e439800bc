"""Turn a benchmark run into results.md (tables + target check), results.json and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import OURS, fmt

BEST = "ours"  # the targets are checked on the default configuration
PEERS = ("llama.cpp", "llama.cpp Q8_0", "transformers")
SYSTEMS = [(system, dtype) for dtype in ("float32", "bfloat16") for system in (*OURS, *PEERS)]


def _med(d: dict, key) -> float | None:
    return d[key].get("median") if key in d else None  # None where it crashed


def _cell(r: dict, table: str, system: str, dtype: str, key) -> str:
    """A measured figure, 'n/s' where this machine cannot run the configuration, '-' where it was not run."""
    if f"{system} / {dtype}" in r.get("unsupported", {}):
        return "n/s"
    return fmt(r.get(table, {}).get(key))


def decode_table(r: dict) -> list[str]:
    batches = r["args"]["batches"]
    rows = [
        "| system | dtype | " + " | ".join(f"decode tok/s, batch {b}" for b in batches) + " |",
        "|---|---|" + "---:|" * len(batches),
    ]
    for system, dtype in SYSTEMS:
        shown = any((system, dtype, b) in r.get("decode", {}) for b in batches)
        if shown or f"{system} / {dtype}" in r.get("unsupported", {}):
            cells = [_cell(r, "decode", system, dtype, (system, dtype, b)) for b in batches]
            rows.append(f"| {system} | {dtype} | " + " | ".join(cells) + " |")
    return rows


def prefill_table(r: dict) -> list[str]:
    lengths = r["args"]["prefill"]
    rows = [
        "| system (fp32) | " + " | ".join(f"prefill tok/s, {n} tokens" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for system in (*OURS, *PEERS):
        if any((system, n) in r.get("prefill", {}) for n in lengths) or f"{system} / float32" in r.get(
            "unsupported", {}
        ):
            cells = [_cell(r, "prefill", system, "float32", (system, n)) for n in lengths]
            rows.append(f"| {system} | " + " | ".join(cells) + " |")
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets(r: dict) -> list[str]:
    """The goals of the speed work, checked on the default configuration against llama.cpp in the same run."""
    if not all(k in r for k in ("decode", "roofline", "memory", "server")):
        return ["Targets not checked: a stage they need did not run (see above)."]
    d, roof, mem = r["decode"], r["roofline"], r["memory"]
    out = []

    def check(name: str, value: float | None, goal: float | None, unit: str = "x") -> None:
        if value is None:
            out.append(f"| {name} | not measured | >= {goal}{unit} | - |")
        elif goal is None:  # compared, with no goal to meet
            out.append(f"| {name} | {value:.2f}{unit} | - | - |")
        else:
            out.append(f"| {name} | {value:.2f}{unit} | >= {goal}{unit} | {'met' if value >= goal else 'NOT met'} |")

    for dtype in ("float32", "bfloat16"):
        for b in r["args"]["batches"]:
            check(
                f"batch {b} {dtype} vs llama.cpp",
                _ratio(_med(d, (BEST, dtype, b)), _med(d, ("llama.cpp", dtype, b))),
                1,
            )
    ours1 = _med(d, (BEST, "float32", 1))
    if ours1:  # bytes the step must read (weights) over the measured read bandwidth
        check(
            "batch 1 fp32, share of the read-bandwidth roofline",
            ours1 * mem["weight_bytes"] / roof["read_bytes_per_s"],
            0.8,
            "",
        )
    for b in r["args"]["batches"]:
        int8, q8 = _med(d, ("ours --quantize int8", "float32", b)), _med(d, ("llama.cpp Q8_0", "float32", b))
        check(f"batch {b} int8 vs llama.cpp Q8_0", _ratio(int8, q8), None)
    http = r["server"].get("http_32") or {}
    cpu = _ratio(r.get("offline_32_cpu_s_per_token"), http.get("server_cpu_s_per_token"))
    check("HTTP, 32 streaming clients: offline CPU s/token over the server's", cpu, 0.85)
    return ["| target | measured | goal | |", "|---|---:|---:|---|", *out]


def ratio_table(r: dict) -> list[str]:
    """Ours (the default) over each peer, decode per batch and prefill per length, from one run's medians."""
    batches, lengths = r["args"]["batches"], r["args"]["prefill"]
    d, p = r.get("decode", {}), r.get("prefill", {})
    heads = [f"decode, batch {b}" for b in batches] + [f"prefill, {n} tokens" for n in lengths]
    rows = ["| ours vs | dtype | " + " | ".join(heads) + " |", "|---|---|" + "---:|" * len(heads)]
    for dtype in ("float32", "bfloat16"):
        for peer in ("llama.cpp", "transformers"):
            cells = [_ratio(_med(d, (BEST, dtype, b)), _med(d, (peer, dtype, b))) for b in batches]
            cells += [_ratio(_med(p, (BEST, n)), _med(p, (peer, n))) if dtype == "float32" else None for n in lengths]
            if any(cells):
                rows.append(f"| {peer} | {dtype} | " + " | ".join(f"{c:.2f}x" if c else "-" for c in cells) + " |")
    return rows


SUMMARY_START, SUMMARY_END = "<!-- summary: written by bench/run.py -->", "<!-- end of summary -->"


def update_summary(readme: Path, r: dict) -> bool:
    """Replace the summary block of bench/results/README.md (between its markers) with this run's ratios;
    False when the file or its markers are missing."""
    text = readme.read_text() if readme.exists() else ""
    if SUMMARY_START not in text or SUMMARY_END not in text:
        return False
    head, rest = text.split(SUMMARY_START, 1)
    tail = rest.split(SUMMARY_END, 1)[1]
    run = f"Run {r['date']} on {r['machine']}: `{r.get('command', 'python bench/run.py')}`, medians."
    block = "\n".join(["", run, "", *ratio_table(r), ""])
    readme.write_text(head + SUMMARY_START + block + "\n" + SUMMARY_END + tail)
    return True


def _intro(r: dict) -> list[str]:
    linears = r.get("default_linears", "oneDNN-packed or F.linear projections")
    return [
        "# Benchmarks",
        "",
        f"Machine: {r['machine']}. Run {r['date']}, `{r.get('command', 'python bench/run.py')}`; "
        f"median of {r['args']['repeats']} runs (min-max). Weights: random HF MambaForCausalLM, hidden 768, "
        f"24 layers, vocab 50280 (mamba-130m size); llama.cpp runs the GGUF f32 / bf16 converted from it. Greedy, "
        f"{r['args']['tokens']} new tokens after a 16-token prompt; batch = concurrent sequences. Our engine "
        f"runs as `python -m server` would with each flag: `ours` the default (decode step and prefill scan "
        f"compiled; projections through {linears}), `--pack-weights` / `--no-pack-weights` forcing "
        f"oneDNN packing or plain F.linear (MKL), `--no-compile` eager, `--no-huge-pages` the weights left in "
        f"4 KiB pages, `--quantize int8` int8 weights (compiled); llama.cpp Q8_0 is the GGUF quantized by its "
        f"converter. Systems run round-robin within each repeat.",
        "",
    ]


def _machine_lines(r: dict) -> list[str]:
    lines = []
    if "roofline" in r:
        roof = r["roofline"]
        lines += [
            f"Roofline on this machine (best of MKL and oneDNN): fp32 matmul {roof['fp32_flops'] / 1e9:.0f} GFLOP/s, "
            f"bf16 {roof['bf16_flops'] / 1e9:.0f} GFLOP/s, memory read {roof['read_bytes_per_s'] / 1e9:.1f} GB/s "
            f"(the higher of {' and '.join(f'{x / 1e9:.1f}' for x in roof['read_samples'])}, before and after the "
            f"decode runs).",
            "",
        ]
    if "latency" in r:
        lat = r["latency"]
        far = max(lat, key=int)
        lines += [
            f"O(1) decode: one step at position 100 takes {lat[100] * 1000:.2f} ms, at position {far} "
            f"{lat[far] * 1000:.2f} ms (ratio {lat[far] / lat[100]:.3f}).",
            "",
        ]
    if "memory" in r:
        mem = r["memory"]
        lines += [
            f"Memory: recurrent state {mem['state_bytes'] / 2**20:.2f} MiB per sequence, whatever its length; a "
            f"same-width transformer's fp32 KV cache would hold {mem['kv_bytes'][4096] / 2**20:.0f} MiB at 4k "
            f"tokens and {mem['kv_bytes'][32768] / 2**20:.0f} MiB at 32k.",
            "",
        ]
    return lines


def _server_lines(r: dict) -> list[str]:
    srv = r.get("server")
    if not srv:
        return []
    lines = [
        f"Server peak RSS: {srv['rss_1_mb']:.0f} MiB with 1 live sequence, {srv['rss_32_mb']:.0f} MiB with 32.",
        "",
    ]
    if srv.get("http_32"):
        h = srv["http_32"]
        num = lambda x: "not measured" if x is None else f"{x:.1f}"  # noqa: E731 (--quick has no batch 32)
        num_ms = lambda x: "not measured" if x is None else f"{1000 * x:.1f}"  # noqa: E731
        lines += [
            f"HTTP: 32 concurrent streaming clients (the server with its defaults; the clients run on the "
            f"same 2 cores): {num(h['steady_tokens_per_s'])} tokens/s aggregate while all 32 stream, "
            f"{h['tokens_per_s']:.1f} over the whole run including start-up and ramp; inter-token latency p50 "
            f"{h['itl_p50_ms']:.1f} ms, p99 {h['itl_p99_ms']:.1f} ms; the offline engine at batch 32: "
            f"{num(r.get('offline_32'))} tokens/s. CPU per token (all threads, user + system): the server "
            f"{num_ms(h.get('server_cpu_s_per_token'))} ms, the offline engine "
            f"{num_ms(r.get('offline_32_cpu_s_per_token'))} ms.",
            "",
        ]
    if r.get("servers"):
        lines += servers_table(r["servers"])
    return lines


def servers_table(srv: dict) -> list[str]:
    """Ours vs llama-cpp-python's server through HTTP: tokens/s over the whole run and median TTFT."""
    clients = sorted({int(c) for runs in srv.values() for c in runs})
    head = " | ".join(f"{c} clients: tok/s, TTFT p50" for c in clients)
    rows = [
        "Servers through HTTP (streaming completions, 64 tokens each, greedy, the same weights; one server at a time):",
        "",
        f"| server | {head} |",
        "|---|" + "---:|" * len(clients),
    ]
    for name, runs in srv.items():
        runs = {int(c): v for c, v in runs.items()}
        cells = [
            f"{runs[c]['tokens_per_s']:.1f}, {runs[c]['ttft_p50_ms']:.0f} ms" if c in runs else "-" for c in clients
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*rows, ""]


def _gaps(r: dict) -> list[str]:
    lines = [f"- n/s, {k}: not supported on this machine ({why})." for k, why in r.get("unsupported", {}).items()]
    lines += [f"- stage {k} failed: {why}" for k, why in r.get("failed", {}).items()]
    return [*lines, ""] if lines else []


def write(r: dict, out_dir: Path) -> None:
    if "roofline" in r:
        r["roofline"]["read_bytes_per_s"] = max(r["roofline"]["read_samples"])
    lines = [*_intro(r), *_gaps(r)]
    if "decode" in r:
        lines += [*decode_table(r), ""]
    if "prefill" in r:
        lines += [*prefill_table(r), ""]
    lines += [*_machine_lines(r), *_server_lines(r)]
    if "default_model" in r:
        lines += ["Our default model (checkpoints/aetheris-hybrid, MoE), decode tokens/s:", ""]
        lines += [
            f"- {name}: " + ", ".join(f"batch {b}: {v:.0f}" for b, v in runs.items())
            for name, runs in r["default_model"].items()
        ]
        lines.append("")
    if "quality" in r:
        lines += quality_lines(r["quality"])
    if "decode" in r:
        lines += ["## Ours over each peer", "", *ratio_table(r), ""]
    lines += ["## Targets", "", *targets(r), ""]
    (out_dir / "results.md").write_text("\n".join(lines))
    if "decode" in r:
        update_summary(out_dir / "README.md", r)
    (out_dir / "results.json").write_text(to_json(r))
    if "decode" in r:
        plot(r, out_dir / "decode.png")
    print("\n".join(lines))


def quality_lines(q: dict) -> list[str]:
    """bench/quantize.py's table: what int8 and int4 weights cost in quality."""
    from bench.quantize import table

    dm = q["default_model"]
    head = (
        f"Quantization quality (bench/quantize.py): bits per byte of {dm['tokens']} held-out TinyStories tokens and "
        f"teacher-forced greedy agreement with fp32 on {dm['prompts']} held-out prompts (the embedded model); KL "
        "divergence from fp32 of the 130m-size random model's next-token distributions."
    )
    return [head, "", table(q), ""]


def to_json(r: dict) -> str:
    """JSON keys are strings: the (system, dtype, batch) keys are joined with ' / ' (`load` splits them)."""
    serial = {**r}
    for table in ("decode", "prefill"):
        if table in r:
            serial[table] = {" / ".join(map(str, k)): v for k, v in r[table].items()}
    return json.dumps(serial, indent=2) + "\n"


def load(path: Path) -> dict:
    """results.json back into the dict `write` takes (JSON turned its tuple and int keys into strings)."""
    r = json.loads(path.read_text())
    ints = lambda d: {int(k): v for k, v in d.items()}  # noqa: E731
    key = lambda k: tuple(int(p) if p.isdigit() else p for p in k.split(" / "))  # noqa: E731
    for table in ("decode", "prefill"):
        if table in r:
            r[table] = {key(k): v for k, v in r[table].items()}
    if "latency" in r:
        r["latency"] = ints(r["latency"])
    if "default_model" in r:
        r["default_model"] = {name: ints(runs) for name, runs in r["default_model"].items()}
    if "memory" in r:
        r["memory"] = {**r["memory"], "kv_bytes": ints(r["memory"]["kv_bytes"])}
    return r


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = r["args"]["batches"]
    systems = [s for s in SYSTEMS if any((*s, b) in r["decode"] for b in batches)]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(systems)
    for i, (system, dtype) in enumerate(systems):
        vals = [_med(r["decode"], (system, dtype, b)) or 0 for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], vals, width, label=f"{system} {dtype}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.set_title("Decode throughput, mamba-130m-size weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":  # re-render results.md and the plot from results.json, e.g. after editing this file
    out = Path(__file__).resolve().parent / "results"
    write(load(out / "results.json"), out)
