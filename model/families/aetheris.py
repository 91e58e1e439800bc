"""Our own directory format: config.json is `ModelConfig.to_dict()` and the tensors carry our names."""

from __future__ import annotations

from torch import Tensor

from ..config import ModelConfig
from .common import Family


def config(raw: dict, vocab_size: int | None) -> ModelConfig:
    return ModelConfig.from_dict(raw)  # the embedding's rows are the config's own vocab_size


def convert(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    return sd


FAMILY = Family("aetheris", config, convert, model_types=("aetheris",))
