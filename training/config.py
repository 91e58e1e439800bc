"""Training configuration: nested dataclasses loaded from YAML, every key checked.

A config names the model layout (a preset plus field overrides), the data, the tokenizer, the optimiser,
the schedule, evaluation, checkpointing and logging. An unknown key or a bad value is a one-line error
naming it, e.g. `config error: optim.lrr: unknown key (known: betas, eps, grad_clip, lr, weight_decay)`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.config import ModelConfig, preset


class ConfigError(ValueError):
    pass


@dataclass
class ModelSection:
    preset: str = "debug"  # model/config.py presets; other keys override that preset's fields
    overrides: dict = field(default_factory=dict)

    def build(self, vocab_size: int) -> ModelConfig:
        try:
            return preset(self.preset, **{"vocab_size": vocab_size, **self.overrides})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {e}") from e


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)  # .txt / .jsonl files or folders of them
    eval: list[str] = field(default_factory=list)  # held-out files; empty = eval_fraction of the documents
    eval_fraction: float = 0.01
    separator: str = r"\n\s*<\|endoftext\|>\s*\n"  # regex between documents in plain-text files
    text_field: str = "text"  # JSONL key holding a document
    seq_len: int = 256
    chat_fraction: float = 0.0  # share of training documents wrapped as a chat (user asks, assistant tells)
    max_documents: int = 0  # 0 = all
    cache_dir: str = ".cache/data"


@dataclass
class TokenizerSection:
    path: str | None = None  # a directory with tokenizer.json; None = train a byte-level BPE on the data
    vocab_size: int = 8192


@dataclass
class OptimSection:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class ScheduleSection:
    steps: int = 1000
    warmup: float = 0.01  # fraction of steps (< 1) or a number of steps (>= 1)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    batch_size: int = 32  # sequences per optimizer step, over all processes and accumulation steps
    grad_accum: int = 1


@dataclass
class EvalSection:
    every: int = 200
    batches: int = 20
    batch_size: int = 32


@dataclass
class CheckpointSection:
    every: int = 500
    dir: str = "checkpoints"  # under out_dir
    keep_last: int = 0  # keep only the newest K step checkpoints (0 = all)


@dataclass
class TrainConfig:
    out_dir: str = "runs/debug"
    seed: int = 1234
    device: str = "auto"  # auto / cpu / cuda
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) / fp32 / bf16
    gradient_checkpointing: bool = False
    log_every: int = 10
    threads: int = 0  # torch.set_num_threads on CPU; 0 = torch's default
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)

    def validate(self) -> TrainConfig:
        checks = [
            ("device", self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")),
            ("precision", self.precision in ("auto", "fp32", "bf16")),
            ("log_every", self.log_every >= 1),
            ("data.train", len(self.data.train) > 0),
            ("data.eval_fraction", 0 <= self.data.eval_fraction < 1),
            ("data.seq_len", self.data.seq_len >= 2),
            ("data.chat_fraction", 0 <= self.data.chat_fraction <= 1),
            ("tokenizer.vocab_size", self.tokenizer.vocab_size >= 300),
            ("optim.lr", self.optim.lr > 0),
            ("optim.betas", len(self.optim.betas) == 2 and all(0 <= b < 1 for b in self.optim.betas)),
            ("optim.grad_clip", self.optim.grad_clip >= 0),
            ("schedule.steps", self.schedule.steps >= 1),
            ("schedule.warmup", self.schedule.warmup >= 0),
            ("schedule.batch_size", self.schedule.batch_size >= 1),
            ("schedule.grad_accum", self.schedule.grad_accum >= 1),
            ("eval.every", self.eval.every >= 1),
            ("checkpoint.every", self.checkpoint.every >= 1),
            ("checkpoint.keep_last", self.checkpoint.keep_last >= 0),
        ]
        for name, ok in checks:
            if not ok:
                raise ConfigError(f"{name}: invalid value {_lookup(self, name)!r}")
        if self.schedule.batch_size % self.schedule.grad_accum:
            raise ConfigError("schedule.batch_size: must be a multiple of schedule.grad_accum")
        self.model.build(self.tokenizer.vocab_size)  # model keys checked now, not after data preparation
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model"] = {"preset": self.model.preset, **self.model.overrides}
        return d


def _lookup(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _coerce(value, annotation, where: str):
    """Check a YAML value against a field's type annotation (int / float / str / bool / list / Optional)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is list:
        if not isinstance(value, list):
            value = [value] if args and args[0] is str else value
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 as a string
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str) and not (isinstance(value, annotation) and not isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(known))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, name)
        else:
            kwargs[key] = _coerce(value, hint, name)
    return cls(**kwargs)


def parse_config(data: dict) -> TrainConfig:
    data = dict(data or {})
    model = data.pop("model", None) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    model = dict(model)
    section = ModelSection(preset=str(model.pop("preset", "debug")), overrides=model)
    known_model = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in model:
        if key not in known_model:
            raise ConfigError(f"model.{key}: unknown key (known: preset, {', '.join(sorted(known_model))})")
    cfg = _build(TrainConfig, data, "")
    cfg.model = section
    return cfg.validate()


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config; `overrides` are `section.key=value` strings (YAML values) applied on top."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}  # a missing or empty (null) section
            node = node[p]
        node[leaf] = yaml.safe_load(value)
    return parse_config(data)
