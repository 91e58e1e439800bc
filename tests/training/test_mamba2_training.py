"""`aetheris train` on a Mamba-2 + attention + MoE hybrid from a YAML config: the shipped config parses, a
debug-size run's loss drops, and its checkpoint loads back with the same layers and the same logits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from model.checkpoint import load_model
from tests.training.test_training import ROOT, losses, write_config
from training.config import load_config

LAYERS = [{"mixer": "mamba2", "ffn": "moe"}, {"mixer": "attention", "ffn": "mlp"}, {"mixer": "mamba2", "ffn": None}]


def test_shipped_config_builds_the_hybrid():
    cfg = load_config(ROOT / "configs" / "mamba2-hybrid.yaml")
    model = cfg.model.build(cfg.tokenizer.vocab_size)
    assert [(s.mixer, s.ffn) for s in model.layers] == [(d["mixer"], d["ffn"]) for d in LAYERS]
    assert model.mamba2_n_heads == 8 and model.n_groups == 2 and model.shared_d_ff == 64


def test_cli_trains_a_mamba2_moe_hybrid(tmp_path):
    path = write_config(tmp_path, **{"schedule.steps": 24, "eval.every": 12, "checkpoint.every": 12})
    cfg = yaml.safe_load(path.read_text())
    cfg["model"] = {
        "preset": "debug", "d_model": 32, "d_ff": 48, "layers": LAYERS, "mamba2_head_dim": 8, "n_groups": 2,
        "chunk_size": 8, "n_heads": 4, "n_kv_heads": 2, "rope_theta": 10000.0, "shared_d_ff": 16, "top_k": 2,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "aetheris.cli", "train", "--config", str(path)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    run = Path(cfg["out_dir"])
    ce = losses(run, "ce")
    assert sum(ce[-4:]) / 4 < sum(ce[:4]) / 4 - 0.5
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert sum(rec["expert_load"]["0"]) > 0  # the MoE of layer 0 routed tokens
    model, tok = load_model(run / "final")
    assert [s.mixer for s in model.config.layers] == ["mamba2", "attention", "mamba2"]
    tokens = torch.tensor([tok.encode("Once upon a time there was a cat.")])
    full = model(tokens).logits[0, -1]
    logits, state = model.prefill(tokens[:, :-1], model.empty_state(1))
    logits, _ = model.decode(tokens[:, -1], state)
    torch.testing.assert_close(logits[0], full, atol=1e-4, rtol=1e-4)
