"""MoE-Mamba vs Mamba at small scale (Pióro et al. 2024): same data order, tokens, schedule and seed.

Runs (a) dense Mamba with 2N Mamba layers, (b) MoE-Mamba with N Mamba + N top-1 MoE layers whose experts are
sized so one active expert matches one Mamba layer's parameters (SwiGLU 3*D*F = Mamba's ~6*D^2 -> F = 2D),
and (c) the same MoE-Mamba with each expert count of --experts. Writes a markdown table, JSON and a PNG of
held-out loss vs step to --out.

    python experiments/moe_vs_mamba.py                 # 1,500 steps per run: about an hour on 2 CPU cores
    python experiments/moe_vs_mamba.py --steps 500     # a shorter run: 20 minutes
    python experiments/moe_vs_mamba.py --smoke --train some.txt --out /tmp/x   # seconds, for tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import parse_config  # noqa: E402
from training.trainer import Trainer  # noqa: E402

CORPUS = ROOT / "data" / "corpus"


def run_config(args, name: str, layers: list[dict], extra: dict) -> dict:
    return {
        "out_dir": str(Path(args.out) / "runs" / name),
        "seed": args.seed,
        "threads": args.threads,
        "model": {"preset": "debug", "vocab_size": args.vocab, "d_model": args.d_model, "layers": layers, **extra},
        "data": {
            "train": [args.train],
            "eval": [args.eval] if args.eval else [],
            "eval_fraction": 0.05,
            "separator": args.separator,
            "seq_len": args.seq_len,
            "cache_dir": str(Path(args.out) / "cache"),
            "max_documents": args.max_documents,
        },
        "tokenizer": {"vocab_size": args.vocab},
        "optim": {"lr": args.lr, "grad_clip": 0.5, "weight_decay": 0.1},
        "schedule": {"steps": args.steps, "warmup": 0.05, "batch_size": args.batch_size},
        "eval": {"every": args.eval_every, "batches": args.eval_batches, "batch_size": args.batch_size},
        "checkpoint": {"every": 10**9},
        "log_every": args.eval_every,
    }


def train(cfg: dict) -> dict:
    t0 = time.perf_counter()
    trainer = Trainer(parse_config(cfg), log=lambda *a: None)
    total, active = trainer.model.num_parameters()
    trainer.train()
    seconds = time.perf_counter() - t0
    log = [json.loads(line) for line in (Path(cfg["out_dir"]) / "log.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    return {
        "total_params": total,
        "active_params": active,
        "seconds": seconds,
        "seconds_per_step": seconds / cfg["schedule"]["steps"],
        "evals": evals,
        "final_eval": evals[-1][1],
    }


def repo_relative(args: dict) -> dict:
    """Paths inside the repository as relative ones, so a results file names no machine's folders."""

    def relative(value):
        path = Path(value).resolve() if isinstance(value, str) and Path(value).is_absolute() else None
        return str(path.relative_to(ROOT)) if path is not None and ROOT in path.parents else value

    return {key: relative(value) for key, value in args.items()}


def first_step_reaching(evals: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in evals if loss <= target), None)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", default=str(CORPUS / "tinystories_train_first5000_recased.txt"))
    p.add_argument("--eval", default=str(CORPUS / "tinystories_valid_first1000.txt"))
    p.add_argument("--separator", default=r"\n\s*<\|endoftext\|>\s*\n|(?<!\n)\n(?!\n)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "moe_mamba"))
    p.add_argument("--blocks", type=int, default=2, help="N: MoE-Mamba has N Mamba + N MoE layers, dense 2N")
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--experts", default="1,4,8,16", help="expert counts to sweep")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batches", type=int, default=8)
    p.add_argument("--max_documents", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: runs in seconds (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.d_model, args.vocab, args.seq_len, args.batch_size, args.steps = 16, 300, 16, 4, 6
        args.eval_every, args.eval_batches, args.experts, args.threads, args.eval = 3, 1, "1,2", 1, None
    experts = [int(e) for e in args.experts.split(",")]
    n, d = args.blocks, args.d_model
    runs = {"mamba (dense)": run_config(args, "dense", [{"mixer": "mamba", "ffn": None}] * (2 * n), {})}
    for e in experts:
        runs[f"moe-mamba E={e}"] = run_config(
            args,
            f"moe{e}",
            [{"mixer": "mamba", "ffn": "moe"}] * n,
            {"n_experts": e, "top_k": 1, "d_ff": 2 * d, "aux_loss_coef": 0.01},
        )
    results = {name: train(cfg) for name, cfg in runs.items()}
    report(args, results)
    return results


def report(args, results: dict) -> None:
    out = Path(args.out)
    dense = results["mamba (dense)"]
    target = dense["final_eval"]
    lines = [
        f"Budget: {args.steps} steps x {args.batch_size} sequences x {args.seq_len} tokens "
        f"({args.steps * args.batch_size * args.seq_len:,} tokens) per run, d_model {args.d_model}, "
        f"N = {args.blocks}, vocab {args.vocab}, seed {args.seed}, {args.threads} CPU threads.",
        "",
        "| run | total params | active params | final eval loss | step reaching dense final | speed-up | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        step = first_step_reaching(r["evals"], target)
        speedup = f"{args.steps / step:.2f}x" if step else "not reached"
        lines.append(
            f"| {name} | {r['total_params']:,} | {r['active_params']:,} | {r['final_eval']:.4f} | "
            f"{step if step else '-'} | {speedup} | {r['seconds_per_step']:.2f} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(
        json.dumps({"args": repo_relative(vars(args)), "results": results}, indent=2) + "\n"
    )
    plot(results, out / "eval_loss.png")
    print(table)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        steps, losses = zip(*r["evals"])
        ax.plot(steps, losses, "o-" if "dense" in name else ".-", label=name, lw=2 if "dense" in name else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("MoE-Mamba vs Mamba: held-out loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
