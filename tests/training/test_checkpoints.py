"""Checkpoints a crash cannot lose: a save interrupted at any file leaves the previous checkpoint loadable, and
resuming from it gives the losses of a run never interrupted; --keep-last prunes old ones."""

from __future__ import annotations

import os

import pytest

from tests.training.test_training import losses, write_config
from training import checkpoints
from training.config import load_config
from training.trainer import Trainer


class Crash(Exception):
    pass


def _count_fsyncs(monkeypatch, trainer: Trainer) -> int:
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    trainer.save()
    monkeypatch.setattr(os, "fsync", real)
    return len(calls)


def _back_to_step_10(root, trash) -> None:
    checkpoints.point_latest(root, "step_0000010")
    if (root / "step_0000013").exists():
        os.rename(root / "step_0000013", trash)


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir()
    part_dir.mkdir()
    Trainer(load_config(write_config(full_dir, **{"schedule.steps": 20}))).train()
    run = Trainer(load_config(write_config(part_dir, **{"schedule.steps": 20})))
    for _ in range(10):
        run.train_step()
    run.save()  # step 10: the checkpoint every interrupted save must leave whole
    for _ in range(3):
        run.train_step()
    root = part_dir / "run" / "checkpoints"
    # Every file and directory of a save is flushed with one fsync: a crash at each of them in turn.
    n = _count_fsyncs(monkeypatch, run)
    assert n >= 6 and checkpoints.latest(root).name == "step_0000013"
    for k in range(n):
        _back_to_step_10(root, tmp_path / f"discarded{k}")
        seen = []

        def crash_at_k(fd, seen=seen, k=k):
            seen.append(fd)
            if len(seen) > k:
                raise Crash(f"fsync #{k}")

        monkeypatch.setattr(os, "fsync", crash_at_k)
        with pytest.raises(Crash):
            run.save()
        monkeypatch.undo()
        # The previous checkpoint, or (a crash after the pointer moved, at the last fsync) the new one, whole.
        step = Trainer(load_config(part_dir / "cfg.yaml"), resume=True).step
        assert step == 10 or (step == 13 and k == n - 1), k
    _back_to_step_10(root, tmp_path / "discarded")
    resumed = Trainer(load_config(part_dir / "cfg.yaml"), resume=True)
    resumed.train()
    assert losses(part_dir / "run")[-10:] == losses(full_dir / "run")[10:]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    cfg = write_config(tmp_path, **{"schedule.steps": 30, "checkpoint.keep_last": 2})
    Trainer(load_config(cfg)).train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "latest",
        "step_0000020",
        "step_0000030",
    ]
    assert checkpoints.latest(root).name == "step_0000030"
