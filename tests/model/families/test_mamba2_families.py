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
from tests.helpers import FAMILIES, save_hf_family

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")

V, L, PREFIX = 61, 19, 7


def _save(family: str, directory, **save_kw):
    return save_hf_family(family, directory, V, **save_kw)


@pytest.mark.parametrize("family", FAMILIES)
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
