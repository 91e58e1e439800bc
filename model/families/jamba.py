"""Jamba: Hugging Face `JambaForCausalLM`. Mamba-1 and attention layers (grouped-query, no positions), each
with a dense or MoE SwiGLU feed-forward, laid out by the attn / expert layer period and offset.

Glossary: E experts, F expert hidden size, D d_model.
"""

from __future__ import annotations

import re

from torch import Tensor

from ..config import LayerSpec, ModelConfig
from ..errors import CheckpointError
from .common import Family, dt_rank, first_eos, refuse_unsupported, rename, stack_experts


def layers(hf: dict) -> list[LayerSpec]:
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


def config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF JambaConfig -> ModelConfig. Attention layers use no positional encoding and no biases."""
    refuse_unsupported(
        hf,
        {"hidden_act": ["silu", None], "sliding_window": [None], "use_alibi": [None, False], "rope_scaling": [None]},
    )
    specs = layers(hf)
    d_model = hf.get("hidden_size", 4096)
    n_heads = hf.get("num_attention_heads", 32)
    moe = any(s.ffn == "moe" for s in specs)
    return ModelConfig(
        vocab_size=vocab_size or hf.get("vocab_size", 65536),
        d_model=d_model,
        layers=specs,
        d_state=hf.get("mamba_d_state", 16),
        d_conv=hf.get("mamba_d_conv", 4),
        expand=hf.get("mamba_expand", 2),
        dt_rank=dt_rank(hf.get("mamba_dt_rank", "auto"), d_model),
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
        eos_token_id=first_eos(hf, 2),
    )


RENAMES = [
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
EXPERT = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
FUSED = re.compile(r"^model\.layers\.(\d+)\.feed_forward\.experts\.(gate_up_proj|down_proj)$")


def convert(sd: dict[str, Tensor], cfg: ModelConfig | None = None) -> dict[str, Tensor]:
    """Rename, and stack per-expert weights (E, F, D) / (E, D, F); accepts transformers 5.x fused experts."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for k, v in sd.items():
        if m := EXPERT.match(k):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = v
        elif m := FUSED.match(k):
            if m[2] == "down_proj":
                out[f"layers.{m[1]}.ffn.down_proj"] = v  # (E, D, F)
            else:  # (E, 2F, D): gate rows first, then up
                out[f"layers.{m[1]}.ffn.gate_proj"], out[f"layers.{m[1]}.ffn.up_proj"] = v.chunk(2, dim=1)
        else:
            out[rename(k, RENAMES)] = v
    stack_experts(out, experts)
    return out


FAMILY = Family("jamba", config, convert, model_types=("jamba",), architectures=("JambaForCausalLM",))
