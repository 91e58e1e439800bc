"""Constrained decoding cost: decode tokens/s through EngineCore at batch 1 and 8 with every sequence held to a
JSON schema vs the same run without one, on the embedded model and the random mamba-130m-size model.

    python -m bench.structured [--repeats 3] [--new-tokens 128]

The schema keeps every sequence inside one long JSON string (minLength), so no sequence finishes early and
each counted iteration decodes the whole batch; greedy, weights packed as the server packs them. Runs
alternate (plain, constrained) and the median of each is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from aetheris.defaults import DEFAULT_MODEL_DIR
from bench import ours
from bench.weights import mamba_130m
from model.checkpoint import load_model
from model.packed import can_pack, pack_linears
from server.engine.grammar import GrammarCompiler, GrammarSpec

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}


def measure(name: str, path: Path, repeats: int, new_tokens: int) -> list[dict]:
    model, tok = load_model(path)
    if can_pack(model):
        pack_linears(model)
    grammar = GrammarCompiler(tok).compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    rows = []
    for batch in (1, 8):
        ours.decode_tokens_per_s(model, tok, batch, 16, grammar=grammar)  # warm-up
        plain, constrained = [], []
        for _ in range(repeats):
            plain.append(ours.decode_tokens_per_s(model, tok, batch, new_tokens))
            constrained.append(ours.decode_tokens_per_s(model, tok, batch, new_tokens, grammar=grammar))
        p, c = statistics.median(plain), statistics.median(constrained)
        rows.append({"model": name, "batch": batch, "plain": p, "json_schema": c, "ratio": c / p})
        print(f"{name:>16} batch {batch}: {p:8.1f} tok/s plain, {c:8.1f} with a JSON schema ({c / p:.1%})")  # noqa: T201
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    random130 = mamba_130m(ROOT / "bench" / "work" / "mamba-130m-random", tokenizer_dir=DEFAULT_MODEL_DIR)
    rows = measure("aetheris-hybrid", DEFAULT_MODEL_DIR, args.repeats, args.new_tokens)
    rows += measure("mamba-130m-size", random130, args.repeats, args.new_tokens)
    out = ROOT / "bench" / "results" / "structured.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
