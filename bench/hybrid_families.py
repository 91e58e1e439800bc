"""A Granite-4.0-H-shaped hybrid scaled to this machine, ours vs transformers: python -m bench.hybrid_families

Random weights, transformers' GraniteMoeHybridConfig: hidden 768, 10 layers (Mamba-2 everywhere but one
attention layer, no positional encoding), Mamba-2 with 24 heads of 64 dims and d_state 128 in one group, MoE
of 32 experts (top 4, 256 wide) plus a 512-wide shared expert on every layer, vocab 32,768. Decode tokens/s at
batch 1 / 8 / 32 (greedy, through our engine core as served, and transformers' generate with its cache),
prefill tokens/s at 512 and 2,048 tokens, and per-slot state bytes. Writes bench/results/hybrid_families.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from aetheris.defaults import DEFAULT_MODEL_DIR
from bench import hf as hf_bench
from bench import ours
from bench.common import machine_line
from model.checkpoint import load_model
from model.packed import pack_if_supported

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "granite-h-768"


def make_checkpoint(directory: Path) -> Path:
    if (directory / "model.safetensors").exists():
        return directory
    import shutil

    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(0)
    cfg = GraniteMoeHybridConfig(
        vocab_size=32768, hidden_size=768, num_hidden_layers=10, num_attention_heads=12, num_key_value_heads=4,
        layer_types=["mamba"] * 5 + ["attention"] + ["mamba"] * 4, mamba_n_heads=24, mamba_d_head=64,
        mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=256, intermediate_size=256,
        shared_intermediate_size=512, num_local_experts=32, num_experts_per_tok=4, position_embedding_type="nope",
        tie_word_embeddings=True,
    )  # fmt: skip
    GraniteMoeHybridForCausalLM(cfg).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # only token ids matter for speed
        shutil.copy(DEFAULT_MODEL_DIR / name, directory / name)
    return directory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32, help="new tokens per sequence in decode runs")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    args = p.parse_args()
    torch.set_num_threads(2)
    path = make_checkpoint(WORK)
    model, tok = load_model(path)
    total, active = model.num_parameters()
    pack_if_supported(model)  # packed wherever oneDNN can (the server's default skips fp32 packing on Intel)
    ref = hf_bench.load(path, torch.float32)
    rows = []
    for b in args.batches:
        mine = ours.decode_tokens_per_s(model, tok, b, args.tokens)
        theirs = hf_bench.decode_tokens_per_s(ref, b, args.tokens)
        rows.append((f"decode, batch {b} (tok/s)", mine, theirs))
        print(rows[-1], flush=True)
    for n in args.prefill:
        rows.append(
            (f"prefill, {n} tokens (tok/s)", ours.prefill_tokens_per_s(model, n), hf_bench.prefill_tokens_per_s(ref, n))
        )
        print(rows[-1], flush=True)
    state = model.empty_state(1, "meta").bytes_per_sequence(4096)

    lines = [
        "# Granite-4.0-H-shaped hybrid: ours vs transformers (python -m bench.hybrid_families)",
        "",
        f"{machine_line()}; {time.strftime('%Y-%m-%d %H:%M')}; fp32, one run. {total / 1e6:.0f}M parameters, "
        f"{active / 1e6:.0f}M active. Ours with oneDNN-packed Linear, eager (as `--no-compile` serves it); "
        f"transformers {transformers.__version__} generate() with its cache. Greedy, {args.tokens} new "
        f"tokens after a 16-token prompt.",
        "",
        "| measure | ours | transformers | ours / transformers |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x |" for name, a, b in rows),
        "",
        f"State per slot: {state['fixed'] / 2**20:.2f} MiB of Mamba-2 state whatever the length, plus "
        f"{state['growing'] / 2**20:.2f} MiB of K/V at 4,096 tokens (one attention layer).",
        "",
    ]
    (ROOT / "bench" / "results" / "hybrid_families.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
