"""Hugging Face Mamba-2 family checkpoints -> our config and parameter names: `Mamba2ForCausalLM`,
`BambaForCausalLM`, `GraniteMoeHybridForCausalLM` and `NemotronHForCausalLM`.

Glossary: D d_model, H Mamba-2 heads, P Mamba-2 head dim, E experts, F expert hidden size, S shared-expert
hidden size.

Every family's Mamba-2 layer has HF `Mamba2Mixer`'s parameter names (model/mamba2.py), so only the prefixes
and the feed-forwards need renaming. docs/model.md lists each family's names and layouts. A config option that
changes the math and that we do not implement is refused at load, naming it (hf.refuse_unsupported).
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from .config import LayerSpec, ModelConfig
from .errors import CheckpointError
from .hf import _get, _rename, convert_jamba_state_dict, convert_mamba_state_dict, refuse_unsupported


def _limit(value) -> tuple[float, float]:
    """HF time_step_limit -> (min, max) with max 0 for "none". transformers writes infinity as
    {"__float__": "Infinity"} (JSON has no infinity); Python's json reads a bare Infinity too."""
    if value is None:
        return 0.0, 0.0
    lo, hi = (float(v["__float__"]) if isinstance(v, dict) else float(v) for v in value)
    return lo, 0.0 if math.isinf(hi) else hi


def _eos(hf: dict, default: int = 0) -> int | None:
    """The first of config.json's eos ids (the tokenizer stops at all of them: tokenizer.py)."""
    eos = hf.get("eos_token_id", default)
    return eos[0] if isinstance(eos, list) else eos


def _mamba2_fields(hf: dict, d_model: int, prefix: str = "mamba_") -> dict:
    """The Mamba-2 options of Bamba and Granite (their `mamba_*` keys); H * P = mamba_expand * D."""
    heads, expand = hf.get(f"{prefix}n_heads", 128), hf.get(f"{prefix}expand", 2)
    head_dim = hf.get(f"{prefix}d_head", "auto")
    head_dim = expand * d_model // heads if head_dim in ("auto", None) else head_dim
    if heads * head_dim != expand * d_model:
        raise CheckpointError("config.json: mamba_n_heads * mamba_d_head != mamba_expand * hidden_size")
    lo, hi = _limit(hf.get("time_step_limit"))
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


def _rope(hf: dict, default_partial: float) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from rope_parameters (transformers 5) or the legacy top-level keys."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"config.json: rope_parameters={rope!r} is not supported (rope_type default only)")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial)))


def mamba2_config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF Mamba2Config -> ModelConfig: every layer a Mamba-2 mixer, no FFN, fp32 residual by default."""
    refuse_unsupported(hf, {"hidden_act": ["silu", None], "rms_norm": [True, None]})
    d_model, heads, head_dim = hf.get("hidden_size", 4096), hf.get("num_heads", 128), hf.get("head_dim", 64)
    if heads * head_dim != hf.get("expand", 2) * d_model:
        raise CheckpointError("config.json: num_heads * head_dim != expand * hidden_size")
    lo, hi = _limit(hf.get("time_step_limit"))
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
        pad_token_id=_get(hf, "pad_token_id", default=0),
        bos_token_id=_get(hf, "bos_token_id", default=0),
        eos_token_id=_eos(hf),
    )


def _attention_fields(hf: dict, d_model: int) -> dict:
    n_heads = hf.get("num_attention_heads", 32)
    return dict(
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") or d_model // n_heads,
        attn_bias=hf.get("attention_bias", False),
        max_position_embeddings=hf.get("max_position_embeddings", 0) or 0,
    )


def _common(hf: dict, vocab_size: int | None, eps_default: float) -> dict:
    return dict(
        vocab_size=vocab_size or hf.get("vocab_size", 128000),
        d_model=hf.get("hidden_size", 4096),
        norm_eps=hf.get("rms_norm_eps", eps_default),
        residual_in_fp32=False,
        tie_embeddings=hf.get("tie_word_embeddings", False),
        pad_token_id=_get(hf, "pad_token_id", default=0),
        bos_token_id=_get(hf, "bos_token_id", default=1),
        eos_token_id=_eos(hf, 2),
    )


def bamba_config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF BambaConfig -> ModelConfig: Mamba-2 or RoPE attention (layers in attn_layer_indices), each + SwiGLU."""
    refuse_unsupported(hf, {"hidden_act": ["silu", None], "mlp_bias": [False, None]})
    base = _common(hf, vocab_size, 1e-5)
    n = hf.get("num_hidden_layers", 32)
    attn = set(hf.get("attn_layer_indices") or [])
    theta, partial = _rope(hf, 0.5)  # BambaConfig injects partial_rotary_factor 0.5
    return ModelConfig(
        **base,
        layers=[LayerSpec("attention" if i in attn else "mamba2", "mlp") for i in range(n)],
        **_mamba2_fields(hf, base["d_model"]),
        **_attention_fields(hf, base["d_model"]),
        rope_theta=theta,
        partial_rotary_factor=partial,
        d_ff=hf.get("intermediate_size", 14336),
    )


def _layer_kind(name: str) -> str:
    """Legacy and new layer-type names -> mamba2 / attention / mlp / moe."""
    kinds = {"M": "mamba2", "*": "attention", "-": "mlp", "E": "moe", "mamba": "mamba2", "attention": "attention"}
    kinds |= {"linear_attention": "mamba2", "full_attention": "attention", "mlp": "mlp", "moe": "moe"}
    if name not in kinds:
        raise CheckpointError(f"config.json: layer type {name!r} is not supported (supported: {sorted(kinds)})")
    return kinds[name]


def granite_config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF GraniteMoeHybridConfig -> ModelConfig: Mamba-2 or attention, each + MoE with a shared SwiGLU expert
    (or the shared expert alone when num_local_experts is 0); Granite's multipliers."""
    refuse_unsupported(hf, {"hidden_act": ["silu", None], "position_embedding_type": [None, "nope", "rope"]})
    base = _common(hf, vocab_size, 1e-6)
    n_experts = hf.get("num_local_experts", 8)
    kinds = [_layer_kind(t) for t in hf.get("layer_types") or ["mamba"] * hf.get("num_hidden_layers", 40)]
    ffn = "moe" if n_experts else "mlp"
    theta = _rope(hf, 1.0)[0] if hf.get("position_embedding_type") == "rope" else 0.0
    return ModelConfig(
        **base,
        layers=[LayerSpec("mamba2" if k == "mamba2" else "attention", ffn) for k in kinds],
        **_mamba2_fields(hf, base["d_model"]),
        **_attention_fields(hf, base["d_model"]),
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


def _nemotron_layers(hf: dict) -> list[LayerSpec]:
    pattern = hf.get("layers_block_type") or hf.get("layer_types") or hf.get("hybrid_override_pattern")
    if not pattern:
        raise CheckpointError("config.json: a Nemotron-H config needs layers_block_type or hybrid_override_pattern")
    specs = {"mamba2": ("mamba2", None), "attention": ("attention", None), "mlp": (None, "mlp_relu2")}
    specs["moe"] = (None, "moe_sigmoid")
    return [LayerSpec(*specs[_layer_kind(t)]) for t in pattern]


def nemotron_h_config(hf: dict, vocab_size: int | None) -> ModelConfig:
    """HF NemotronHConfig -> ModelConfig: each layer one of Mamba-2, NoPE attention, relu² MLP, sigmoid MoE."""
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
    n_experts = _get(hf, "n_routed_experts", "num_local_experts", default=8)
    return ModelConfig(
        # Never tied: NemotronHForCausalLM ties nothing whatever tie_word_embeddings says.
        **{**_common(hf, vocab_size, 1e-5), "norm_eps": hf.get("layer_norm_epsilon", 1e-5), "tie_embeddings": False},
        layers=_nemotron_layers(hf),
        mamba2_heads=hf.get("mamba_num_heads", 128),
        mamba2_head_dim=hf.get("mamba_head_dim", 64),
        d_state=hf.get("ssm_state_size", 128),
        n_groups=_get(hf, "n_groups", "mamba_n_groups", default=8),
        d_conv=_get(hf, "conv_kernel", "mamba_d_conv", default=4),
        chunk_size=_get(hf, "chunk_size", "mamba_chunk_size", default=128),
        conv_bias=_get(hf, "use_conv_bias", "mamba_conv_bias", default=True),
        proj_bias=hf.get("use_bias", False),
        time_step_limit_min=float(hf.get("time_step_min", 0.001)),  # its prefill clamps dt from below only
        **{**_attention_fields(hf, d_model), "attn_bias": False, "head_dim": hf.get("head_dim", 128)},
        d_ff=hf.get("intermediate_size", 21504),
        moe_d_ff=hf.get("moe_intermediate_size", 7688),
        shared_d_ff=hf.get("moe_shared_expert_intermediate_size", 7688),
        n_experts=n_experts,
        top_k=hf.get("num_experts_per_tok", 2),
        renormalize=hf.get("norm_topk_prob", True),
        n_expert_groups=hf.get("n_group", 1),
        topk_groups=hf.get("topk_group", 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
    )


# ---------------------------------------------------------------- weights

_GRANITE_RENAMES = [
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
_GRANITE_GATE_UP = re.compile(
    r"^model\.layers\.(\d+)\.(?:block_sparse_moe\.(?:input_linear\.weight|experts\.gate_up_proj)|shared_mlp\.(input|output)_linear\.weight)$"
)


def convert_granite_state_dict(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename; split the fused [gate | up] halves (gate rows first) of the experts (E, 2F, D) and of the shared
    expert (2S, D). The shared expert is `ffn.shared_mlp` beside routed experts, the whole `ffn` without them."""
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = _GRANITE_GATE_UP.match(k)
        if m is None:
            out[_rename(k, _GRANITE_RENAMES)] = v
            continue
        layer, shared_part = m[1], m[2]
        prefix = f"layers.{layer}.ffn." + ("shared_mlp." if shared_part and cfg.n_experts else "")
        suffix = ".weight" if shared_part else ""  # the shared expert is nn.Linear, the experts are stacked
        if shared_part == "output":
            out[f"{prefix}down_proj{suffix}"] = v
        else:  # (E, 2F, D) or (2S, D): gate half first
            out[f"{prefix}gate_proj{suffix}"], out[f"{prefix}up_proj{suffix}"] = v.chunk(2, dim=-2)
    return out


_NEMOTRON_EXPERT = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(\d+)\.(up|down)_proj\.weight$")


def _nemotron_rename(name: str, cfg: ModelConfig) -> str:
    """backbone.* (on disk) or model.* (transformers 5 in memory) -> our names; a layer's only sublayer decides
    whether its `norm` and `mixer.*` are the mixer's or the feed-forward's."""
    m = re.match(r"^(?:backbone|model)\.(.+)$", name)
    if m is None:
        return _rename(name, [(r"^lm_head\.weight$", "lm_head.weight")])
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
    tail = re.sub(r"^gate\.weight$", "router.weight", tail)
    tail = re.sub(r"^gate\.e_score_correction_bias$", "router_bias", tail)
    tail = re.sub(r"^shared_experts\.", "shared_mlp.", tail)
    tail = re.sub(r"^experts\.(up|down)_proj$", r"\1_proj", tail)  # transformers 5's stacked experts
    return f"layers.{i}.ffn.{tail}"


def convert_nemotron_h_state_dict(sd: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Rename and stack per-expert weights into (E, F, D) / (E, D, F); multi-token-prediction heads (mtp.*),
    which plain generation does not run, are left out."""
    out: dict[str, Tensor] = {}
    experts: dict[tuple[str, str], dict[int, Tensor]] = {}
    for k, v in sd.items():
        if k.startswith("mtp."):
            continue
        name = _nemotron_rename(k, cfg)
        if m := _NEMOTRON_EXPERT.match(name):
            experts.setdefault((m[1], m[3]), {})[int(m[2])] = v
        else:
            out[name] = v
    for (layer, proj), per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise CheckpointError(f"layer {layer}: experts {ids} are not numbered 0..{len(ids) - 1}")
        out[f"layers.{layer}.ffn.{proj}_proj"] = torch.stack([per_expert[e] for e in ids])
    return out


# model_type -> (config.json -> ModelConfig, HF tensors -> ours)
FAMILIES = {
    "mamba2": (mamba2_config, lambda sd, cfg: convert_mamba_state_dict(sd)),
    "bamba": (bamba_config, lambda sd, cfg: convert_jamba_state_dict(sd)),
    "granitemoehybrid": (granite_config, convert_granite_state_dict),
    "nemotron_h": (nemotron_h_config, convert_nemotron_h_state_dict),
}
ARCHITECTURES = {
    "Mamba2ForCausalLM": "mamba2",
    "BambaForCausalLM": "bamba",
    "GraniteMoeHybridForCausalLM": "granitemoehybrid",
    "NemotronHForCausalLM": "nemotron_h",
}
