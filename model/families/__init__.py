"""The checkpoint families we load, one module each, found here by their `FAMILY` record.

A family module maps its config.json to our `ModelConfig`, renames (and stacks, splits) its tensors into our
parameter names, and refuses, naming it, any option that changes the math and that we do not implement.
Adding a family is one module in this package (plus its entry in the tests' family list); `detect` finds it
by `model_type`, then by `architectures`, then by the family's own `claims` for configs that name neither.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..errors import CheckpointError
from .common import Family


def _discover() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if family is not None:
            found[family.name] = family
    return found


def index(families: dict[str, Family]) -> tuple[dict[str, Family], dict[str, Family]]:
    """{model_type: family} and {architecture: family}; a key claimed by two families is an error."""
    by_type: dict[str, Family] = {}
    by_arch: dict[str, Family] = {}
    for family in families.values():
        for keys, table in ((family.model_types, by_type), (family.architectures, by_arch)):
            for key in keys:
                if key in table:
                    raise RuntimeError(f"checkpoint families {table[key].name} and {family.name} both claim {key!r}")
                table[key] = family
    return by_type, by_arch


FAMILIES = _discover()
_BY_MODEL_TYPE, _BY_ARCHITECTURE = index(FAMILIES)


def detect(cfg: dict) -> Family:
    """The family of a config.json dict, or CheckpointError naming what it says it is."""
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    if family := next((_BY_ARCHITECTURE[a] for a in archs if a in _BY_ARCHITECTURE), None):
        return family
    if family := next((f for f in FAMILIES.values() if f.claims and f.claims(cfg)), None):
        return family
    raise CheckpointError(f"config.json: unsupported model_type {model_type!r} (architectures {archs})")


__all__ = ["FAMILIES", "Family", "detect"]
