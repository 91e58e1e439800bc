"""`aetheris generate`: load any checkpoint the model package loads and stream a completion to the terminal."""

from __future__ import annotations

import argparse
import sys

import torch

from model.checkpoint import load_model
from model.sampling import SamplingBatch, sample, sampleable_vocab
from model.tokenizer import IncrementalDetokenizer

from .defaults import DEFAULT_MODEL_DIR

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_options(args: argparse.Namespace) -> None:
    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise ValueError(f"--dtype: expected auto, float32, bfloat16 or float16, got {args.dtype!r}")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but no CUDA device is available")
    checks = {
        "--temperature": args.temperature >= 0,
        "--top_p": 0 < args.top_p <= 1,
        "--top_k": args.top_k >= 0,
        "--max_tokens": args.max_tokens >= 1,
    }
    for name, ok in checks.items():
        if not ok:
            raise ValueError(f"{name}: invalid value {getattr(args, name[2:])!r}")


def generate(args: argparse.Namespace, out=sys.stdout) -> str:
    check_options(args)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    model, tok = load_model(args.checkpoint_dir or DEFAULT_MODEL_DIR, device, DTYPES.get(args.dtype))
    if tok is None:
        raise FileNotFoundError(f"{args.checkpoint_dir}: no tokenizer.json beside the weights")
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt: empty after tokenisation")
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    params = SamplingBatch.uniform(1, args.temperature, args.top_k, args.top_p)
    params.generators = [gen]
    vocab = sampleable_vocab(model.config.vocab_size, tok.vocab_size)
    logits, state = model.prefill(torch.tensor([ids], dtype=torch.long, device=device), model.empty_state(1, device))
    detok, text = IncrementalDetokenizer(tok), []
    for _ in range(args.max_tokens):
        token = int(sample(logits[:, :vocab].float(), params)[0])
        if token in tok.stop_token_ids:
            break
        piece = detok.push(token)
        text.append(piece)
        out.write(piece)
        out.flush()
        logits, state = model.decode(torch.tensor([token], device=device), state)
    tail = detok.flush()
    out.write(tail + "\n")
    return "".join(text) + tail
