"""Model configuration: one dataclass, with the hybrid layer layout as data.

Glossary of dimension letters used across model/:
    B batch, L sequence length, D d_model, Di d_inner (= expand * D), N d_state,
    K d_conv (conv kernel width), R dt_rank, V vocab size, T tokens (B * L flattened),
    E experts, k experts per token (top-k), F feed-forward / expert hidden size,
    nH attention heads, nKV key/value heads, hd attention head dim.

A model is a stack of layers. Each layer is a mixer (pre-norm residual: Mamba-1 or causal self-attention)
optionally followed by a feed-forward (pre-norm residual): nothing, a dense SwiGLU MLP, or a sparse MoE. That
one shape covers pure Mamba (HF MambaForCausalLM: mixer only), MoE-Mamba (Pióro et al. 2024, §2: every Mamba
layer followed by a Switch MoE layer) and Jamba (Mamba with dt/B/C norms or attention, each + MLP or MoE).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

MIXERS = ("mamba", "attention")  # model/mixers.py maps each name to its module
FFNS = (None, "mlp", "moe")


@dataclass(frozen=True)
class LayerSpec:
    """One layer: a mixer and an optional feed-forward."""

    mixer: str = "mamba"
    ffn: str | None = None

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"layer mixer {self.mixer!r} is not supported (supported: {MIXERS})")
        if self.ffn not in FFNS:
            raise ValueError(f"layer ffn {self.ffn!r} is not one of {FFNS}")


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
    n_experts: int = 0
    top_k: int = 1
    renormalize: bool = False  # Mixtral renormalises the top-k weights, Jamba and Switch do not
    capacity_factor: float = 0.0  # 0 = dropless; > 0 drops overflow tokens (training only)
    aux_loss_coef: float = 0.01  # Switch load-balancing loss coefficient
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss coefficient
    # Norms, residual stream, head.
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
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
        kinds = {s.ffn for s in self.layers}
        if kinds & {"mlp", "moe"} and self.d_ff <= 0:
            raise ValueError("model config: layers with an ffn need d_ff > 0")
        if "moe" in kinds and not (self.n_experts >= 1 and 1 <= self.top_k <= self.n_experts):
            raise ValueError(
                f"model config: MoE layers need n_experts >= top_k >= 1 (got {self.n_experts}, {self.top_k})"
            )

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

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
        return [i for i, s in enumerate(self.layers) if s.ffn == "moe"]

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
