"""Parity with transformers (test-only dependency) on random HF checkpoints written by save_pretrained."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import load_model
from tests.helpers import hybrid_jamba, jamba_config

transformers = pytest.importorskip("transformers", reason="transformers is the reference implementation")


def _ours_vs_hf(hf_model, directory, tokens):
    ours, _ = load_model(directory)
    with torch.no_grad():
        want = hf_model(tokens, use_cache=False).logits.float()
        got = ours(tokens).logits
    return (got - want).abs().max().item(), ours


@pytest.mark.parametrize("tie", [True, False])
def test_mamba_parity(tmp_path, tie):
    cfg = transformers.MambaConfig(
        vocab_size=211,
        hidden_size=40,
        state_size=6,
        num_hidden_layers=3,
        expand=2,
        conv_kernel=3,
        time_step_rank=7,
        tie_word_embeddings=tie,
        use_bias=not tie,
    )
    hf = transformers.MambaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 211, (2, 13))
    diff, ours = _ours_vs_hf(hf, tmp_path, tokens)
    assert diff <= 1e-4
    assert ours.config.tie_embeddings == tie and ours.config.d_conv == 3 and ours.config.dt_rank == 7
    # And our O(1) decode agrees with HF's full forward.
    logits, state = ours.prefill(tokens[:, :5], ours.empty_state(2))
    with torch.no_grad():
        full = hf(tokens).logits.float()
    for t in range(5, 13):
        logits, state = ours.decode(tokens[:, t], state)
        assert (logits - full[:, t]).abs().max() <= 1e-4


def test_state_spaces_original_layout(tmp_path):
    """mamba_ssm's own config.json and `backbone.embedding.weight` name, vocab padded in the weights."""
    cfg = transformers.MambaConfig(vocab_size=104, hidden_size=32, state_size=4, num_hidden_layers=2)
    hf = transformers.MambaForCausalLM(cfg).eval()
    sd = {
        k.replace("backbone.embeddings.", "backbone.embedding."): v.contiguous()
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight"
    }
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "d_model": 32,
                "n_layer": 2,
                "vocab_size": 101,
                "ssm_cfg": {"d_state": 4},
                "rms_norm": True,
                "residual_in_fp32": True,
                "fused_add_norm": True,
                "pad_vocab_size_multiple": 8,
            }
        )
    )
    diff, ours = _ours_vs_hf(hf, tmp_path, torch.randint(0, 101, (1, 9)))
    assert diff <= 1e-4 and ours.config.vocab_size == 104


def test_sharded_checkpoint(tmp_path):
    cfg = transformers.MambaConfig(vocab_size=300, hidden_size=48, state_size=4, num_hidden_layers=4)
    hf = transformers.MambaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    diff, _ = _ours_vs_hf(hf, tmp_path, torch.randint(0, 300, (1, 7)))
    assert diff <= 1e-4


def test_jamba_attention_free_moe_parity(tmp_path):
    hf = transformers.JambaForCausalLM(jamba_config()).eval()
    hf.save_pretrained(tmp_path)
    tokens = torch.randint(0, 173, (2, 11))
    diff, ours = _ours_vs_hf(hf, tmp_path, tokens)
    assert diff <= 1e-4
    assert [s.ffn for s in ours.config.layers] == ["mlp", "moe", "mlp", "moe"] and ours.config.top_k == 2


def test_jamba_with_attention_parity(tmp_path):
    hf = hybrid_jamba(tmp_path)
    tokens = torch.randint(0, 173, (2, 23))
    diff, ours = _ours_vs_hf(hf, tmp_path, tokens)
    assert diff <= 1e-4
    assert [s.mixer for s in ours.config.layers] == ["mamba", "attention", "mamba", "mamba", "attention", "mamba"]
    assert ours.config.n_kv_heads == 2 and ours.config.attn_head_dim == 6 and ours.config.rope_theta == 0
    with torch.no_grad():
        full = hf(tokens, use_cache=False).logits.float()
    # Prefill in chunks (continuing cached K/V and SSM state), then decode: each position equals HF's forward.
    state, logits = ours.empty_state(2), []
    for a, b in [(0, 7), (7, 8), (8, 15)]:
        chunk_logits, state = ours.prefill(tokens[:, a:b], state, all_logits=True)
        logits.append(chunk_logits)
    assert (torch.cat(logits, 1) - full[:, :15]).abs().max() <= 1e-4
    state = state.with_capacity(32)
    for t in range(15, 23):
        step_logits, state = ours.decode(tokens[:, t], state, out=state)
        assert (step_logits - full[:, t]).abs().max() <= 1e-4


@pytest.mark.parametrize(
    "option, value", [("sliding_window", 4096), ("use_alibi", True), ("hidden_act", "gelu")], ids=str
)
def test_jamba_options_we_do_not_implement_are_refused(tmp_path, option, value):
    hybrid_jamba(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, option: value}))
    with pytest.raises(ValueError, match=f"{option}={value!r} is not supported"):
        load_model(tmp_path)


def test_jamba_per_expert_names_on_disk(tmp_path):
    """Whatever transformers writes, a checkpoint with per-expert tensor names loads too."""
    hf = transformers.JambaForCausalLM(jamba_config()).eval()
    hf.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    split = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                split[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e].contiguous()
                split[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e].contiguous()
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                split[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e].contiguous()
        else:
            split[k] = v
    save_file(split, tmp_path / "model.safetensors")
    diff, _ = _ours_vs_hf(hf, tmp_path, torch.randint(0, 173, (1, 8)))
    assert diff <= 1e-4


def test_mamba_bf16_parity_and_decode(tmp_path):
    """In bf16 our logits stay within two bf16 ulps of transformers', and O(1) decode equals our forward."""
    cfg = transformers.MambaConfig(vocab_size=211, hidden_size=64, state_size=8, num_hidden_layers=3)
    transformers.MambaForCausalLM(cfg).save_pretrained(tmp_path)
    hf = transformers.MambaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours, _ = load_model(tmp_path, dtype=torch.bfloat16)
    tokens = torch.randint(0, 211, (2, 13))
    with torch.no_grad():
        want = hf(tokens, use_cache=False).logits.float()
        got = ours(tokens).logits
    assert (got - want).abs().max() <= 2 * 2**-4 * want.abs().max().clamp(min=1)  # 2 ulps at this magnitude
    logits, state = ours.prefill(tokens[:, :5], ours.empty_state(2))
    for t in range(5, 13):
        logits, state = ours.decode(tokens[:, t], state)
        assert (logits - got[:, t]).abs().max() <= 1e-2
