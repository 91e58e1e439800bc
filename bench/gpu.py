"""Ours vs transformers on a CUDA GPU (bench/gpu_check.sh runs it): python -m bench.gpu --out DIR

The random mamba-130m-size model of bench/run.py and the Granite-4.0-H-shaped hybrid MoE of
bench/hybrid_families.py (Mamba-2, attention, MoE), in bf16 (the server's default on CUDA) and fp32: decode
tokens/s at batch 1 / 8 / 32 through our engine core (compiled, as served: CUDA graphs on, and the run fails if
they do not serve; and with them off) and transformers' generate, and prefill tokens/s at 512 and 2,048 tokens.
Writes DIR/gpu.md and DIR/gpu.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch

from aetheris.defaults import DEFAULT_MODEL_DIR
from bench import hf as hf_bench
from bench import ours
from bench.common import machine_line
from bench.hybrid_families import WORK as GRANITE_DIR
from bench.hybrid_families import make_checkpoint as granite_checkpoint
from bench.weights import mamba_130m
from model.checkpoint import load_model
from model.prepare import prepare_for_inference

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "gpu-check-results")
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    models = {
        "mamba-130m": mamba_130m(ROOT / "bench" / "work" / "mamba-130m-random", tokenizer_dir=DEFAULT_MODEL_DIR),
        "granite-h-768": granite_checkpoint(GRANITE_DIR),
    }
    results = {"machine": machine_line(), "gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M")}
    rows = []
    for (label, path), dtype in itertools.product(models.items(), (torch.bfloat16, torch.float32)):
        model, tok = load_model(path, "cuda", dtype)
        prepare_for_inference(model)  # as the server does: compiled, and static MoE dispatch on CUDA
        ref = hf_bench.load(path, dtype).to("cuda")
        name = f"{label} {str(dtype).split('.')[1]}"
        for b in (1, 8, 32):
            rows.append((name, f"decode batch {b}", ours.decode_tokens_per_s(model, tok, b, args.tokens),
                         ours.decode_tokens_per_s(model, tok, b, args.tokens, cuda_graphs=False),
                         hf_bench.decode_tokens_per_s(ref, b, args.tokens)))  # fmt: skip
        for n in (512, 2048):
            rows.append(
                (name, f"prefill {n}", ours.prefill_tokens_per_s(model, n), None, hf_bench.prefill_tokens_per_s(ref, n))
            )
        del model, ref
        torch.cuda.empty_cache()
    results["rows"] = rows
    lines = [
        f"# GPU: {results['gpu']}, {results['date']}",
        "",
        "| model, dtype | measure | ours tok/s | ours without CUDA graphs | transformers tok/s | ours / transformers |",
        "|---|---|---:|---:|---:|---:|",
        *(
            f"| {d} | {m} | {a:.1f} | {'' if g is None else f'{g:.1f}'} | {b:.1f} | {a / b:.2f}x |"
            for d, m, a, g, b in rows
        ),  # fmt: skip
    ]
    (args.out / "gpu.md").write_text("\n".join(lines) + "\n")
    (args.out / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
