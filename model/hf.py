"""Hugging Face Mamba / Jamba checkpoints -> our config and parameter names (the Mamba-2 families:
hf_mamba2.py).

Glossary: E experts, F expert hidden size, D d_model.

Supported: `MambaForCausalLM` (HF names), the original state-spaces `MambaLMHeadModel` configs, and
`JambaForCausalLM` (Mamba-1 and attention layers, each with a dense or MoE feed-forward). docs/model.md lists
the names and layouts. A config option we do not implement is refused, naming it.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from .config import LayerSpec, ModelConfig
from .errors import CheckpointError


def _get(cfg: dict, *keys, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def mamba_config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF MambaConfig (or the original state-spaces config.json) -> ModelConfig."""
    ssm = hf.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise CheckpointError(f"config.json: ssm_cfg.layer={ssm['layer']!r} is not supported (Mamba-1 only)")
    d_model = _get(hf, "hidden_size", "d_model")
    n_layers = _get(hf, "num_hidden_layers", "n_layer")
    if d_model is None or n_layers is None:
        raise CheckpointError("config.json: a Mamba config needs hidden_size/d_model and num_hidden_layers/n_layer")
    dt_rank = _get(hf, "time_step_rank", default=ssm.get("dt_rank", "auto"))
    return ModelConfig(
        vocab_size=vocab_size or hf["vocab_size"],
        d_model=d_model,
        layers=[LayerSpec("mamba", None)] * n_layers,
        d_state=_get(hf, "state_size", default=ssm.get("d_state", 16)),
        d_conv=_get(hf, "conv_kernel", default=ssm.get("d_conv", 4)),
        expand=_get(hf, "expand", default=ssm.get("expand", 2)),
        dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
        conv_bias=_get(hf, "use_conv_bias", default=ssm.get("conv_bias", True)),
        proj_bias=_get(hf, "use_bias", default=ssm.get("bias", False)),
        norm_eps=_get(hf, "layer_norm_epsilon", "norm_epsilon", default=1e-5),
        residual_in_fp32=hf.get("residual_in_fp32", True),
        tie_embeddings=hf.get("tie_word_embeddings", hf.get("tie_embeddings", True)),
        pad_token_id=_get(hf, "pad_token_id", default=0),
        bos_token_id=_get(hf, "bos_token_id", default=0),
        eos_token_id=_get(hf, "eos_token_id", default=0),
    )


def _jamba_layers(hf: dict) -> list[LayerSpec]:
    """Layer i is attention iff i % attn_layer_period == attn_layer_offset (else Mamba-1), and its FFN is MoE
    iff i % expert_layer_period == expert_layer_offset (else dense): HF's JambaConfig layout rule."""
    n = hf.get("num_hidden_layers", 32)
    attn_period, attn_offset = hf.get("attn_layer_period", 8), hf.get("attn_layer_offset", 4)
    exp_period, exp_offset = hf.get("expert_layer_period", 2), hf.get("expert_layer_offset", 1)
    for name, period, offset in (("attn", attn_period, attn_offset), ("expert", exp_period, exp_offset)):
        if not (isinstance(period, int) and period > 0 and isinstance(offset, int) and 0 <= offset < period):
            raise CheckpointError(
                f"config.json: {name}_layer_offset={offset} must be in [0, {name}_layer_period={period})"
            )
    moe = hf.get("num_experts", 16) > 1
    return [
        LayerSpec(
            "attention" if i % attn_period == attn_offset else "mamba",
            "moe" if moe and i % exp_period == exp_offset else "mlp",
        )
        for i in range(n)
    ]


def refuse_unsupported(hf: dict, supported: dict) -> None:
    """A config option that changes the math and that we do not implement is an error naming it; `supported`
    maps option -> the values we do implement (None in the list: the option may be absent or null)."""
    for key, allowed in supported.items():
        if hf.get(key) not in allowed:
            raise CheckpointError(f"config.json: {key}={hf.get(key)!r} is not supported (supported: {allowed})")


def jamba_config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF JambaConfig -> ModelConfig. Attention layers use no positional encoding and no biases."""
    refuse_unsupported(
        hf,
        {"hidden_act": ["silu", None], "sliding_window": [None], "use_alibi": [None, False], "rope_scaling": [None]},
    )
    layers = _jamba_layers(hf)
    d_model = hf.get("hidden_size", 4096)
    n_heads = hf.get("num_attention_heads", 32)
    dt_rank = hf.get("mamba_dt_rank", "auto")
    eos = hf.get("eos_token_id", 2)
    moe = any(s.ffn == "moe" for s in layers)
    return ModelConfig(
        vocab_size=vocab_size or hf.get("vocab_size", 65536),
        d_model=d_model,
        layers=layers,
        d_state=hf.get("mamba_d_state", 16),
        d_conv=hf.get("mamba_d_conv", 4),
        expand=hf.get("mamba_expand", 2),
        dt_rank=math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank,
        conv_bias=hf.get("mamba_conv_bias", True),
        proj_bias=hf.get("mamba_proj_bias", False),
        mixer_norms=True,
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 262144),
        d_ff=hf.get("intermediate_size", 14336),
        n_experts=hf.get("num_experts", 16) if moe else 0,
        top_k=hf.get("num_experts_per_tok", 2) if moe else 1,
        renormalize=False,  # Jamba weights the chosen experts by their softmax over all experts, unrenormalised
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        residual_in_fp32=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        pad_token_id=hf.get("pad_token_id", 0),
        bos_token_id=hf.get("bos_token_id", 1),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
    )


_MAMBA_RENAMES = [
    (r"^backbone\.embeddings?\.weight$", "embeddings.weight"),  # mamba_ssm says `embedding`
    (r"^backbone\.layers\.(\d+)\.norm\.weight$", r"layers.\1.norm.weight"),
    (r"^backbone\.layers\.(\d+)\.mixer\.(.+)$", r"layers.\1.mixer.\2"),
    (r"^backbone\.norm_f\.weight$", "norm_f.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
]
_JAMBA_RENAMES = [
    (r"^model\.embed_tokens\.weight$", "embeddings.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.norm.weight"),
    (r"^model\.layers\.(\d+)\.mamba\.(.+)$", r"layers.\1.mixer.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)$", r"layers.\1.mixer.\2.\3"),
    (r"^model\.layers\.(\d+)\.pre_ff_layernorm\.weight$", r"layers.\1.ffn_norm.weight"),
    (r"^model\.layers\.(\d+)\.feed_forward\.router\.weight$", r"layers.\1.ffn.router.weight"),
    (r"^model\.layers\.(\d+)\.feed_forward\.(gate|up|down)_proj\.weight$", r"layers.\1.ffn.\2_proj.weight"),
    (r"^model\.final_layernorm\.weight$", "norm_f.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
]
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, hits = re.subn(pattern, repl, name)
        if hits:
            return new
    raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint")


def convert_mamba_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    return {_rename(k, _MAMBA_RENAMES): v for k, v in sd.items()}


def convert_jamba_state_dict(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename, and stack per-expert weights (E, F, D) / (E, D, F); accepts transformers 5.x fused experts."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for k, v in sd.items():
        if m := _EXPERT.match(k):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = v
        elif m := _FUSED.match(k):
            if m[2] == "down_proj":
                out[f"layers.{m[1]}.ffn.down_proj"] = v  # (E, D, F)
            else:  # (E, 2F, D): gate rows first, then up
                out[f"layers.{m[1]}.ffn.gate_proj"], out[f"layers.{m[1]}.ffn.up_proj"] = v.chunk(2, dim=1)
        else:
            out[_rename(k, _JAMBA_RENAMES)] = v
    for (layer, proj), per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise CheckpointError(f"layer {layer}: experts {ids} are not numbered 0..{len(ids) - 1}")
        out[f"layers.{layer}.ffn.{proj}_proj"] = torch.stack([per_expert[e] for e in ids])
    return out


def detect_format(cfg: dict) -> str:
    """'aetheris', 'mamba', 'jamba' or a Mamba-2 family of hf_mamba2.FAMILIES from a config.json dict."""
    from .hf_mamba2 import ARCHITECTURES, FAMILIES  # hf_mamba2 builds on this module

    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type == "aetheris":
        return "aetheris"
    if model_type == "jamba" or "JambaForCausalLM" in archs:
        return "jamba"
    if model_type in FAMILIES:
        return model_type
    if family := next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None):
        return family
    if model_type in ("mamba", "falcon_mamba") or "MambaForCausalLM" in archs or "d_model" in cfg:
        if model_type == "falcon_mamba":
            raise CheckpointError("config.json: FalconMamba checkpoints are not supported")
        return "mamba"
    raise CheckpointError(f"config.json: unsupported model_type {model_type!r} (architectures {archs})")
