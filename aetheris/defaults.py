"""Defaults the server, the CLI, the benchmarks and the tests share: the embedded model and its served name."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / "aetheris-hybrid"
DEFAULT_MODEL_NAME = "aetheris-hybrid"
