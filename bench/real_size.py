"""A real-size run: a random checkpoint with Granite 4.0-H-tiny's published dimensions (about 7B parameters, 1B
active: 40 layers, 4 of them attention, Mamba-2 with 48 heads of 64 and d_state 128, 64 experts top-6 of width
512 and a 1024-wide shared expert, hidden 1536, vocabulary 100,352), written once in bf16 (~14 GB of disk),
then served by `python -m server` with its defaults in bf16, int8 and int4. For each: peak resident memory
through startup and the measurements, time to healthy, decode tokens/s through HTTP at batch 1 and 8, and
prefill tokens/s of a 2,048-token prompt.

    python -m bench.real_size [--work bench/work] [--variants bf16 int8 int4]

Writes bench/results/real_size.json and .md. It takes most of an hour on 2 cores; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx

from aetheris.defaults import DEFAULT_MODEL_DIR
from aetheris.serverproc import ServerProcess
from bench.common import machine_line
from bench.http_load import peak_rss_mb, stream_clients
from bench.weights import write_random_hf
from model.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ATTENTION = (5, 15, 25, 35)
GRANITE_TINY = dict(  # ibm-granite/granite-4.0-h-tiny's config.json (the fields that set sizes)
    vocab_size=100352,
    hidden_size=1536,
    num_hidden_layers=40,
    layer_types=["attention" if i in ATTENTION else "mamba" for i in range(40)],
    num_attention_heads=12,
    num_key_value_heads=4,
    intermediate_size=512,
    shared_intermediate_size=1024,
    num_local_experts=64,
    num_experts_per_tok=6,
    mamba_n_heads=48,
    mamba_d_head=64,
    mamba_d_state=128,
    mamba_n_groups=1,
    mamba_expand=2,
    mamba_d_conv=4,
    mamba_chunk_size=256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
)
FLAGS = {"bf16": ["--dtype", "bfloat16"], "int8": ["--dtype", "bfloat16", "--quantize", "int8"]}
FLAGS["int4"] = ["--dtype", "bfloat16", "--quantize", "int4"]
GOALS_GIB = {"bf16": 15.5, "int8": 9.5, "int4": 6.0}


def checkpoint(work: Path) -> Path:
    """The random Granite 4.0-H-tiny-size checkpoint, written once (the embedded model's tokenizer: only the
    token ids matter for speed)."""
    directory = work / "granite-4.0-h-tiny-random"
    if not (directory / "model.safetensors.index.json").exists():
        from transformers import GraniteMoeHybridConfig

        t0 = time.time()
        n = write_random_hf(GraniteMoeHybridConfig(**GRANITE_TINY), directory)
        print(f"wrote {n / 1e9:.2f}B parameters in {time.time() - t0:.0f} s", flush=True)
    Tokenizer.from_dir(DEFAULT_MODEL_DIR).save(directory)
    return directory


def prefill_tokens_per_s(url: str, tokens: int = 2048) -> float:
    """A completion of one token after a `tokens`-token prompt (token ids), timed whole: the prefill."""
    body = {"model": "bench", "prompt": [(7 * i) % 4000 + 10 for i in range(tokens)], "max_tokens": 1}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=3600)
    r.raise_for_status()
    return tokens / (time.perf_counter() - t0)


def measure(directory: Path, variant: str, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    server = ServerProcess(
        directory, *FLAGS[variant], "--compile", "--served-model-name", "bench", "--threads", "2", timeout=3600
    )
    try:
        out = {"healthy_s": time.perf_counter() - t0}
        stream_clients(server.url, 1, 4)  # warm
        out["decode_1"] = stream_clients(server.url, 1, new_tokens, server.proc.pid)["tokens_per_s"]
        out["decode_8"] = stream_clients(server.url, 8, new_tokens, server.proc.pid)["tokens_per_s"]
        out["prefill_2048"] = prefill_tokens_per_s(server.url)
        out["peak_gib"] = peak_rss_mb(server.proc.pid) / 1024
        log = Path(server.log.name).read_text()
        out["log"] = [line.split(": ", 1)[-1] for line in log.splitlines() if "weights" in line or "parameters" in line]
        return out
    finally:
        server.stop()


def write(report: dict) -> None:
    lines = [
        "# A real-size run (Granite 4.0-H-tiny's dimensions, random weights)",
        "",
        f"Machine: {report['machine']}. Run {report['date']}, `python -m bench.real_size`, `python -m server` with "
        "its defaults (compiled, weights in huge pages, the few-row kernel) and `--dtype bfloat16`; HTTP "
        f"streaming completions of {report['new_tokens']} tokens; prefill = one 2,048-token prompt.",
        "",
        "| weights | peak memory | goal | healthy after | decode tok/s, batch 1 | batch 8 | prefill tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in report["variants"].items():
        goal = GOALS_GIB[name]
        met = "met" if r["peak_gib"] <= goal else "NOT met"
        lines.append(
            f"| {name} | {r['peak_gib']:.2f} GiB | <= {goal} GiB ({met}) | {r['healthy_s']:.0f} s | "
            f"{r['decode_1']:.2f} | {r['decode_8']:.2f} | {r['prefill_2048']:.1f} |"
        )
    (RESULTS / "real_size.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "real_size.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "work")
    p.add_argument("--variants", nargs="+", default=list(FLAGS), choices=list(FLAGS))
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    directory = checkpoint(args.work)
    report = {"machine": machine_line(), "date": time.strftime("%Y-%m-%d %H:%M"), "new_tokens": args.new_tokens}
    report["variants"] = {}
    for variant in args.variants:
        report["variants"][variant] = measure(directory, variant, args.new_tokens)
        print(variant, report["variants"][variant], flush=True)
        write(report)


if __name__ == "__main__":
    main()
