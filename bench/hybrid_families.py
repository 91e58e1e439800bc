"""The hybrid MoE shapes people run, side by side: python -m bench.hybrid_families [--quick]

Two random-weight models with the structure of the families' Hub checkpoints, scaled to this machine: a
Granite-4.0-H shape (hidden 1024, 12 layers of which 2 attention, Mamba-2 with 32 heads of 64 and d_state 128,
40 experts top-8 of width 512 plus a 1024-wide shared expert, vocabulary 32,768) and a Nemotron-H MoE shape
(the Nemotron-3-Nano layer pattern M E M E M * E ... over 14 layers, hidden 1024, Mamba-2 with 32 heads of 64 in
8 groups, 64 relu² experts top-6 of width 512 plus a shared one, sigmoid routing). Each system measures decode
tokens/s at batch 1 / 8 / 32 (greedy, after a 16-token prompt) and prefill tokens/s at 512 and 2,048 tokens:

- ours through the engine core as the server runs it, in fp32, bf16 (what `--dtype auto` serves for these bf16
  checkpoints), and bf16 with `--quantize int8` / `int4`;
- llama.cpp (llama-cpp-python 0.3.36) on GGUFs its converter makes from the same weights: f32, bf16, and Q8_0 /
  Q4_K_M from its own quantizer, each of those also "no-repack" (its extra buffer types off: no AMX or repacked
  layouts), which runs where its AMX repacking segfaults;
- transformers' generate() with its cache, fp32.

Every system runs in a process of its own (bench/common.isolated): a peer that crashes there (llama.cpp's Q8_0 /
Q4_K_M segfault on some AMX CPUs) is recorded as crashed and the run goes on. Batch-1 roofline share: weight
bytes a token reads (routed experts counted top_k / n_experts) x tokens/s / the best read bandwidth sampled in
the run. Writes bench/results/hybrid_families.md and .json with the issue's goals marked met or not met.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from aetheris.defaults import DEFAULT_MODEL_DIR
from bench import common
from bench.hybrid_goals import goal_lines, table_lines
from bench.weights import converter_script, quantize_gguf, to_gguf, write_random_hf

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work"
RESULTS = ROOT / "bench" / "results"
MAMBA2 = dict(mamba_d_conv=4, vocab_size=32768, hidden_size=1024, num_attention_heads=16, tie_word_embeddings=True)
NEMOTRON_PATTERN = "MEMEM*EMEMEM*E"  # Nemotron-3-Nano's layer pattern, cut to 14 layers
SHAPES = {
    "granite-4.0-h": (
        "GraniteMoeHybridConfig",
        dict(
            **MAMBA2, num_hidden_layers=12, num_key_value_heads=4, position_embedding_type="nope",
            layer_types=["attention" if i in (5, 11) else "mamba" for i in range(12)], mamba_n_heads=32,
            mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_chunk_size=256,
            intermediate_size=512, shared_intermediate_size=1024, num_local_experts=40, num_experts_per_tok=8,
        ),
    ),
    "nemotron-h-moe": (
        "NemotronHConfig",
        dict(
            **{**MAMBA2, "tie_word_embeddings": False}, num_key_value_heads=2, head_dim=64,
            layers_block_type=[{"M": "mamba", "E": "moe", "*": "attention"}[c] for c in NEMOTRON_PATTERN],
            mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=8, chunk_size=128,
            moe_intermediate_size=512, moe_shared_expert_intermediate_size=1024, n_routed_experts=64,
            num_experts_per_tok=6, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        ),
    ),
}  # fmt: skip
OURS = {"ours fp32": ("float32", None), "ours bf16": ("bfloat16", None)}
OURS |= {"ours int8": ("bfloat16", "int8"), "ours int4": ("bfloat16", "int4")}
LLAMA = {"llama.cpp f32": "f32", "llama.cpp bf16": "bf16", "llama.cpp Q8_0": "Q8_0", "llama.cpp Q4_K_M": "Q4_K_M"}
LLAMA |= {f"{name} no-repack": kind for name, kind in LLAMA.items() if kind.startswith("Q")}  # see LlamaCpp
SYSTEMS = [*OURS, *LLAMA, "transformers fp32"]


def checkpoint(shape: str) -> Path:
    """The shape's random checkpoint in bf16, written once, with the embedded model's tokenizer (only the token
    ids matter for speed)."""
    import transformers

    from model.tokenizer import Tokenizer

    directory = WORK / f"{shape}-random"
    if not (directory / "model.safetensors.index.json").exists():
        cls, fields = SHAPES[shape]
        write_random_hf(getattr(transformers, cls)(**fields), directory)
    Tokenizer.from_dir(DEFAULT_MODEL_DIR).save(directory)
    return directory


def measure_ours(path: Path, dtype: str, quantize: str | None, batches, prefill, tokens: int) -> dict:
    """Our model as `python -m server --dtype D [--quantize Q]` loads and prepares it (compiled, few-row kernel)."""
    from bench import ours
    from model.checkpoint import load_model
    from model.prepare import Speedups, configure_cpu_for_serving, prepare_for_inference

    torch.set_num_threads(2)
    model, tok = load_model(path, dtype=getattr(torch, dtype))
    prepare_for_inference(model, Speedups(quantize=quantize), strict=True)
    configure_cpu_for_serving()
    return {
        "decode": {b: ours.decode_tokens_per_s(model, tok, b, tokens) for b in batches},
        "prefill": {n: ours.prefill_tokens_per_s(model, n) for n in prefill},
        "bytes_per_token": ours_bytes_per_token(model),
    }


def ours_bytes_per_token(model) -> int:
    """The weight bytes one batch-1 decode step reads: every parameter and buffer once, a routed expert stack
    top_k / n_experts of it (quantized stacks are modules of buffers), the embedding matrix only when the head
    reads it (tied)."""
    share: dict[int, float] = {}
    for moe in model.moe_layers().values():
        for w in (moe.gate_proj, moe.up_proj, moe.down_proj):
            for t in [w] if isinstance(w, torch.Tensor) else [] if w is None else w.buffers():
                share[t.data_ptr()] = moe.top_k / moe.n_experts
    if not model.config.tie_embeddings:
        share[model.embeddings.weight.data_ptr()] = 0.0
    seen: dict[int, float] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size() * share.get(t.data_ptr(), 1.0)
    return int(sum(seen.values()))


def measure_llamacpp(gguf: Path, repack: bool, batches, prefill, tokens: int) -> dict:
    from bench import llamacpp

    return {
        "decode": {b: llamacpp.decode_tokens_per_s(str(gguf), b, tokens, repack=repack) for b in batches},
        "prefill": {n: llamacpp.prefill_tokens_per_s(str(gguf), n, repack=repack) for n in prefill},
    }


def gguf_bytes_per_token(gguf: Path, top_k: int, n_experts: int) -> int:
    """As ours_bytes_per_token, from the GGUF's tensors (routed expert stacks are named *_exps)."""
    import sys

    sys.path.insert(0, str(converter_script(WORK).parent / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
    if "output.weight" in tensors:  # an untied head: the embedding is one row a token
        tensors["token_embd.weight"] = 0
    return int(sum(n * (top_k / n_experts if "_exps" in name else 1) for name, n in tensors.items()))


def measure_transformers(path: Path, batches, prefill, tokens: int) -> dict:
    from bench import hf

    torch.set_num_threads(2)
    model = hf.load(path, torch.float32)
    return {
        "decode": {b: hf.decode_tokens_per_s(model, b, tokens) for b in batches},
        "prefill": {n: hf.prefill_tokens_per_s(model, n) for n in prefill},
    }


def ggufs(path: Path, systems: list[str]) -> dict[str, Path]:
    """{system: GGUF} for the llama.cpp systems asked for: f32 / bf16 converted, Q8_0 / Q4_K_M quantized from
    bf16 by llama.cpp in a process of its own."""
    out = {}
    for system in systems:
        kind = LLAMA[system]
        if kind in ("f32", "bf16"):
            out[system] = to_gguf(path, WORK, kind)
        else:
            out[system] = common.isolated(quantize_gguf, to_gguf(path, WORK, "bf16"), kind)
    return out


def run_shape(shape: str, args) -> dict:
    path = checkpoint(shape)
    fields = SHAPES[shape][1]
    top_k = fields["num_experts_per_tok"]
    n_experts = fields.get("num_local_experts") or fields["n_routed_experts"]
    results: dict = {}
    wanted = [s for s in args.systems if s in LLAMA]
    try:
        files = ggufs(path, wanted) if wanted else {}
    except (ImportError, common.Crashed, RuntimeError) as e:
        files, results = {}, {s: {"failed": f"no GGUF: {type(e).__name__}: {e}"} for s in wanted}
    for system in args.systems:
        if system in results:
            continue
        sizes = (args.batches, args.prefill, args.tokens)
        if system in OURS:
            job = (measure_ours, path, *OURS[system], *sizes)
        elif system in LLAMA:
            job = (measure_llamacpp, files[system], not system.endswith("no-repack"), *sizes)
        else:
            job = (measure_transformers, path, *sizes)
        t0 = time.time()
        try:
            results[system] = common.isolated(*job)
        except Exception as e:  # a crash or a failure is a result of this run; the other systems go on
            results[system] = {"failed": f"{type(e).__name__}: {e}"}
        if system in LLAMA and "decode" in results[system]:
            results[system]["bytes_per_token"] = gguf_bytes_per_token(files[system], top_k, n_experts)
        print(f"{shape} / {system} ({time.time() - t0:.0f} s): {results[system]}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    p.add_argument("--tokens", type=int, default=48, help="new tokens per sequence in decode runs")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prefill", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--quick", action="store_true", help="16 tokens, batches 1 and 8, prefill 512")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.quick:
        args.tokens, args.batches, args.prefill = 16, [1, 8], [512]
    torch.set_num_threads(2)
    report = {"machine": common.machine_line(), "date": time.strftime("%Y-%m-%d %H:%M"), "args": dict(vars(args))}
    report["args"]["out"] = os.path.relpath(args.out.resolve(), ROOT)  # no machine paths in the results
    report["read_bandwidth"] = [common.read_bandwidth()]
    report["shapes"] = {}
    for shape in args.shapes:
        report["shapes"][shape] = run_shape(shape, args)
        report["read_bandwidth"].append(common.read_bandwidth())  # it drifts with the neighbours' load
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "hybrid_families.json").write_text(json.dumps(report, indent=1))
    report = json.loads(json.dumps(report))  # the keys as the JSON has them (strings), as render reads them
    (args.out / "hybrid_families.md").write_text(render(report))
    print(render(report))


def render(report: dict) -> str:
    bandwidth = max(report["read_bandwidth"])
    lines = [
        "# Hybrid MoE shapes side by side (python -m bench.hybrid_families)",
        "",
        f"{report['machine']}; {report['date']}; one run, each system in a process of its own. Greedy decode "
        f"tokens/s after a 16-token prompt ({report['args']['tokens']} new tokens a sequence), prefill tokens/s "
        f"of one prompt; best read bandwidth sampled in the run {bandwidth / 1e9:.1f} GB/s.",
        "",
    ]
    for shape, results in report["shapes"].items():
        lines += [f"## {shape}", "", *table_lines(results, bandwidth), "", *goal_lines(results, bandwidth), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
