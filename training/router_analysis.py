"""`aetheris analyze-router`: what the MoE routers do on a text.

For each MoE layer: assignments per expert (they sum to tokens x top_k), each expert's share, the mean
entropy of the router distribution (nats; ln E = undecided, 0 = certain), the entropy of the load itself,
the share of assignments a capacity factor would drop, and the tokens each expert sees most often.
Writes a JSON summary and a heatmap PNG (layers x experts, share of assignments).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch

from model import HybridLM
from model.moe import MoE, RouterOutput
from model.tokenizer import Tokenizer


def _capacity_drops(experts: torch.Tensor, n_experts: int, capacity_factor: float) -> int:
    """Assignments beyond each expert's capacity in one forward pass (Switch §2.2), first come first served."""
    flat = experts.reshape(-1)
    capacity = math.ceil(capacity_factor * experts.shape[0] * experts.shape[1] / n_experts)
    counts = torch.bincount(flat, minlength=n_experts)
    return int((counts - capacity).clamp(min=0).sum())


@torch.inference_mode()
def analyze(
    model: HybridLM,
    tokenizer: Tokenizer,
    text: str,
    seq_len: int = 256,
    capacity_factor: float = 0.0,
    top_tokens: int = 10,
) -> dict:
    moes: dict[int, MoE] = model.moe_layers()
    if not moes:
        raise ValueError("the model has no MoE layers to analyse")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError("the text is empty after tokenisation")
    chunks = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    stats = {
        i: {
            "counts": torch.zeros(m.n_experts, dtype=torch.long),
            "entropy": 0.0,
            "dropped": 0,
            "tokens": [Counter() for _ in range(m.n_experts)],
        }
        for i, m in moes.items()
    }
    captured: dict[int, RouterOutput] = {}
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, out[1])) for i, m in moes.items()
    ]
    device = model.embeddings.weight.device
    try:
        for chunk in chunks:  # one sequence at a time: no padding enters the statistics
            model.prefill(torch.tensor([chunk], device=device), model.empty_state(1, device))
            for i, r in captured.items():
                _accumulate(stats[i], r, chunk, moes[i], capacity_factor)
    finally:
        for h in hooks:
            h.remove()
        for m in moes.values():
            m.reset_stats()
    return _summary(stats, moes, tokenizer, len(ids), capacity_factor, top_tokens)


def _accumulate(s: dict, r: RouterOutput, chunk: list[int], moe: MoE, capacity_factor: float) -> None:
    s["counts"] += torch.bincount(r.experts.reshape(-1).cpu(), minlength=moe.n_experts)
    p = r.logits.float().softmax(-1)
    s["entropy"] += float(-(p * p.clamp_min(1e-12).log()).sum())
    if capacity_factor > 0:
        s["dropped"] += _capacity_drops(r.experts.cpu(), moe.n_experts, capacity_factor)
    for tok, row in zip(chunk, r.experts.tolist()):
        for e in row:
            s["tokens"][e][tok] += 1


def _summary(stats, moes, tokenizer: Tokenizer, n_tokens: int, capacity_factor: float, top_tokens: int) -> dict:
    layers = {}
    for i, s in stats.items():
        counts = s["counts"].tolist()
        total = sum(counts)
        share = [c / total for c in counts]
        layers[str(i)] = {
            "tokens_per_expert": counts,
            "share": share,
            "router_entropy": s["entropy"] / n_tokens,
            "load_entropy": -sum(p * math.log(p) for p in share if p > 0),
            "max_entropy": math.log(len(counts)),
            "dropped_share": s["dropped"] / total if capacity_factor > 0 else None,
            "top_tokens": {
                str(e): [
                    [tokenizer.decode([t], skip_special_tokens=False), c]
                    for t, c in s["tokens"][e].most_common(top_tokens)
                ]
                for e in range(len(counts))
            },
        }
    top_k = next(iter(moes.values())).top_k
    return {"tokens": n_tokens, "top_k": top_k, "capacity_factor": capacity_factor or None, "layers": layers}


def heatmap(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["layers"])
    grid = [summary["layers"][n]["share"] for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(grid[0]) + 2), 0.5 * len(names) + 1.5))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(names)), [f"layer {n}" for n in names])
    ax.set_xlabel("expert")
    ax.set_title(f"Share of assignments per expert ({summary['tokens']} tokens, top-{summary['top_k']})")
    fig.colorbar(im, ax=ax, label="share")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(args) -> dict:
    from model.checkpoint import load_model

    if args.seq_len < 1 or args.max_chars < 1 or args.capacity_factor < 0:
        raise ValueError("--seq_len and --max_chars must be >= 1 and --capacity_factor >= 0")
    model, tok = load_model(args.checkpoint_dir)
    if tok is None:
        raise FileNotFoundError(f"{args.checkpoint_dir}: no tokenizer.json beside the weights")
    text_file = Path(args.text)
    if not text_file.exists():
        raise FileNotFoundError(f"--text: {text_file} does not exist")
    summary = analyze(
        model,
        tok,
        text_file.read_text(encoding="utf-8")[: args.max_chars],
        args.seq_len,
        capacity_factor=args.capacity_factor,
        top_tokens=args.top_tokens,
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "router.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    heatmap(summary, out / "router_heatmap.png")
    for name, layer in summary["layers"].items():
        print(
            f"layer {name}: entropy {layer['router_entropy']:.3f} / {layer['max_entropy']:.3f} nats, "
            f"load {layer['tokens_per_expert']}"
            + (f", dropped {layer['dropped_share']:.1%}" if layer["dropped_share"] is not None else "")
        )
    print(f"wrote {out / 'router.json'} and {out / 'router_heatmap.png'}")
    return summary
