"""Mamba-2: Hugging Face `Mamba2ForCausalLM` (the Mamba-Codestral layout). Every layer a Mamba-2 mixer with its
pre-norm, no feed-forward, the residual in fp32 by default. The tensors have Mamba-1's prefixes (mamba.py)."""

from __future__ import annotations

from ..config import LayerSpec, ModelConfig
from ..errors import CheckpointError
from . import mamba
from .common import Family, first_eos, get, refuse_unsupported, time_step_limit


def config(hf: dict, vocab_size: int | None) -> ModelConfig:
    refuse_unsupported(hf, {"hidden_act": ["silu", None], "rms_norm": [True, None]})
    d_model, heads, head_dim = hf.get("hidden_size", 4096), hf.get("num_heads", 128), hf.get("head_dim", 64)
    if heads * head_dim != hf.get("expand", 2) * d_model:
        raise CheckpointError("config.json: num_heads * head_dim != expand * hidden_size")
    lo, hi = time_step_limit(hf.get("time_step_limit"))
    return ModelConfig(
        vocab_size=vocab_size or hf.get("vocab_size", 32768),
        d_model=d_model,
        layers=[LayerSpec("mamba2", None)] * hf.get("num_hidden_layers", 64),
        mamba2_heads=heads,
        mamba2_head_dim=head_dim,
        d_state=hf.get("state_size", 128),
        n_groups=hf.get("n_groups", 8),
        d_conv=hf.get("conv_kernel", 4),
        chunk_size=hf.get("chunk_size", 256),
        conv_bias=hf.get("use_conv_bias", True),
        proj_bias=hf.get("use_bias", False),
        time_step_limit_min=lo,
        time_step_limit_max=hi,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        residual_in_fp32=hf.get("residual_in_fp32", True),
        tie_embeddings=hf.get("tie_word_embeddings", False),
        pad_token_id=get(hf, "pad_token_id", default=0),
        bos_token_id=get(hf, "bos_token_id", default=0),
        eos_token_id=first_eos(hf),
    )


FAMILY = Family("mamba2", config, mamba.convert, model_types=("mamba2",), architectures=("Mamba2ForCausalLM",))
