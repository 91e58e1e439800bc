"""Granite 4.0-H: Hugging Face `GraniteMoeHybridForCausalLM`. Mamba-2 or attention (NoPE, or RoPE over the
whole head), each followed by a MoE with a shared SwiGLU expert, or by the shared expert alone (the dense
variant, num_local_experts 0); Granite's embedding / residual / attention multipliers and logits scaling.

Glossary: E experts, F expert hidden size, S shared-expert hidden size, D d_model.
"""

from __future__ import annotations

import re

from torch import Tensor

from ..config import LayerSpec, ModelConfig
from .common import (
    Family,
    attention_fields,
    hybrid_fields,
    layer_kind,
    mamba2_fields,
    refuse_unsupported,
    rename,
    rope,
)


def config(hf: dict, vocab_size: int | None) -> ModelConfig:
    refuse_unsupported(hf, {"hidden_act": ["silu", None], "position_embedding_type": [None, "nope", "rope"]})
    base = hybrid_fields(hf, vocab_size, 1e-6)
    n_experts = hf.get("num_local_experts", 8)
    kinds = [layer_kind(t) for t in hf.get("layer_types") or ["mamba"] * hf.get("num_hidden_layers", 40)]
    ffn = "moe" if n_experts else "mlp"
    theta = rope(hf, 1.0)[0] if hf.get("position_embedding_type") == "rope" else 0.0
    return ModelConfig(
        **base,
        layers=[LayerSpec("mamba2" if k == "mamba2" else "attention", ffn) for k in kinds],
        **mamba2_fields(hf, base["d_model"]),
        **attention_fields(hf, base["d_model"]),
        rope_theta=theta,  # Granite rotates the whole head: its RoPE ignores partial_rotary_factor
        attn_scale=float(hf.get("attention_multiplier", 1.0)),  # replaces head_dim ** -0.5
        d_ff=hf.get("intermediate_size", 11008) if n_experts else hf.get("shared_intermediate_size", 1024),
        shared_d_ff=hf.get("shared_intermediate_size", 1024) if n_experts else 0,
        n_experts=n_experts,
        top_k=hf.get("num_experts_per_tok", 2) if n_experts else 1,
        renormalize=True,  # softmax over the top-k logits = the full softmax renormalised over the k
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        embedding_multiplier=float(hf.get("embedding_multiplier", 1.0)),
        residual_multiplier=float(hf.get("residual_multiplier", 1.0)),
        logits_scaling=float(hf.get("logits_scaling", 1.0)),
    )


RENAMES = [
    (r"^model\.embed_tokens\.weight$", "embeddings.weight"),
    (r"^model\.layers\.(\d+)\.input_layernorm\.weight$", r"layers.\1.norm.weight"),
    (r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$", r"layers.\1.ffn_norm.weight"),
    (r"^model\.layers\.(\d+)\.mamba\.(.+)$", r"layers.\1.mixer.\2"),
    (r"^model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.(weight|bias)$", r"layers.\1.mixer.\2.\3"),
    (r"^model\.layers\.(\d+)\.block_sparse_moe\.router\.(?:layer\.)?weight$", r"layers.\1.ffn.router.weight"),
    (
        r"^model\.layers\.(\d+)\.block_sparse_moe\.(?:output_linear\.weight|experts\.down_proj)$",
        r"layers.\1.ffn.down_proj",
    ),
    (r"^model\.norm\.weight$", "norm_f.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
]
GATE_UP = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe\.(?:input_linear\.weight|experts\.gate_up_proj)|shared_mlp\.(input|output)_linear\.weight)$"
)


def convert(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename; split the fused [gate | up] halves (gate rows first) of the experts (E, 2F, D) and of the shared
    expert (2S, D). The shared expert is `ffn.shared_mlp` beside routed experts, the whole `ffn` without them."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = GATE_UP.match(k)
        if m is None:
            out[rename(k, RENAMES)] = v
            continue
        layer, shared_part = m[1], m[2]
        prefix = f"layers.{layer}.ffn." + ("shared_mlp." if shared_part and cfg.n_experts else "")
        suffix = ".weight" if shared_part else ""  # the shared expert is nn.Linear, the experts are stacked
        if shared_part == "output":
            out[f"{prefix}down_proj{suffix}"] = v
        else:  # (E, 2F, D) or (2S, D): gate half first
            out[f"{prefix}gate_proj{suffix}"], out[f"{prefix}up_proj{suffix}"] = v.chunk(2, dim=-2)
    return out


FAMILY = Family(
    "granitemoehybrid",
    config,
    convert,
    model_types=("granitemoehybrid",),
    architectures=("GraniteMoeHybridForCausalLM",),
)
