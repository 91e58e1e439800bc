"""What `--quantize int8` costs in quality: held-out perplexity of the default model, and greedy agreement with
the unquantized model on the mamba-130m-size weights.

    python -m bench.quantize [--tokens 16384]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from aetheris.defaults import DEFAULT_MODEL_DIR
from model import HybridLM
from model.checkpoint import load_model
from model.quantized import quantize_int8

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "data" / "corpus" / "tinystories_valid_first1000.txt"  # the default model trained on train


@torch.inference_mode()
def perplexity(model: HybridLM, ids: list[int], window: int = 512) -> float:
    """exp(mean next-token NLL) over `ids` in independent windows of `window` tokens."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[start : start + window + 1]).unsqueeze(0)  # (1, L + 1)
        if chunk.shape[1] < 2:
            break
        logits, _ = model.prefill(chunk[:, :-1], model.empty_state(1), all_logits=True)  # (1, L, V)
        nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / count)


@torch.inference_mode()
def greedy_agreement(ref: HybridLM, model: HybridLM, prompts: torch.Tensor, new_tokens: int) -> dict:
    """Teacher-forced top-1 agreement: `ref` writes greedy continuations of `prompts` (B, P); `model` reads the
    same tokens, and at each generated position its argmax is compared with the token `ref` chose. Also how
    many whole continuations `model` would have written identically on its own (no divergence)."""
    seqs = prompts
    logits, state = ref.prefill(seqs, ref.empty_state(seqs.shape[0]))
    for _ in range(new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        seqs = torch.cat([seqs, nxt.unsqueeze(1)], dim=1)
        logits, state = ref.decode(nxt, state)
    theirs, _ = model.prefill(seqs[:, :-1], model.empty_state(seqs.shape[0]), all_logits=True)  # (B, L, V)
    P = prompts.shape[1]
    same = theirs[:, P - 1 :].argmax(-1) == seqs[:, P:]  # (B, new_tokens)
    return {"top1_agreement": same.float().mean().item(), "identical_continuations": int(same.all(1).sum())}


def run(tokens: int = 16384, hf_dir: Path | None = None, prompts: int = 16, new_tokens: int = 64) -> dict:
    out: dict = {}
    model, tok = load_model(DEFAULT_MODEL_DIR)
    ids = tok.encode(HELD_OUT.read_text())[:tokens]
    out["default_model"] = {"tokens": len(ids), "fp32": perplexity(model, ids)}
    quantize_int8(model)
    out["default_model"]["int8"] = perplexity(model, ids)
    if hf_dir is not None:
        ref, _ = load_model(hf_dir)
        model, _ = load_model(hf_dir)
        quantize_int8(model)
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, ref.config.vocab_size, (prompts, 16), generator=g)
        out["mamba_130m"] = {"prompts": prompts, "new_tokens": new_tokens}
        out["mamba_130m"]["int8"] = greedy_agreement(ref, model, starts, new_tokens)
        # bf16 weights perturb the model about as much as int8 does (~0.4% per weight): the baseline that tells
        # the network's sensitivity apart from the quantizer's
        bf16, _ = load_model(hf_dir, dtype=torch.bfloat16)
        out["mamba_130m"]["bf16"] = greedy_agreement(ref, bf16, starts, new_tokens)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="held-out tokens for the perplexity")
    p.add_argument("--hf-dir", type=Path, default=None, help="an HF Mamba dir for the greedy agreement")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(run(args.tokens, args.hf_dir))


if __name__ == "__main__":
    main()
