"""Model configuration: one dataclass, with the hybrid layer layout as data.

Glossary of dimension letters used across model/:
    B batch, L sequence length, D d_model, Di d_inner (= expand * D), N d_state,
    K d_conv (conv kernel width), R dt_rank, V vocab size, T tokens (B * L flattened),
    E experts, k experts per token (top-k), F feed-forward / expert hidden size,
    nH attention heads, nKV key/value heads, hd attention head dim,
    H Mamba-2 heads, P Mamba-2 head dim, G Mamba-2 groups of B/C.

A model is a stack of layers. Each layer is a mixer (pre-norm residual: Mamba-1, Mamba-2 or causal
self-attention) and/or a feed-forward (pre-norm residual): a dense SwiGLU or relu² MLP, a softmax-routed MoE
(with an optional always-on shared expert) or a sigmoid-routed MoE. That one shape covers pure Mamba / Mamba-2
(mixer only), MoE-Mamba (Pióro et al. 2024, §2: every Mamba layer followed by a Switch MoE layer), Jamba and
Bamba (mixer + FFN), Granite 4.0-H (mixer + MoE with a shared expert) and Nemotron-H (each layer exactly one
mixer or one FFN). docs/model.md maps each family's names onto these.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MIXERS = (None, "mamba", "mamba2", "attention")  # model/mixers.py maps each name to its module
# mlp: SwiGLU; mlp_relu2: down(relu(up x)^2); moe: softmax top-k SwiGLU experts; moe_sigmoid: Nemotron-H's
# sigmoid-routed relu² experts (lm.build_ffn builds each).
FFNS = (None, "mlp", "mlp_relu2", "moe", "moe_sigmoid")
MOE_FFNS = ("moe", "moe_sigmoid")


@dataclass(frozen=True)
class LayerSpec:
    """One layer: a mixer and/or a feed-forward (Nemotron-H's layers have only one of the two)."""

    mixer: str | None = "mamba"
    ffn: str | None = None

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"layer mixer {self.mixer!r} is not supported (supported: {MIXERS})")
        if self.ffn not in FFNS:
            raise ValueError(f"layer ffn {self.ffn!r} is not one of {FFNS}")
        if self.mixer is None and self.ffn is None:
            raise ValueError("a layer needs a mixer, a feed-forward or both")


@dataclass
class ModelConfig:
    vocab_size: int = 50280
    d_model: int = 768
    layers: list[LayerSpec] = field(default_factory=lambda: [LayerSpec()] * 24)
    # Mamba-1 mixer (Gu & Dao 2023, §3): names follow HF MambaConfig / mamba_ssm.
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int = 0  # 0 = "auto" = ceil(d_model / 16)
    conv_bias: bool = True
    proj_bias: bool = False  # bias of in_proj / out_proj
    mixer_norms: bool = False  # Jamba's RMSNorms on dt, B and C after x_proj
    # Mamba-2 mixer (Dao & Gu 2024): also reads d_state, d_conv, conv_bias, proj_bias; Di = H * P.
    mamba2_heads: int = 0  # H; 0 = expand * d_model // mamba2_head_dim
    mamba2_head_dim: int = 64  # P
    n_groups: int = 1  # G: B and C are shared by H / G heads; also the gated norm's groups
    chunk_size: int = 256  # SSD chunk length (results do not depend on it beyond rounding)
    time_step_limit_min: float = 0.0  # dt is clamped to [min, max] after the softplus (HF time_step_limit)
    time_step_limit_max: float = 0.0  # 0 = no upper limit (HF: inf, which JSON cannot hold)
    norm_before_gate: bool = False  # gated norm: rmsnorm(y * silu(z)) (False) or rmsnorm(y) * silu(z)
    # Attention mixer (HF names in comments): heads, optional RoPE and biases.
    n_heads: int = 0  # num_attention_heads
    n_kv_heads: int = 0  # num_key_value_heads; 0 = n_heads (multi-head), fewer = grouped-query
    head_dim: int = 0  # 0 = d_model // n_heads
    rope_theta: float = 0.0  # 0 = no positional encoding (Jamba, Granite 4.0-H); else RoPE base
    partial_rotary_factor: float = 1.0  # share of head_dim that RoPE rotates
    attn_bias: bool = False  # biases on q/k/v/o_proj
    attn_scale: float = 0.0  # 0 = head_dim ** -0.5
    max_position_embeddings: int = 0  # the context the checkpoint was made for (0 = unknown)
    # Feed-forward: dense MLP and every expert share the hidden size d_ff (as Jamba's intermediate_size).
    d_ff: int = 0
    moe_d_ff: int = 0  # expert hidden size; 0 = d_ff (Nemotron-H's differ)
    shared_d_ff: int = 0  # an always-on shared expert of this width beside the routed ones (0 = none)
    n_experts: int = 0
    top_k: int = 1
    renormalize: bool = False  # Mixtral renormalises the top-k weights, Jamba and Switch do not
    # Sigmoid routing (moe_sigmoid, Nemotron-H): experts in groups, the best topk_groups groups kept,
    # weights scaled by routed_scaling_factor.
    n_expert_groups: int = 1
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    capacity_factor: float = 0.0  # 0 = dropless; > 0 drops overflow tokens (training only)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss coefficient
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss coefficient
    # Norms, residual stream, head.
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    # Granite's multipliers (neutral at 1): embeddings * embedding_multiplier, each residual branch *
    # residual_multiplier, logits / logits_scaling. Its attention_multiplier is attn_scale.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # Initialisation (only used when training from scratch).
    init_std: float = 0.02
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    rescale_prenorm_residual: bool = True
    # Special tokens.
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = 0

    def __post_init__(self) -> None:
        self.layers = [s if isinstance(s, LayerSpec) else LayerSpec(**s) for s in self.layers]
        if not self.dt_rank:
            self.dt_rank = math.ceil(self.d_model / 16)
        if self.n_heads and not self.n_kv_heads:
            self.n_kv_heads = self.n_heads
        self.validate()

    def validate(self) -> None:
        for f in fields(self):  # JSON / YAML values: an int where an int belongs, a bool where a bool does
            value, kind = getattr(self, f.name), f.type
            if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"model config: {f.name} must be an integer, got {value!r}")
            if kind == "float" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ValueError(f"model config: {f.name} must be a number, got {value!r}")
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"model config: {f.name} must be true or false, got {value!r}")
        checks = {
            "vocab_size": self.vocab_size > 0,
            "d_model": self.d_model > 0,
            "layers": len(self.layers) > 0,
            "d_state": self.d_state > 0,
            "d_conv": self.d_conv > 0,
            "expand": self.expand > 0,
            "top_k": self.top_k >= 1,
            "capacity_factor": self.capacity_factor >= 0,
            "logits_scaling": self.logits_scaling != 0,
            "moe_d_ff": self.moe_d_ff >= 0,
            "shared_d_ff": self.shared_d_ff >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"model config: invalid {name}={getattr(self, name)!r}")
        if self.attention_layers and not (
            self.n_heads > 0 and self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0
        ):
            raise ValueError(
                f"model config: attention layers need n_heads > 0 divisible by n_kv_heads "
                f"(got {self.n_heads}, {self.n_kv_heads})"
            )
        if self.attention_layers and not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"model config: partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        self._validate_mamba2()
        self._validate_ffns()

    def _validate_mamba2(self) -> None:
        if not any(s.mixer == "mamba2" for s in self.layers):
            return
        H, P, G = self.mamba2_n_heads, self.mamba2_head_dim, self.n_groups
        if not (P > 0 and H > 0 and G > 0 and H % G == 0 and self.chunk_size > 0):
            raise ValueError(
                f"model config: Mamba-2 layers need mamba2_head_dim, mamba2_heads (got {H}), n_groups dividing "
                f"them and chunk_size > 0 (got P={P}, G={G}, chunk_size={self.chunk_size})"
            )
        lo, hi = self.time_step_limit_min, self.time_step_limit_max
        if lo < 0 or (hi and hi < lo):
            raise ValueError(f"model config: time_step_limit [{lo}, {hi}] is not a range (max 0 = unbounded)")

    def _validate_ffns(self) -> None:
        kinds = {s.ffn for s in self.layers}
        if kinds & {"mlp", "mlp_relu2"} and self.d_ff <= 0:
            raise ValueError("model config: layers with a dense ffn need d_ff > 0")
        if kinds & set(MOE_FFNS) and self.expert_d_ff <= 0:
            raise ValueError("model config: MoE layers need d_ff or moe_d_ff > 0")
        if kinds & set(MOE_FFNS) and not (self.n_experts >= 1 and 1 <= self.top_k <= self.n_experts):
            raise ValueError(
                f"model config: MoE layers need n_experts >= top_k >= 1 (got {self.n_experts}, {self.top_k})"
            )
        groups, keep = self.n_expert_groups, self.topk_groups
        if "moe_sigmoid" in kinds and not (groups >= 1 and self.n_experts % groups == 0 and 1 <= keep <= groups):
            raise ValueError(
                f"model config: n_expert_groups={groups} must divide n_experts={self.n_experts} and "
                f"1 <= topk_groups={keep} <= n_expert_groups"
            )

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def mamba2_n_heads(self) -> int:
        return self.mamba2_heads or self.d_inner // max(1, self.mamba2_head_dim)

    @property
    def expert_d_ff(self) -> int:
        return self.moe_d_ff or self.d_ff

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // max(1, self.n_heads)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.layers) if s.mixer == "attention"]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.layers) if s.ffn in MOE_FFNS]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = [asdict(s) for s in self.layers]
        return {"model_type": "aetheris", **d}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = {k: v for k, v in d.items() if k != "model_type"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def alternating(n_blocks: int, ffn: str | None) -> list[LayerSpec]:
    """n_blocks layers, each a Mamba mixer followed by `ffn` (MoE-Mamba's interleaving)."""
    return [LayerSpec("mamba", ffn) for _ in range(n_blocks)]


def preset(name: str, **overrides) -> ModelConfig:
    """Named configurations. `overrides` replace individual fields."""
    presets = {
        # Seconds on a laptop CPU: used by tests and configs/debug.yaml.
        "debug": dict(
            vocab_size=512,
            d_model=64,
            layers=[LayerSpec("mamba", None), LayerSpec("mamba", "moe")],
            d_ff=128,
            n_experts=4,
            top_k=1,
        ),
        # MoE-Mamba paper, Table 4 (v1): d_model 512, 8 Mamba + 8 MoE layers, 32 experts, d_expert 1536.
        "moe-mamba-paper": dict(
            vocab_size=50280,
            d_model=512,
            layers=alternating(8, "moe"),
            d_ff=1536,
            n_experts=32,
            top_k=1,
        ),
        # The paper's dense baseline: 16 Mamba layers, no feed-forward.
        "mamba-paper-baseline": dict(vocab_size=50280, d_model=512, layers=alternating(16, None)),
        # HF state-spaces/mamba-130m-hf shape.
        "mamba-130m": dict(vocab_size=50280, d_model=768, layers=alternating(24, None)),
        # The embedded default model (checkpoints/aetheris-hybrid): MoE-Mamba at a CPU-trainable size.
        "aetheris-hybrid": dict(
            vocab_size=4096,
            d_model=256,
            layers=alternating(4, "moe"),
            d_ff=256,
            n_experts=8,
            top_k=1,
        ),
    }
    if name not in presets:
        raise ValueError(f"unknown model preset {name!r} (known: {sorted(presets)})")
    return ModelConfig(**{**presets[name], **overrides})
