"""What weight-only quantization costs in quality, for int8 and int4 (and int4's group sizes):

- the embedded model (trained): held-out bits per byte of TinyStories validation text, and teacher-forced
  greedy-token agreement with the fp32 model on 50 held-out prompts;
- the mamba-130m-size random model: the mean KL divergence of its next-token distributions from fp32's on the
  same held-out text (random weights amplify every perturbation, so bf16 is given as the yardstick).

    python -m bench.quantize [--tokens 16384] [--hf-dir bench/work/mamba-130m-random]

Writes bench/results/quantize.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from aetheris.defaults import DEFAULT_MODEL_DIR
from model import HybridLM
from model.checkpoint import load_model
from model.int4 import quantizer as int4_quantizer
from model.quantized import INT8

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "data" / "corpus" / "tinystories_valid_first1000.txt"  # the default model trained on train
RESULTS = ROOT / "bench" / "results" / "quantize.json"
VARIANTS = {"int8": INT8, "int4 (g32)": int4_quantizer(32), "int4 (g64, served)": int4_quantizer(64)}
VARIANTS["int4 (g128)"] = int4_quantizer(128)


def variant(path: Path, name: str) -> HybridLM:
    """fp32, bf16, or a quantized variant (quantized while loading, as the server does) of the checkpoint."""
    if name in ("fp32", "bf16"):
        return load_model(path, dtype=torch.float32 if name == "fp32" else torch.bfloat16)[0]
    return load_model(path, quantizer=VARIANTS[name])[0]


@torch.inference_mode()
def logits_over(model: HybridLM, ids: list[int], window: int = 512) -> list[torch.Tensor]:
    """Next-token logits (L, V) for `ids` in independent windows, each window's last token excluded."""
    out = []
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1]).unsqueeze(0)  # (1, L + 1)
        if chunk.shape[1] < 2:
            break
        logits, _ = model.prefill(chunk[:, :-1], model.empty_state(1), all_logits=True)  # (1, L, V)
        out.append(logits[0].float())
    return out


def bits_per_byte(model: HybridLM, ids: list[int], text_bytes: int, window: int = 512) -> float:
    """Total next-token NLL of `ids` in bits over the UTF-8 bytes they cover."""
    nll = 0.0
    for i, logits in enumerate(logits_over(model, ids, window)):
        targets = torch.tensor(ids[i * window + 1 : i * window + 1 + logits.shape[0]])
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
    return nll / math.log(2) / text_bytes


@torch.inference_mode()
def greedy_agreement(ref: HybridLM, model: HybridLM, prompts: list[list[int]], new_tokens: int) -> float:
    """Teacher-forced top-1 agreement: `ref` writes a greedy continuation of each prompt; `model` reads the same
    tokens, and at each generated position its argmax is compared with the token `ref` chose."""
    same = total = 0
    for prompt in prompts:
        seq = torch.tensor([prompt])
        logits, state = ref.prefill(seq, ref.empty_state(1))
        for _ in range(new_tokens):
            nxt = logits.argmax(-1)  # (1,)
            seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
            logits, state = ref.decode(nxt, state)
        theirs, _ = model.prefill(seq[:, :-1], model.empty_state(1), all_logits=True)  # (1, L, V)
        hits = theirs[0, len(prompt) - 1 :].argmax(-1) == seq[0, len(prompt) :]
        same, total = same + int(hits.sum()), total + hits.numel()
    return same / total


def kl_divergence(ref: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over positions of KL(ref || other) of the next-token distributions, in nats."""
    total = count = 0
    for p, q in zip(ref, other):
        lp, lq = p.log_softmax(-1), q.log_softmax(-1)
        total += (lp.exp() * (lp - lq)).sum().item()
        count += p.shape[0]
    return total / count


def held_out_prompts(tok, n: int = 50, words: int = 12) -> list[list[int]]:
    """The first `words` words of the first n held-out stories."""
    stories = [s.strip() for s in HELD_OUT.read_text().split("<|endoftext|>") if s.strip()][:n]
    return [tok.encode(" ".join(s.split()[:words])) for s in stories]


def run(tokens: int = 16384, hf_dir: Path | None = None, new_tokens: int = 32) -> dict:
    _, tok = load_model(DEFAULT_MODEL_DIR)
    text = HELD_OUT.read_text()
    ids = tok.encode(text)[:tokens]
    text_bytes = len(tok.decode(ids).encode("utf-8"))
    prompts = held_out_prompts(tok)
    names = ["fp32", "bf16", *VARIANTS]
    ref = variant(DEFAULT_MODEL_DIR, "fp32")
    out: dict = {"default_model": {"tokens": len(ids), "bytes": text_bytes, "prompts": len(prompts)}}
    for name in names:
        model = variant(DEFAULT_MODEL_DIR, name)
        out["default_model"][name] = {
            "bits_per_byte": bits_per_byte(model, ids, text_bytes),
            "greedy_agreement": greedy_agreement(ref, model, prompts, new_tokens),
        }
    if hf_dir is not None:
        kl_ids = ids[:4096]
        base = logits_over(variant(hf_dir, "fp32"), kl_ids)
        out["mamba_130m"] = {"tokens": len(kl_ids)}
        for name in names[1:]:
            out["mamba_130m"][name] = {"kl_vs_fp32": kl_divergence(base, logits_over(variant(hf_dir, name), kl_ids))}
    return out


def table(out: dict) -> str:
    dm, lines = out["default_model"], []
    lines.append("| weights | bits/byte (embedded model) | greedy agreement vs fp32 | KL vs fp32, 130m-size (nats) |")
    lines.append("|---|---:|---:|---:|")
    for name in ("fp32", "bf16", *VARIANTS):
        kl = out.get("mamba_130m", {}).get(name, {}).get("kl_vs_fp32")
        lines.append(
            f"| {name} | {dm[name]['bits_per_byte']:.4f} | {100 * dm[name]['greedy_agreement']:.1f}% | "
            + ("-" if kl is None else f"{kl:.4f}")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens for bits per byte")
    p.add_argument("--hf-dir", type=Path, default=None, help="the mamba-130m-size HF dir, for the KL divergence")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = run(args.tokens, args.hf_dir)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))


if __name__ == "__main__":
    main()
