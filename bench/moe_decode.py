"""The MoE decode step on a Granite-4.0-H shape, before and after moe_decode.cpp: python -m bench.moe_decode

A random model of the shape the batch-1 comparison with llama.cpp uses (hidden 1024, 12 layers of which 2
attention, Mamba-2 with 32 heads of 64 and d_state 128, 40 experts top-8 of width 512 plus a 1024-wide shared
expert, vocab 32,768: 898M parameters, 294M active), served as the server prepares it (few-row kernel,
compiled). Two variants side by side in one process, same weights:
  - grouped: the MoE layers' decode step through the grouped dispatch (three kernel calls per chosen expert,
    the expert counts read back to sort and split the tokens), which keeps those layers out of the compiled runs;
  - kernel: one moe_decode call per MoE layer, and every layer (attention included) in a compiled run.
Per variant and weight format (fp32, bf16, and bf16 with int8 or int4 weights, `--quantize` as served): the
median decode step (in place, as the engine runs it) at batch 1 and 8, and a profile of one batch-1 step (where
the time goes, by operator). Writes bench/results/moe_decode.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import GraniteMoeHybridConfig

from bench.common import machine_line
from model import HybridLM
from model.families import granite
from model.prepare import Speedups, prepare_for_inference

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = (4, 10)
SHAPE = dict(
    vocab_size=32768, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
    layer_types=["attention" if i in ATTENTION else "mamba" for i in range(12)], mamba_n_heads=32,
    mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, intermediate_size=512,
    shared_intermediate_size=1024, num_local_experts=40, num_experts_per_tok=8, position_embedding_type="nope",
    tie_word_embeddings=True,
)  # fmt: skip


def build(dtype: torch.dtype, kernel: bool, quantize: str | None = None) -> HybridLM:
    torch.manual_seed(0)
    cfg = granite.config(GraniteMoeHybridConfig(**SHAPE).to_dict(), None)
    model = HybridLM(cfg).cast(dtype).eval()
    for moe in model.moe_layers().values():  # the routers of a random model are near uniform; spread them
        moe.router.weight.data.normal_(0, 0.5)
    prepare_for_inference(model, Speedups(quantize=quantize, compile=False), strict=True)  # as served
    for moe in model.moe_layers().values():
        moe.kernel_step = kernel and moe.kernel_step
    model.compile_inference()
    return model


@torch.inference_mode()
def step_ms(model: HybridLM, batch: int, steps: int = 20) -> float:
    state = model.empty_state(batch, capacity=steps + 8)
    tokens = torch.arange(batch) * 7 + 3
    times = []
    for i in range(steps + 3):
        t = time.perf_counter()
        model.decode(tokens, state, out=state)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def profile(model: HybridLM, rows: int = 12) -> list[tuple[str, float, int]]:
    """(operator, self CPU ms, calls) of one batch-1 step, the largest first."""
    state = model.empty_state(1, capacity=16)
    tokens = torch.tensor([3])
    for _ in range(3):
        model.decode(tokens, state, out=state)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.decode(tokens, state, out=state)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [(e.key, e.self_cpu_time_total / 1e3, e.count) for e in events[:rows]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--formats", nargs="+", default=["bfloat16", "bfloat16+int8", "bfloat16+int4", "float32"],
        help="a dtype, or dtype+int8 / dtype+int4 for quantized weights",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "moe_decode.md")
    args = p.parse_args()
    torch.set_num_threads(2)
    lines = [
        "# The MoE decode step on a Granite-4.0-H shape (python -m bench.moe_decode)",
        "",
        f"{machine_line()}; {time.strftime('%Y-%m-%d %H:%M')}. Median of 20 in-place decode steps after 3.",
        "",
        "| weights | dispatch | batch 1 (ms / step) | batch 8 (ms / step) | batch 1 tok/s |",
        "|---|---|---:|---:|---:|",
    ]
    profiles = []
    for name in args.formats:
        dtype_name, _, quantize = name.partition("+")
        for kernel in (False, True):
            model = build(getattr(torch, dtype_name), kernel, quantize or None)
            label = "moe_decode" if kernel else "grouped"
            b1, b8 = step_ms(model, 1), step_ms(model, 8)
            lines.append(f"| {name} | {label} | {b1:.1f} | {b8:.1f} | {1e3 / b1:.1f} |")
            print(lines[-1], flush=True)
            profiles.append((f"{name}, {label}", profile(model)))
            del model
    lines += ["", "One batch-1 step by operator (self CPU ms, calls), the largest first:", ""]
    for title, rows in profiles:
        lines += [f"**{title}**", "", "| operator | ms | calls |", "|---|---:|---:|"]
        lines += [f"| `{k}` | {ms:.2f} | {n} |" for k, ms, n in rows] + [""]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
