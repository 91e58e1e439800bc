"""What the checkpoint families share: the `Family` record the registry holds, and the helpers their config
mappings and weight conversions are written with.

Glossary: D d_model, E experts, F expert hidden size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..config import ModelConfig
from ..errors import CheckpointError
from ..weights import stack

ConfigFn = Callable[[dict, "int | None"], ModelConfig]  # (config.json, embedding rows or None) -> ours
ConvertFn = Callable[[dict[str, Tensor], ModelConfig], dict[str, Tensor]]  # its tensors -> our names


@dataclass(frozen=True)
class Family:
    """One checkpoint family: how to recognise its config.json, map it to ours, and rename its tensors.

    A config is this family's when its `model_type` is in `model_types`, or one of its `architectures` is in
    `architectures`, or (configs that name neither) `claims(config)` says so."""

    name: str
    config: ConfigFn
    convert: ConvertFn
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    claims: Callable[[dict], bool] | None = None
    # A checkpoint without lm_head.weight ties it to the embedding (HF Mamba's default) instead of missing it.
    tie_missing_head: bool = False


def get(cfg: dict, *keys, default=None):
    """The first of `keys` that config.json sets to a non-null value (families renamed keys across versions)."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def refuse_unsupported(hf: dict, supported: dict) -> None:
    """A config option that changes the math and that we do not implement is an error naming it; `supported`
    maps option -> the values we do implement (None in the list: the option may be absent or null)."""
    for key, allowed in supported.items():
        if hf.get(key) not in allowed:
            raise CheckpointError(f"config.json: {key}={hf.get(key)!r} is not supported (supported: {allowed})")


def first_eos(hf: dict, default: int = 0) -> int | None:
    """The first of config.json's eos ids (the tokenizer stops at all of them: model/tokenizer.py)."""
    eos = hf.get("eos_token_id", default)
    return eos[0] if isinstance(eos, list) else eos


def dt_rank(hf_value, d_model: int) -> int:
    """Mamba-1's dt_rank, "auto" meaning ceil(D / 16) as in mamba_ssm."""
    return math.ceil(d_model / 16) if hf_value == "auto" else hf_value


def rename(name: str, rules: list[tuple[str, str]]) -> str:
    """`name` through the first (regex, replacement) rule that matches it; no rule matching is an error."""
    for pattern, repl in rules:
        new, hits = re.subn(pattern, repl, name)
        if hits:
            return new
    raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint")


def stack_experts(out: dict[str, Tensor], experts: dict[tuple[str, str], dict[int, Tensor]]) -> None:
    """Per-expert matrices {(layer, proj): {e: (F, D) or (D, F)}} -> out["layers.{layer}.ffn.{proj}_proj"] as one
    (E, F, D) / (E, D, F) tensor; the experts must be numbered 0..E-1."""
    for (layer, proj), per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise CheckpointError(f"layer {layer}: experts {ids} are not numbered 0..{len(ids) - 1}")
        out[f"layers.{layer}.ffn.{proj}_proj"] = stack([per_expert[e] for e in ids])


# ---------------------------------------------------------------- Mamba-2 hybrids (Bamba, Granite, Nemotron-H)


def time_step_limit(value) -> tuple[float, float]:
    """HF time_step_limit -> (min, max) with max 0 for "none". transformers writes infinity as
    {"__float__": "Infinity"} (JSON has no infinity); Python's json reads a bare Infinity too."""
    if value is None:
        return 0.0, 0.0
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else float(v) for v in value)
    return lo, 0.0 if math.isinf(hi) else hi


def mamba2_fields(hf: dict, d_model: int, prefix: str = "mamba_") -> dict:
    """The Mamba-2 options of Bamba and Granite (their `mamba_*` keys); H * P = mamba_expand * D."""
    heads, expand = hf.get(f"{prefix}n_heads", 128), hf.get(f"{prefix}expand", 2)
    head_dim = hf.get(f"{prefix}d_head", "auto")
    head_dim = expand * d_model // heads if head_dim in ("auto", None) else head_dim
    if heads * head_dim != expand * d_model:
        raise CheckpointError("config.json: mamba_n_heads * mamba_d_head != mamba_expand * hidden_size")
    lo, hi = time_step_limit(hf.get("time_step_limit"))
    return dict(
        mamba2_heads=heads,
        mamba2_head_dim=head_dim,
        d_state=hf.get(f"{prefix}d_state", 256),
        n_groups=hf.get(f"{prefix}n_groups", 1),
        d_conv=hf.get(f"{prefix}d_conv", 4),
        chunk_size=hf.get(f"{prefix}chunk_size", 256),
        conv_bias=hf.get(f"{prefix}conv_bias", True),
        proj_bias=hf.get(f"{prefix}proj_bias", False),
        time_step_limit_min=lo,
        time_step_limit_max=hi,
    )


def attention_fields(hf: dict, d_model: int) -> dict:
    n_heads = hf.get("num_attention_heads", 32)
    return dict(
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        attn_bias=hf.get("attention_bias", False),
        max_position_embeddings=hf.get("max_position_embeddings", 0) or 0,
    )


def hybrid_fields(hf: dict, vocab_size: int | None, eps_default: float) -> dict:
    """Vocabulary, width, norms, ties and special ids as the transformers-era hybrids name them."""
    return dict(
        vocab_size=vocab_size or hf.get("vocab_size", 128000),
        d_model=hf.get("hidden_size", 4096),
        norm_eps=hf.get("rms_norm_eps", eps_default),
        residual_in_fp32=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        pad_token_id=get(hf, "pad_token_id", default=0),
        bos_token_id=get(hf, "bos_token_id", default=1),
        eos_token_id=first_eos(hf, 2),
    )


def rope(hf: dict, default_partial: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from rope_parameters (transformers 5) or the legacy top-level keys."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise CheckpointError(f"config.json: rope_parameters={params!r} is not supported (rope_type default only)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial)))


def layer_kind(name: str) -> str:
    """Legacy and new layer-type names -> mamba2 / attention / mlp / moe."""
    kinds = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe", "mamba": "mamba2", "attention": "attention"}
    kinds |= {"linear_attention": "mamba2", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
    if name not in kinds:
        raise CheckpointError(f"config.json: layer type {name!r} is not supported (supported: {sorted(kinds)})")
    return kinds[name]
