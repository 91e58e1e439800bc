"""Small objects the tests build for themselves: a trained toy tokenizer and tiny checkpoints."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

from model import HybridLM, LayerSpec, ModelConfig, ModelState
from model.checkpoint import save_checkpoint
from training.tokenizer import train_tokenizer

TOY_TEXT = [
    "Once upon a time there was a little cat named Tom. Tom liked to play with a red ball.",
    "One day, Lily went to the park with her mom. She saw a big dog and said hello.",
    "The sun was warm and the birds sang. Café, naïve, 日本語 and emoji 🙂 are text too.",
] * 20


@cache
def toy_tokenizer(vocab_size: int = 300):
    return train_tokenizer(TOY_TEXT, vocab_size)


LAYOUTS = {
    "mamba": dict(layers=[LayerSpec("mamba", None)] * 3),
    "moe-mamba": dict(layers=[LayerSpec("mamba", "moe")] * 2, d_ff=48, n_experts=4, top_k=1),
    "jamba": dict(
        layers=[LayerSpec("mamba", "mlp"), LayerSpec("mamba", "moe")],
        d_ff=40,
        n_experts=4,
        top_k=2,
        mixer_norms=True,
        residual_in_fp32=False,
        tie_embeddings=False,
        norm_eps=1e-6,
    ),
    # Mamba-1 + grouped-query attention with partial RoPE and biases + MoE: every kind of layer state.
    "hybrid": dict(
        layers=[LayerSpec("mamba", "mlp"), LayerSpec("attention", "moe"), LayerSpec("mamba", None)],
        d_ff=40,
        n_experts=4,
        top_k=2,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        attn_bias=True,
    ),
    # Mamba-2 (2 groups, chunks of 4: every prompt spans several) + attention + MoE with a shared expert and
    # Granite's multipliers: Bamba / Granite 4.0-H shapes.
    "mamba2-hybrid": dict(
        layers=[LayerSpec("mamba2", "moe"), LayerSpec("attention", "mlp"), LayerSpec("mamba2", None)],
        mamba2_head_dim=8,
        n_groups=2,
        chunk_size=4,
        time_step_limit_min=0.01,
        time_step_limit_max=0.5,
        d_ff=40,
        shared_d_ff=24,
        n_experts=4,
        top_k=2,
        renormalize=True,
        n_heads=4,
        n_kv_heads=2,
        rope_theta=10000.0,
        partial_rotary_factor=0.5,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        logits_scaling=1.5,
    ),
    # Nemotron-H: each layer one sublayer; sigmoid-routed relu² MoE in 2 groups with a shared expert.
    "nemotron-h": dict(
        layers=[LayerSpec("mamba2", None), LayerSpec(None, "moe_sigmoid"), LayerSpec("attention", None)]
        + [LayerSpec(None, "mlp_relu2"), LayerSpec("mamba2", None)],
        mamba2_heads=6,
        mamba2_head_dim=6,
        n_groups=3,
        chunk_size=5,
        d_ff=40,
        moe_d_ff=24,
        shared_d_ff=16,
        n_experts=6,
        top_k=2,
        renormalize=True,
        n_expert_groups=3,
        topk_groups=2,
        routed_scaling_factor=2.5,
        n_heads=4,
        n_kv_heads=2,
        head_dim=6,
        residual_in_fp32=False,
        tie_embeddings=False,
    ),
}
# What the serving and training tests run by default: a plain Mamba layer and a Mamba + MoE layer.
SERVING = dict(layers=[LayerSpec("mamba", None), LayerSpec("mamba", "moe")], d_ff=48, n_experts=4, top_k=1)


def tiny_config(vocab_size: int = 97, layout: str | None = None, **kw) -> ModelConfig:
    """The tests' one tiny model: d_model 32, d_state 8, the layers of LAYOUTS[layout] (default SERVING)."""
    base = dict(vocab_size=vocab_size, d_model=32, d_state=8, **(LAYOUTS[layout] if layout else SERVING))
    return ModelConfig(**{**base, **kw})


def tiny(layout: str, **kw) -> HybridLM:
    """A tiny model of one of LAYOUTS (vocab 97) in eval mode."""
    return HybridLM(tiny_config(97, layout, **kw)).eval()


def assert_states_close(got: ModelState, want: ModelState, tol: float = 1e-5) -> None:
    """Every tensor of two states equal within tol; growing ones (K/V) over the positions both hold."""
    for (spec, a, layer), (_, b, _) in zip(got.items(), want.items()):
        if spec.seq_axis is not None:
            n = min(a.shape[1 + spec.seq_axis], b.shape[1 + spec.seq_axis])
            a, b = a.narrow(1 + spec.seq_axis, 0, n), b.narrow(1 + spec.seq_axis, 0, n)
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=f"layer {layer}")


def greedy(model: HybridLM, tok, prompt_ids: list[int], max_tokens: int) -> str:
    """The obvious loop: one sequence, prefill, then argmax decode until a stop token or max_tokens."""
    logits, state = model.prefill(torch.tensor([prompt_ids]), model.empty_state(1))
    out = []
    for _ in range(max_tokens):
        t = int(logits[0, : tok.vocab_size].argmax())
        if t in tok.stop_token_ids:
            break
        out.append(t)
        logits, state = model.decode(torch.tensor([t]), state)
    return tok.decode(out)


def make_tiny_checkpoint(directory: Path, **kw) -> Path:
    tok = toy_tokenizer()
    model = HybridLM(tiny_config(tok.vocab_size, **kw))
    return save_checkpoint(model, directory, tok)


def jamba_config(**kw):
    """A tiny HF JambaConfig: 4 layers, MoE (4 experts, top-2) on layers 1 and 3, attention placed past the last
    layer (attention-free) unless `kw` moves it. transformers is a test dependency."""
    import transformers

    base = dict(
        vocab_size=173,
        hidden_size=32,
        intermediate_size=56,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        expert_layer_period=2,
        expert_layer_offset=1,
        attn_layer_period=5,
        attn_layer_offset=4,
        mamba_d_state=8,
        mamba_dt_rank=5,
        use_mamba_kernels=False,
    )
    return transformers.JambaConfig(**{**base, **kw})


def hybrid_jamba(directory: Path, **kw):
    """A random HF JambaForCausalLM with attention, written by save_pretrained: 6 layers, attention on 1 and 4,
    grouped-query (6 heads over 2 K/V heads of 6 dims), MoE on odd layers, odd sizes. Returns the HF model."""
    import transformers

    cfg = jamba_config(
        hidden_size=36,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=2,
        attn_layer_period=3,
        attn_layer_offset=1,
        mamba_dt_rank=3,
        **kw,
    )
    hf = transformers.JambaForCausalLM(cfg).eval()
    hf.save_pretrained(directory)
    return hf
