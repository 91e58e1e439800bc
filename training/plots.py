"""PNG plots of a run from its log.jsonl: loss curves, and expert load per MoE layer over training."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_losses(records: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r["step"], r["ce"]) for r in records if "ce" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train cross-entropy")
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out cross-entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_expert_load(records: list[dict], out: Path) -> Path | None:
    """One panel per MoE layer: each expert's share of the assignments in every logged interval."""
    loads = [(r["step"], r["expert_load"]) for r in records if r.get("expert_load")]
    if not loads:
        return None
    layers = sorted(loads[0][1], key=int)
    fig, axes = plt.subplots(len(layers), 1, figsize=(7, 1.8 * len(layers) + 0.8), sharex=True, squeeze=False)
    for ax, layer in zip(axes[:, 0], layers):
        steps = [s for s, _ in loads]
        counts = [load[layer] for _, load in loads]
        for e in range(len(counts[0])):
            ax.plot(steps, [c[e] / max(1, sum(c)) for c in counts], lw=1)
        ax.axhline(1 / len(counts[0]), color="k", ls="--", lw=0.8)
        ax.set_ylabel(f"layer {layer}\nshare")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title("Expert load per MoE layer (dashed: perfect balance)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(log_file: Path, out_dir: Path) -> list[Path]:
    records = read_log(log_file)
    paths = [plot_losses(records, out_dir / "loss.png"), plot_expert_load(records, out_dir / "expert_load.png")]
    return [p for p in paths if p is not None]
