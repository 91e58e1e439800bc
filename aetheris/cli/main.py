"""`aetheris` command line: train, generate, serve, analyze-router.

Each subcommand documents its options in --help. Bad options or config values end with a one-line
`aetheris: error: ...` naming the option, key or file, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args: argparse.Namespace) -> None:
    from training.config import load_config
    from training.trainer import Trainer

    overrides = args.set + ([f"checkpoint.keep_last={args.keep_last}"] if args.keep_last is not None else [])
    cfg = load_config(args.config, overrides)
    summary = Trainer(cfg, resume=args.resume).train()
    if summary:
        print(f"final checkpoint: {summary['final']}")
        if "eval_loss" in summary:
            print(f"held-out loss {summary['eval_loss']:.4f}, perplexity {summary['eval_ppl']:.2f}")


def _generate(args: argparse.Namespace) -> None:
    from aetheris.generate import generate

    generate(args)


def _analyze_router(args: argparse.Namespace) -> None:
    from training.router_analysis import run

    run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aetheris", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{train,generate,serve,analyze-router}")

    t = sub.add_parser("train", help="train a model from a YAML config (also under torchrun for DDP)")
    t.add_argument("--config", required=True, help="YAML config, e.g. configs/debug.yaml")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set schedule.steps=50 (repeatable)",
    )
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    t.add_argument(
        "--keep-last",
        type=int,
        default=None,
        metavar="K",
        help="keep only the newest K checkpoints (config checkpoint.keep_last; default: all)",
    )
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="stream a completion from a checkpoint to the terminal")
    g.add_argument(
        "--checkpoint_dir",
        "--model",
        dest="checkpoint_dir",
        default=None,
        help="our checkpoint dir, a HF Mamba/Jamba dir or a Hub repo id (default: the embedded model)",
    )
    g.add_argument("--prompt", required=True, help="the text to continue (or the user message with --chat)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max_tokens", type=int, default=200, help="new tokens at most (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens, 0 = off (default 0)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    g.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default auto)")
    g.set_defaults(func=_generate)

    a = sub.add_parser("analyze-router", help="expert load, router entropy and top tokens of a MoE checkpoint")
    a.add_argument(
        "--checkpoint_dir",
        "--model",
        dest="checkpoint_dir",
        required=True,
        help="our checkpoint dir, a MoE Jamba dir or a Hub repo id",
    )
    a.add_argument("--text", required=True, help="a UTF-8 text file to run through the model")
    a.add_argument("--out_dir", default="router-analysis", help="where router.json and the heatmap go")
    a.add_argument("--seq_len", type=int, default=256, help="tokens per forward pass (default 256)")
    a.add_argument(
        "--capacity_factor",
        type=float,
        default=0.0,
        help="report the share of assignments this capacity would drop (0 = dropless)",
    )
    a.add_argument("--top_tokens", type=int, default=10, help="most frequent tokens listed per expert")
    a.add_argument("--max_chars", type=int, default=200_000, help="read at most this many characters")
    a.set_defaults(func=_analyze_router)

    # `serve` is dispatched in main() before parsing: its options are python -m server's (see serve --help).
    sub.add_parser("serve", help="run the OpenAI-compatible server (same options as python -m server)")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:  # everything after `serve` belongs to python -m server's own parser
        from server.__main__ import main as serve_main

        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # e.g. which checkpoint was found
    from model.checkpoint import CheckpointError
    from training.config import ConfigError

    try:
        args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as e:
        parser.exit(2, f"aetheris: error: {e}\n")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
