"""Nemotron-H: Hugging Face `NemotronHForCausalLM`. Each layer holds one sublayer: Mamba-2, NoPE attention, a
relu² MLP, or a sigmoid-routed grouped MoE with a shared expert.

Glossary: E experts, F expert hidden size, D d_model.
"""

from __future__ import annotations

import re

from torch import Tensor

from ..config import LayerSpec, ModelConfig
from ..errors import CheckpointError
from .common import Family, attention_fields, get, hybrid_fields, layer_kind, refuse_unsupported, rename, stack_experts


def layers(hf: dict) -> list[LayerSpec]:
    pattern = hf.get("layers_block_type") or hf.get("layer_types") or hf.get("hybrid_override_pattern")
    if not pattern:
        raise CheckpointError("config.json: a Nemotron-H config needs layers_block_type or hybrid_override_pattern")
    specs = {"mamba2": ("mamba2", None), "attention": ("attention", None), "mlp": (None, "mlp_relu2")}
    specs["moe"] = (None, "moe_sigmoid")
    return [LayerSpec(*specs[layer_kind(t)]) for t in pattern]


def config(hf: dict, vocab_size: int | None) -> ModelConfig:
    refuse_unsupported(
        hf,
        {
            "mlp_hidden_act": ["relu2", None],
            "mamba_hidden_act": ["silu", None],
            "mlp_bias": [False, None],
            "moe_latent_size": [None],
        },
    )
    d_model = hf.get("hidden_size", 4096)
    base = hybrid_fields(hf, vocab_size, 1e-5)
    # Never tied: NemotronHForCausalLM ties nothing whatever tie_word_embeddings says.
    base |= {"norm_eps": hf.get("layer_norm_epsilon", 1e-5), "tie_embeddings": False}
    return ModelConfig(
        **base,
        layers=layers(hf),
        mamba2_heads=hf.get("mamba_num_heads", 128),
        mamba2_head_dim=hf.get("mamba_head_dim", 64),
        d_state=hf.get("ssm_state_size", 128),
        n_groups=get(hf, "n_groups", "mamba_n_groups", default=8),
        d_conv=get(hf, "conv_kernel", "mamba_d_conv", default=4),
        chunk_size=get(hf, "chunk_size", "mamba_chunk_size", default=128),
        conv_bias=get(hf, "use_conv_bias", "mamba_conv_bias", default=True),
        proj_bias=hf.get("use_bias", False),
        time_step_limit_min=float(hf.get("time_step_min", 0.001)),  # its prefill clamps dt from below only
        **{**attention_fields(hf, d_model), "attn_bias": False, "head_dim": hf.get("head_dim", 128)},
        d_ff=hf.get("intermediate_size", 21504),
        moe_d_ff=hf.get("moe_intermediate_size", 7688),
        shared_d_ff=hf.get("moe_shared_expert_intermediate_size", 7688),
        n_experts=get(hf, "n_routed_experts", "num_local_experts", default=8),
        top_k=hf.get("num_experts_per_tok", 2),
        renormalize=hf.get("norm_topk_prob", True),
        n_expert_groups=hf.get("n_group", 1),
        topk_groups=hf.get("topk_group", 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )


EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(up|down)_proj\.weight$")
FFN_RENAMES = [
    (r"^gate\.weight$", "router.weight"),
    (r"^gate\.e_score_correction_bias$", "router_bias"),
    (r"^shared_experts\.", "shared_mlp."),
    (r"^experts\.(up|down)_proj$", r"\1_proj"),  # transformers 5's stacked experts
]


def _rename(name: str, cfg: ModelConfig) -> str:
    """backbone.* (on disk) or model.* (transformers 5 in memory) -> our names; a layer's only sublayer decides
    whether its `norm` and `mixer.*` are the mixer's or the feed-forward's."""
    m = re.match(r"^(?:backbone|model)\.(.+)$", name)
    if m is None:
        return rename(name, [(r"^lm_head\.weight$", "lm_head.weight")])
    rest = m[1]
    if rest in ("embeddings.weight", "embedding.weight"):
        return "embeddings.weight"
    if rest == "norm_f.weight":
        return "norm_f.weight"
    layer = re.match(r"^layers\.(\d+)\.(norm\.weight|mixer\.(.+))$", rest)
    if layer is None or int(layer[1]) >= cfg.n_layers:
        raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint")
    i, tail = int(layer[1]), layer[3]
    if cfg.layers[i].mixer is not None:
        return f"layers.{i}.{layer[2]}"
    if tail is None:
        return f"layers.{i}.ffn_norm.weight"
    for pattern, repl in FFN_RENAMES:
        tail = re.sub(pattern, repl, tail)
    return f"layers.{i}.ffn.{tail}"


def convert(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename and stack per-expert weights into (E, F, D) / (E, D, F); multi-token-prediction heads (mtp.*),
    which plain generation does not run, are left out."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("mtp."):
            continue
        name = _rename(k, cfg)
        if m := EXPERT.match(name):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = v
        else:
            out[name] = v
    stack_experts(out, experts)
    return out


FAMILY = Family("nemotron_h", config, convert, model_types=("nemotron_h",), architectures=("NemotronHForCausalLM",))
