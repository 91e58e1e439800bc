"""Training pipeline: config checks, tokenizer + packing, loss goes down, exact resume, DDP == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from model.checkpoint import load_model
from training.config import ConfigError, load_config, parse_config
from training.data import pack, prepare_data, read_documents
from training.trainer import Trainer, batch_indices

ROOT = Path(__file__).resolve().parents[2]
STORIES = [
    "Once upon a time there was a little cat named Tom. Tom liked to play with a red ball in the garden.",
    "One day, Lily went to the park with her mom. She saw a big dog and said hello to it.",
    "The sun was warm and the birds sang. A small frog jumped into the pond and made a big splash.",
    "Ben had a toy car. He raced it down the hill. The car went fast and Ben laughed and laughed.",
] * 12


def write_config(tmp_path: Path, **overrides) -> Path:
    data = tmp_path / "stories.txt"
    data.write_text("\n<|endoftext|>\n".join(STORIES))
    cfg = {
        "out_dir": str(tmp_path / "run"),
        "seed": 3,
        "model": {"preset": "debug", "d_model": 32, "d_ff": 48},
        "data": {"train": [str(data)], "eval_fraction": 0.1, "seq_len": 32, "cache_dir": str(tmp_path / "cache")},
        "tokenizer": {"vocab_size": 320},
        "optim": {"lr": 0.01},
        "schedule": {"steps": 30, "warmup": 2, "batch_size": 8},
        "eval": {"every": 15, "batches": 2, "batch_size": 4},
        "checkpoint": {"every": 10},
        "log_every": 1,
    }
    for key, value in overrides.items():
        section, _, leaf = key.partition(".")
        cfg.setdefault(section, {})[leaf] = value
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def losses(run: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def test_config_errors_name_the_key(tmp_path):
    cfg = write_config(tmp_path)
    with pytest.raises(ConfigError, match=r"^optim\.lrr: unknown key"):
        load_config(cfg, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^schedule\.steps: expected int, got 'many'"):
        load_config(cfg, ["schedule.steps=many"])
    with pytest.raises(ConfigError, match=r"^model\.d_modle: unknown key"):
        parse_config({"model": {"d_modle": 3}, "data": {"train": ["x"]}})
    with pytest.raises(ConfigError, match=r"^schedule.batch_size: must be a multiple"):
        load_config(cfg, ["schedule.grad_accum=3"])
    with pytest.raises(ConfigError, match=r"^model: model config: d_model must be an integer, got 12.5"):
        load_config(cfg, ["model.d_model=12.5"])
    r = subprocess.run(
        [sys.executable, "-m", "aetheris.cli", "train", "--config", str(cfg), "--set", "optim.lr=-1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.strip() == "aetheris: error: optim.lr: invalid value -1.0"


def test_tokenizer_and_packing_respect_documents(tmp_path):
    cfg = load_config(write_config(tmp_path))
    docs = read_documents([tmp_path / "stories.txt"], cfg.data.separator, "text")
    assert len(docs) == len(STORIES) and docs[0] == STORIES[0]
    data = prepare_data(cfg, log=lambda *a: None)
    eot = data.tokenizer.token_to_id("<|endoftext|>")
    stream = data.train.tolist() + data.eval.tolist()
    texts = data.tokenizer.decode(stream, skip_special_tokens=False).split("<|endoftext|>")
    assert sorted(t for t in texts if t) == sorted(STORIES)  # every document once, each ended by EOT
    assert stream.count(eot) == len(STORIES)
    x, y = data.sequences(torch.tensor([0, 1]))
    assert x.shape == (2, 32) and torch.equal(x[0, 1:], y[0, :-1]) and torch.equal(y[0, -1:], x[1, :1])
    messages = []
    again = prepare_data(cfg, log=messages.append)
    assert torch.equal(again.train, data.train) and messages[0].startswith("data: cached tokens")
    assert pack([[5, 6], [7]], eot).tolist() == [5, 6, eot, 7, eot]


def test_batches_are_deterministic_and_cover_epochs():
    a = [batch_indices(s, 4, 10, seed=1) for s in range(5)]
    b = [batch_indices(s, 4, 10, seed=1) for s in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    first_epoch = torch.cat(a)[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))


def test_debug_training_loss_drops_and_writes_outputs(tmp_path):
    summary = Trainer(load_config(write_config(tmp_path))).train()
    run = tmp_path / "run"
    ce = losses(run, "ce")
    assert sum(ce[-5:]) / 5 < sum(ce[:5]) / 5 - 0.5
    assert (run / "final" / "model.safetensors").exists() and (run / "loss.png").exists()
    assert (run / "expert_load.png").exists() and summary["eval_loss"] < ce[0]
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert sum(rec["expert_load"]["1"]) > 0 and "eval_ppl" in rec


def test_resume_is_exact(tmp_path):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir()
    part_dir.mkdir()
    Trainer(load_config(write_config(full_dir, **{"schedule.steps": 20}))).train()
    interrupted = Trainer(load_config(write_config(part_dir, **{"schedule.steps": 20})))
    for _ in range(10):  # a run killed after its step-10 checkpoint
        interrupted.train_step()
    interrupted.save()
    resumed = Trainer(load_config(part_dir / "cfg.yaml"), resume=True)
    assert resumed.step == 10
    resumed.train()
    full, part = losses(full_dir / "run"), losses(part_dir / "run")
    assert len(full) == 20 and part == full[10:]


def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo processes x 4 sequences == 1 process x 8. The Switch aux loss is computed per process (as on
    real multi-device runs), which makes the two objectives differ slightly; the test turns it off."""
    runs = {}
    for nproc in (1, 2):
        d = tmp_path / f"p{nproc}"
        d.mkdir()
        cfg = write_config(d, **{"schedule.steps": 6, "checkpoint.every": 100, "eval.every": 100})
        subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nproc_per_node",
                str(nproc),
                "--master_port",
                str(29500 + nproc),
                "-m",
                "aetheris.cli",
                "train",
                "--config",
                str(cfg),
                "--set",
                "model.aux_loss_coef=0",
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300,
        )
        runs[nproc] = losses(d / "run")
    assert len(runs[1]) == len(runs[2]) == 6
    assert max(abs(a - b) for a, b in zip(runs[1], runs[2])) < 1e-4


def test_bf16_autocast_training_runs_and_keeps_router_and_scan_fp32(tmp_path, monkeypatch):
    """Under bf16 autocast the selective scan gets fp32 inputs with autocast off inside it, the router's logits
    are fp32, the rest runs in bf16, and the losses follow an fp32 run's from the same seed as they fall."""
    import model.mamba

    scans = []  # (input dtypes, autocast on inside it, output dtype) for each scan call

    def spy(*args, **kw):
        y, h = scan(*args, **kw)
        scans.append(
            ({a.dtype for a in args if isinstance(a, torch.Tensor)}, torch.is_autocast_enabled("cpu"), y.dtype)
        )
        return y, h

    scan = model.mamba.selective_scan
    monkeypatch.setattr(model.mamba, "selective_scan", spy)
    ce = {}
    for precision in ("fp32", "bf16"):  # `scans` ends as the bf16 run's: 4 steps x 2 Mamba layers
        (tmp_path / precision).mkdir()
        cfg = load_config(write_config(tmp_path / precision, **{"schedule.steps": 4}), [f"precision={precision}"])
        trainer = Trainer(cfg)
        scans.clear()
        ce[precision] = [trainer.train_step()["ce"] for _ in range(4)]
    assert trainer.autocast == torch.bfloat16
    assert len(scans) == 4 * 2 and all(s == ({torch.float32}, False, torch.float32) for s in scans)
    assert ce["bf16"] == pytest.approx(ce["fp32"], abs=0.05) and ce["bf16"][-1] < ce["bf16"][0] - 0.3
    x, _ = trainer.data.sequences(torch.tensor([0]))
    with torch.autocast("cpu", torch.bfloat16):
        out = trainer.model(x)
    assert torch.equal(out.logits, out.logits.bfloat16().float())  # the head ran in bf16, cast to fp32 after
    assert out.routers[0].logits.dtype == torch.float32


def test_expert_load_counts_training_tokens_only(tmp_path):
    cfg = load_config(
        write_config(tmp_path, **{"schedule.steps": 4, "eval.every": 2}), ["gradient_checkpointing=true", "log_every=2"]
    )
    Trainer(cfg).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for r in records:  # 2 steps x 8 sequences x 32 tokens, top-1: neither eval nor recompute counted
        assert sum(r["expert_load"]["1"]) == 2 * 8 * 32


def test_generate_cli_errors_name_the_option(tmp_path):
    from model import HybridLM
    from model.checkpoint import save_checkpoint
    from tests.helpers import tiny_config, toy_tokenizer

    tok = toy_tokenizer()
    save_checkpoint(HybridLM(tiny_config(tok.vocab_size)), tmp_path / "m", tok)
    base = [sys.executable, "-m", "aetheris.cli", "generate", "--checkpoint_dir", str(tmp_path / "m")]
    for extra, message in [
        (["--prompt", "hi", "--top_p", "0"], "--top_p: invalid value 0.0"),
        (["--prompt", ""], "--prompt: empty after tokenisation"),
        (["--prompt", "hi", "--device", "tpu"], "--device: expected auto, cpu or cuda, got 'tpu'"),
    ]:
        r = subprocess.run(base + extra, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.strip() == f"aetheris: error: {message}", r.stderr
    ok = subprocess.run(
        base + ["--prompt", "Once", "--max_tokens", "5", "--seed", "1"], cwd=ROOT, capture_output=True, text=True
    )
    assert ok.returncode == 0 and ok.stdout.strip()


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_read_data_inside_the_repository(config):
    """A fresh clone has nothing beside it: every data file a shipped config names is in the repository."""
    cfg = load_config(config)
    for name in cfg.data.train + cfg.data.eval:
        path = (ROOT / name).resolve()
        assert path.is_relative_to(ROOT) and path.is_file(), f"{config.name}: {name}"


def test_readme_train_command_runs_from_the_repository_root(tmp_path):
    """README's `aetheris train --config configs/debug.yaml`, shortened to 3 steps, run as a user would."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    cmd = [sys.executable, "-m", "aetheris.cli", "train", "--config", "configs/debug.yaml"]
    cmd += ["--set", "schedule.steps=3", "--set", f"out_dir={out}", "--set", f"data.cache_dir={cache}"]
    cmd += ["--set", "eval.every=3", "--set", "checkpoint.every=3"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "model.safetensors").exists()


def test_jamba_style_hybrid_trains_and_serves_from_its_checkpoint(tmp_path):
    """Mamba + attention + MoE layers from a YAML layout: the loss drops, and the checkpoint loads with its
    attention layer and decodes as its own forward does."""
    layers = [{"mixer": "mamba", "ffn": "mlp"}, {"mixer": "attention", "ffn": "moe"}, {"mixer": "mamba", "ffn": None}]
    cfg = write_config(tmp_path, **{"model.layers": layers, "model.n_heads": 4, "model.n_kv_heads": 2})
    Trainer(load_config(cfg)).train()
    ce = losses(tmp_path / "run", "ce")
    assert sum(ce[-5:]) / 5 < sum(ce[:5]) / 5 - 0.3
    model, _ = load_model(tmp_path / "run" / "final")
    assert [s.mixer for s in model.config.layers] == ["mamba", "attention", "mamba"]
    tokens = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        full = model(tokens).logits
    logits, state = model.prefill(tokens[:, :5], model.empty_state(1))
    for t in range(5, 9):
        logits, state = model.decode(tokens[:, t], state)
        torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=1e-4)
