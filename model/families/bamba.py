"""Bamba: Hugging Face `BambaForCausalLM`. Mamba-2 or attention with partial RoPE (the layers in
attn_layer_indices), each followed by a SwiGLU MLP. The tensors have Jamba's names (jamba.py)."""

from __future__ import annotations

from ..config import LayerSpec, ModelConfig
from . import jamba
from .common import Family, attention_fields, hybrid_fields, mamba2_fields, refuse_unsupported, rope


def config(hf: dict, vocab_size: int | None) -> ModelConfig:
    refuse_unsupported(hf, {"hidden_act": ["silu", None], "mlp_bias": [False, None]})
    base = hybrid_fields(hf, vocab_size, 1e-5)
    n = hf.get("num_hidden_layers", 32)
    attn = set(hf.get("attn_layer_indices") or [])
    theta, partial = rope(hf, 0.5)  # BambaConfig injects partial_rotary_factor 0.5
    return ModelConfig(
        **base,
        layers=[LayerSpec("attention" if i in attn else "mamba2", "mlp") for i in range(n)],
        **mamba2_fields(hf, base["d_model"]),
        **attention_fields(hf, base["d_model"]),
        rope_theta=theta,
        partial_rotary_factor=partial,
        d_ff=hf.get("intermediate_size", 14336),
    )


FAMILY = Family("bamba", config, jamba.convert, model_types=("bamba",), architectures=("BambaForCausalLM",))
