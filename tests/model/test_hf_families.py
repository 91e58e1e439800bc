"""The Mamba-2 hybrid families against transformers: random checkpoints written by `save_pretrained`, loaded by
our loader, logits equal to HF's full forward; prefill then in-place decode equal to that forward too.

Odd sizes everywhere: Mamba-2 with H = 6 heads of P = 4 in G = 3 groups, N = 7, chunk 5 against prompts of 19
tokens; grouped-query attention 3 heads over 1 K/V head; every parameter and buffer random (norm weights,
A_log, dt_bias, the sigmoid router's correction bias), so nothing passes by sitting at its initial value.
"""

from __future__ import annotations

import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_model

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")

V, L, PREFIX = 61, 19, 7
MAMBA2 = dict(hidden_size=12, num_attention_heads=3, num_key_value_heads=1, vocab_size=V, tie_word_embeddings=False)
BAMBA_SSM = dict(mamba_expand=2, mamba_n_heads=6, mamba_d_head=4, mamba_d_state=7, mamba_n_groups=3)
BAMBA_SSM |= dict(mamba_chunk_size=5, time_step_limit=(0.02, 0.9))


def _mamba2():
    cfg = transformers.Mamba2Config(
        vocab_size=V, hidden_size=12, expand=2, num_heads=6, head_dim=4, state_size=7, n_groups=3, chunk_size=5,
        num_hidden_layers=3, time_step_limit=(0.0, 0.7), use_bias=True,
    )  # fmt: skip
    return transformers.Mamba2ForCausalLM(cfg)


def _bamba():
    cfg = transformers.BambaConfig(
        **MAMBA2, **BAMBA_SSM, num_hidden_layers=3, attn_layer_indices=[1], intermediate_size=22,
        attention_bias=True, rope_theta=500.0,
    )  # fmt: skip
    return transformers.BambaForCausalLM(cfg)


def _granite(n_experts=5):
    cfg = transformers.GraniteMoeHybridConfig(
        **MAMBA2, **BAMBA_SSM, num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
        intermediate_size=14, shared_intermediate_size=10, num_local_experts=n_experts, num_experts_per_tok=2,
        position_embedding_type="rope", embedding_multiplier=1.7, residual_multiplier=0.6,
        attention_multiplier=0.4, logits_scaling=2.5,
    )  # fmt: skip
    return transformers.GraniteMoeHybridForCausalLM(cfg)


def _nemotron_h():
    cfg = transformers.NemotronHConfig(
        **MAMBA2, mamba_num_heads=6, mamba_head_dim=4, ssm_state_size=7, n_groups=3, chunk_size=5, head_dim=5,
        layers_block_type=["mamba", "moe", "attention", "mlp", "mamba"], intermediate_size=22,
        moe_intermediate_size=9, moe_shared_expert_intermediate_size=8, n_routed_experts=6, num_experts_per_tok=2,
        n_group=3, topk_group=2, routed_scaling_factor=1.8, time_step_min=0.05,
    )  # fmt: skip
    return transformers.NemotronHForCausalLM(cfg)


FAMILIES = {"mamba2": _mamba2, "bamba": _bamba, "granitemoehybrid": _granite, "nemotron_h": _nemotron_h}


@torch.no_grad()
def _randomize(model) -> None:
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("norm_f.weight"):
            p.uniform_(0.5, 1.5)
        elif name.endswith(("A_log", "dt_bias")):
            p.uniform_(-1.0, 1.0)
        else:
            p.normal_(0.0, 0.3)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0.0, 0.2)


def _save(family: str, directory, **save_kw):
    hf = FAMILIES[family]() if family != "granite-dense" else _granite(n_experts=0)
    _randomize(hf)
    hf.eval().save_pretrained(directory, **save_kw)
    # Reloaded as a user would; eager attention and the per-expert loop (HF's grouped_mm needs 16-byte strides)
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager", experts_implementation="eager"
    ).eval()


@pytest.mark.parametrize("family", [*FAMILIES, "granite-dense"])
def test_logits_and_decode_equal_hf(tmp_path, family):
    hf = _save(family, tmp_path)
    ours, _ = load_model(tmp_path)
    tokens = torch.randint(0, V, (2, L))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits.float()  # (B, L, V)
        got = ours(tokens).logits
    assert want.abs().max() > 1  # the comparison is not between near-zero logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    logits, state = ours.prefill(tokens[:, :PREFIX], ours.empty_state(2))
    torch.testing.assert_close(logits, want[:, PREFIX - 1], atol=1e-4, rtol=1e-4)
    pool = state.with_capacity(L)  # a pool row with room for the whole sequence, decoded in place
    for t in range(PREFIX, L):
        logits, same = ours.decode(tokens[:, t], pool, out=pool)
        assert same is pool
        torch.testing.assert_close(logits, want[:, t], atol=1e-4, rtol=1e-4)


def test_layouts_as_hf_builds_them(tmp_path):
    _save("nemotron_h", tmp_path)
    ours, _ = load_model(tmp_path)
    assert [(s.mixer, s.ffn) for s in ours.config.layers] == [
        ("mamba2", None), (None, "moe_sigmoid"), ("attention", None), (None, "mlp_relu2"), ("mamba2", None),
    ]  # fmt: skip
    assert ours.config.time_step_limit_min == 0.05 and ours.config.time_step_limit_max == 0
    assert not ours.config.tie_embeddings
    assert [list(s) for s in ours.state_specs()] == [["conv", "ssm"], [], ["k", "v", "len"], [], ["conv", "ssm"]]


def test_sharded_checkpoint(tmp_path):
    hf = _save("granitemoehybrid", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours, _ = load_model(tmp_path)
    tokens = torch.randint(0, V, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, hf(tokens, use_cache=False).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "family, key, value",
    [
        ("nemotron_h", "moe_latent_size", 4),
        ("nemotron_h", "mlp_hidden_act", "silu"),
        ("bamba", "mlp_bias", True),
        ("bamba", "rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0}),
        ("granitemoehybrid", "position_embedding_type", "alibi"),
        ("mamba2", "hidden_act", "gelu"),
    ],
)
def test_options_we_do_not_implement_are_refused(tmp_path, family, key, value):
    _save(family, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, key: value}))
    with pytest.raises(CheckpointError, match=key):
        load_model(tmp_path)


def test_misshaped_expert_is_named(tmp_path):
    """A per-expert tensor of the wrong size is an error naming the stacked tensor and both shapes."""
    from safetensors.torch import load_file, save_file

    _save("nemotron_h", tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd = {k: v[:, :11].contiguous() if ".experts." in k and k.endswith("up_proj.weight") else v for k, v in sd.items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'layers.1.ffn.up_proj' has shape \(6, 9, 11\), expected \(6, 9, 12\)"):
        load_model(tmp_path)
