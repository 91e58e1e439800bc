"""Aetheris model package: a hybrid Mamba / MoE language model in pure PyTorch (no FastAPI, no pydantic)."""

from .config import LayerSpec, ModelConfig, preset
from .lm import HybridLM, LMOutput
from .state import ModelState

__all__ = ["HybridLM", "LMOutput", "LayerSpec", "ModelConfig", "ModelState", "preset"]
