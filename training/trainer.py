"""The training loop (MoE-Mamba recipe: AdamW, warmup + cosine, clipping, Switch aux loss + z-loss).

A step consumes `schedule.batch_size` sequences in total, split over processes (DDP) and gradient
accumulation micro-steps. Which sequences a step sees depends only on the seed and the step number, so a
resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import HybridLM
from model.checkpoint import config_and_weights, save_checkpoint

from . import checkpoints, distributed
from .config import ConfigError, TrainConfig
from .data import PackedData, prepare_data
from .plots import plot_run

STATE_FILE = "trainer_state.pt"


def param_groups(model: HybridLM, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, A_log and D (mamba_ssm `_no_weight_decay`) or other 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("A_log", ".D", "bias")) or "norm" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Global batch of sequence ids for `step`: consecutive slices of per-epoch seeded permutations."""
    out, got, pos = [], 0, step * batch_size
    while got < batch_size:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        take = perm[offset : offset + batch_size - got]
        out.append(take)
        got += take.numel()
        pos += take.numel()
    return torch.cat(out)


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print) -> None:
        self.cfg, self.log = cfg, log
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = distributed.setup(cfg.device)
        s = cfg.schedule
        if s.batch_size % (self.dist.world * s.grad_accum):
            raise ConfigError(
                f"schedule.batch_size: {s.batch_size} is not a multiple of processes x grad_accum "
                f"= {self.dist.world} x {s.grad_accum}"
            )
        self.out = Path(cfg.out_dir)
        quiet = (lambda *a, **k: None) if not self.dist.is_main else log
        self.data: PackedData = prepare_data(cfg, log=quiet)
        if self.data.n_sequences("train") < 1:
            raise ValueError(f"data: fewer than seq_len + 1 = {cfg.data.seq_len + 1} training tokens")
        torch.manual_seed(cfg.seed)
        self.model = HybridLM(cfg.model.build(self.data.tokenizer.vocab_size)).to(self.dist.device)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.objective = _Objective(self.model)
        self.ddp = DistributedDataParallel(self.objective) if self.dist.enabled else None
        self._load = {i: torch.zeros(m.n_experts, dtype=torch.long) for i, m in self.model.moe_layers().items()}
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
        )
        warmup = int(s.warmup if s.warmup >= 1 else s.warmup * s.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, s.steps, max(1, warmup), s.min_lr_ratio)
        )
        self.step = 0
        self.autocast = self._autocast_dtype()
        if resume:
            self.load_latest()

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "bf16" or (p == "auto" and self.dist.device.type == "cuda"):
            return torch.bfloat16
        return None

    # ---------------------------------------------------------------- one step
    def _micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        s = self.cfg.schedule
        ids = batch_indices(self.step, s.batch_size, self.data.n_sequences(), self.cfg.seed)
        local = ids.chunk(self.dist.world)[self.dist.rank]  # this process's share of the global batch
        return [self.data.sequences(chunk) for chunk in local.chunk(s.grad_accum)]

    def train_step(self) -> dict:
        self.model.train()
        net = self.ddp or self.objective
        micro = self._micro_batches()
        totals = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0}
        for i, (x, y) in enumerate(micro):
            x, y = x.to(self.dist.device), y.to(self.dist.device)
            sync = self.ddp is None or i == len(micro) - 1
            ctx = self.ddp.no_sync() if not sync else nullcontext()
            with ctx, torch.autocast(self.dist.device.type, self.autocast, enabled=self.autocast is not None):
                loss, out = net(x, y)
                (loss / len(micro)).backward()
            c = self.model.config
            ce = loss.detach() - c.aux_loss_coef * out.aux_loss.detach() - c.z_loss_coef * out.z_loss.detach()
            for k, v in zip(totals, (loss, ce, out.aux_loss, out.z_loss)):
                totals[k] += v.item() / len(micro)
            for layer, r in zip(self._load, out.routers):  # this forward's routing, not recomputes or eval
                self._load[layer] += torch.bincount(r.experts.flatten().cpu(), minlength=len(self._load[layer]))
        clip = self.cfg.optim.grad_clip
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        stats = {k: self.dist.mean(v) for k, v in totals.items()}
        stats["grad_norm"] = gnorm.item()
        stats["lr"] = lr
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean cross-entropy over the first eval.batches * eval.batch_size held-out sequences."""
        self.model.eval()
        e = self.cfg.eval
        n = min(self.data.n_sequences("eval"), e.batches * e.batch_size)
        if n == 0:
            return {}
        total, count = 0.0, 0
        for ids in torch.arange(n).split(e.batch_size):
            x, y = self.data.sequences(ids, "eval")
            with torch.autocast(self.dist.device.type, self.autocast, enabled=self.autocast is not None):
                logits = self.model(x.to(self.dist.device)).logits
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y.to(logits.device).flatten(), reduction="sum"
            ).item()
            count += y.numel()
        loss = total / count
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50))}

    # ---------------------------------------------------------------- loop
    def train(self) -> dict:
        cfg, s = self.cfg, self.cfg.schedule
        log_file = self.out / "log.jsonl"
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(_yaml(cfg.to_dict()))
        bar = tqdm(total=s.steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True)
        tokens_per_step = s.batch_size * cfg.data.seq_len
        last = None
        summary = {}
        while self.step < s.steps:
            t0 = time.perf_counter()
            stats = self.train_step()
            tok_s = tokens_per_step / (time.perf_counter() - t0)  # training only: eval and saving excluded
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tok_s:.0f}")
            record = None
            if self.step % cfg.log_every == 0 or self.step == s.steps:
                record = {
                    "step": self.step,
                    **stats,
                    "tokens_per_s": tok_s,
                    "tokens": self.step * tokens_per_step,
                    "expert_load": self._expert_load(),
                }
            if self.step % cfg.eval.every == 0 or self.step == s.steps:
                ev = self.evaluate()
                record = {**(record or {"step": self.step, **stats}), **ev}
                bar.write(f"step {self.step}: eval loss {ev.get('eval_loss', float('nan')):.4f}")
            if record and self.dist.is_main:
                with log_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                last = record
            if self.step % cfg.checkpoint.every == 0 or self.step == s.steps:
                self.save()
        bar.close()
        if self.dist.is_main:
            final = save_checkpoint(self.model, self.out / "final", self.data.tokenizer)
            plots = plot_run(log_file, self.out)
            summary = {"final": str(final), "plots": [str(p) for p in plots], **(last or {})}
        self.dist.close()
        return summary

    def _expert_load(self) -> dict[str, list[int]]:
        """Training assignments per expert per MoE layer since the last log line, over all processes."""
        load = {}
        for layer, counts in self._load.items():
            load[str(layer)] = self.dist.sum(counts).tolist()
            counts.zero_()
        return load

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """A checkpoint of the model and everything resuming needs, written so that a crash at any point
        leaves the previous one whole (training/checkpoints.py); then old ones are pruned."""
        if not self.dist.is_main:
            return
        root = self.out / self.cfg.checkpoint.dir
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }

        def write(directory: Path) -> None:
            save_checkpoint(self.model, directory, self.data.tokenizer)
            torch.save(state, directory / STATE_FILE)

        final = checkpoints.save_atomically(root, f"{checkpoints.PREFIX}{self.step:07d}", write)
        checkpoints.point_latest(root, final.name)
        checkpoints.prune(root, self.cfg.checkpoint.keep_last)

    def load_latest(self) -> None:
        root = self.out / self.cfg.checkpoint.dir
        directory = checkpoints.latest(root)
        if directory is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {root}")
        _, nodes = config_and_weights(directory)
        sd = {name: node.load() for name, node in nodes.items()}
        if self.model.config.tie_embeddings:
            sd["lm_head.weight"] = sd["embeddings.weight"]
        self.model.load_state_dict(sd)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]
        self.log(f"resumed from {directory} at step {self.step}")


def _yaml(d: dict) -> str:
    import yaml

    return yaml.safe_dump(d, sort_keys=False)


class _Objective(torch.nn.Module):
    """HybridLM.loss as a module's forward: DistributedDataParallel syncs gradients only for forwards that
    go through it, and a method call on the wrapped model would bypass it."""

    def __init__(self, model: HybridLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor):
        return self.model.loss(tokens, targets)
