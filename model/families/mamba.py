"""Mamba-1: Hugging Face `MambaForCausalLM` and the original state-spaces `MambaLMHeadModel` layout.

Every layer a Mamba-1 mixer with its pre-norm, no feed-forward; the head is tied to the embedding unless the
checkpoint stores its own. FalconMamba (its own RMS norms inside the mixer) is refused.
"""

from __future__ import annotations

from torch import Tensor

from ..config import LayerSpec, ModelConfig
from ..errors import CheckpointError
from .common import Family, dt_rank, get, rename


def config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF MambaConfig (or the original state-spaces config.json) -> ModelConfig."""
    if hf.get("model_type") == "falcon_mamba":
        raise CheckpointError("config.json: FalconMamba checkpoints are not supported")
    ssm = hf.get("ssm_cfg") or {}
    if ssm.get("layer", "Mamba1") != "Mamba1":
        raise CheckpointError(f"config.json: ssm_cfg.layer={ssm['layer']!r} is not supported (Mamba-1 only)")
    d_model = get(hf, "hidden_size", "d_model")
    n_layers = get(hf, "num_hidden_layers", "n_layer")
    if d_model is None or n_layers is None:
        raise CheckpointError("config.json: a Mamba config needs hidden_size/d_model and num_hidden_layers/n_layer")
    return ModelConfig(
        vocab_size=vocab_size or hf["vocab_size"],
        d_model=d_model,
        layers=[LayerSpec("mamba", None)] * n_layers,
        d_state=get(hf, "state_size", default=ssm.get("d_state", 16)),
        d_conv=get(hf, "conv_kernel", default=ssm.get("d_conv", 4)),
        expand=get(hf, "expand", default=ssm.get("expand", 2)),
        dt_rank=dt_rank(get(hf, "time_step_rank", default=ssm.get("dt_rank", "auto")), d_model),
        conv_bias=get(hf, "use_conv_bias", default=ssm.get("conv_bias", True)),
        proj_bias=get(hf, "use_bias", default=ssm.get("bias", False)),
        norm_eps=get(hf, "layer_norm_epsilon", "norm_epsilon", default=1e-5),
        residual_in_fp32=hf.get("residual_in_fp32", True),
        tie_embeddings=hf.get("tie_word_embeddings", hf.get("tie_embeddings", True)),
        pad_token_id=get(hf, "pad_token_id", default=0),
        bos_token_id=get(hf, "bos_token_id", default=0),
        eos_token_id=get(hf, "eos_token_id", default=0),
    )


RENAMES = [
    (r"^backbone\.embeddings?\.weight$", "embeddings.weight"),  # mamba_ssm says `embedding`
    (r"^backbone\.layers\.(\d+)\.norm\.weight$", r"layers.\1.norm.weight"),
    (r"^backbone\.layers\.(\d+)\.mixer\.(.+)$", r"layers.\1.mixer.\2"),
    (r"^backbone\.norm_f\.weight$", "norm_f.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
]


def convert(sd: dict[str, Tensor], cfg: ModelConfig | None = None) -> dict[str, Tensor]:
    """Only prefixes change: the mixer's parameters have our names (Mamba-2's as well: model/mamba2.py)."""
    return {rename(k, RENAMES): v for k, v in sd.items()}


FAMILY = Family(
    "mamba",
    config,
    convert,
    model_types=("mamba", "falcon_mamba"),
    architectures=("MambaForCausalLM",),
    claims=lambda cfg: "d_model" in cfg,  # state-spaces configs name neither a model_type nor an architecture
    tie_missing_head=True,
)
