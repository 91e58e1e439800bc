"""analyze-router counts, and the MoE-vs-Mamba experiment script end to end at its smallest setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from model import HybridLM
from model.checkpoint import save_checkpoint
from tests.helpers import TOY_TEXT, jamba_config, tiny_config, toy_tokenizer
from training.router_analysis import analyze

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("top_k", [1, 2])
def test_router_counts_add_up(top_k):
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size, top_k=top_k, layers=[{"mixer": "mamba", "ffn": "moe"}] * 2)).eval()
    text = " ".join(TOY_TEXT[:6])
    n = len(tok.encode(text, add_special_tokens=False))
    s = analyze(model, tok, text, seq_len=37, capacity_factor=1.0)
    assert s["tokens"] == n and set(s["layers"]) == {"0", "1"}
    for layer in s["layers"].values():
        assert sum(layer["tokens_per_expert"]) == n * top_k
        assert abs(sum(layer["share"]) - 1) < 1e-9 and 0 <= layer["router_entropy"] <= layer["max_entropy"] + 1e-6
        assert 0 <= layer["dropped_share"] < 1
        assert sum(c for toks in layer["top_tokens"].values() for _, c in toks) <= n * top_k


def test_analyze_router_cli(tmp_path):
    tok = toy_tokenizer()
    save_checkpoint(HybridLM(tiny_config(tok.vocab_size)), tmp_path / "ckpt", tok)
    (tmp_path / "t.txt").write_text(" ".join(TOY_TEXT[:3]))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "aetheris.cli",
            "analyze-router",
            "--checkpoint_dir",
            str(tmp_path / "ckpt"),
            "--text",
            str(tmp_path / "t.txt"),
            "--out_dir",
            str(tmp_path / "o"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "o" / "router.json").read_text())
    assert (tmp_path / "o" / "router_heatmap.png").stat().st_size > 1000 and "1" in summary["layers"]
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "aetheris.cli",
            "analyze-router",
            "--checkpoint_dir",
            str(tmp_path / "ckpt"),
            "--text",
            str(tmp_path / "missing.txt"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "missing.txt does not exist" in bad.stderr


def test_analyze_router_on_a_jamba_checkpoint(tmp_path):
    """An HF JambaForCausalLM dir (MoE every other layer, top-2) with a tokenizer beside it: the CLI path."""
    transformers = pytest.importorskip("transformers", reason="transformers writes the Jamba checkpoint")
    tok = toy_tokenizer()
    cfg = jamba_config(vocab_size=tok.vocab_size)
    transformers.JambaForCausalLM(cfg).save_pretrained(tmp_path / "jamba")
    tok.save(tmp_path / "jamba")
    text = " ".join(TOY_TEXT[:4])
    (tmp_path / "t.txt").write_text(text)
    r = subprocess.run(
        [sys.executable, "-m", "aetheris.cli", "analyze-router", "--checkpoint_dir", str(tmp_path / "jamba")]
        + ["--text", str(tmp_path / "t.txt"), "--out_dir", str(tmp_path / "o")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "o" / "router.json").read_text())
    n = len(tok.encode(text, add_special_tokens=False))
    assert set(summary["layers"]) == {"1", "3"} and summary["tokens"] == n
    assert all(sum(layer["tokens_per_expert"]) == 2 * n for layer in summary["layers"].values())


def test_experiment_smoke(tmp_path):
    text = tmp_path / "toy.txt"
    text.write_text("\n<|endoftext|>\n".join(TOY_TEXT))
    r = subprocess.run(
        [
            sys.executable,
            "experiments/moe_vs_mamba.py",
            "--smoke",
            "--train",
            str(text),
            "--separator",
            r"\n<\|endoftext\|>\n",
            "--out",
            str(tmp_path / "out"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / "out" / "results.md").read_text()
    assert "mamba (dense)" in table and "moe-mamba E=2" in table
    assert (tmp_path / "out" / "eval_loss.png").stat().st_size > 1000
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    dense, moe = results["mamba (dense)"], results["moe-mamba E=2"]
    assert moe["total_params"] > moe["active_params"] and dense["total_params"] == dense["active_params"]
