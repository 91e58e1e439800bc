"""The attention mixer: SDPA against the explicit masked softmax, RoPE against transformers' rotation, and the
three paths (full forward, prefill continuing cached K/V, batched decode of rows of different lengths)."""

import pytest
import torch

from model import HybridLM
from model.attention import attention_reference, attention_sdpa, rope
from tests.helpers import tiny


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (3, 1)])
def test_sdpa_equals_reference_with_causal_offset_and_key_padding(heads, kv_heads):
    B, L, T, hd = 3, 5, 12, 8
    q = torch.randn(B, heads, L, hd)
    k, v = torch.randn(B, kv_heads, T, hd), torch.randn(B, kv_heads, T, hd)
    causal = torch.arange(T) <= (T - L + torch.arange(L))[:, None]  # (L, T): a chunk after T - L cached keys
    lengths = torch.tensor([12, 7, 9])
    padded = causal & (torch.arange(T) < lengths[:, None, None])  # (B, L, T): rows hold different lengths
    padded[:, :, 0] = True  # every query sees at least one key
    for mask in (causal[None, None], padded[:, None]):
        want = attention_reference(q, k, v, mask, 0.3)
        torch.testing.assert_close(attention_sdpa(q, k, v, mask, 0.3), want, atol=1e-5, rtol=1e-5)


def test_reference_ignores_masked_keys():
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    mask = (torch.arange(6) < 3)[None, None, None]
    changed = k.clone(), v.clone()
    changed[0][..., 3:, :] += 100
    changed[1][..., 3:, :] -= 100
    torch.testing.assert_close(attention_reference(q, k, v, mask, 0.5), attention_reference(q, *changed, mask, 0.5))


@pytest.mark.parametrize("rotary_dim", [8, 4])
def test_rope_matches_transformers(rotary_dim):
    bamba = pytest.importorskip("transformers.models.bamba.modeling_bamba", reason="transformers is the reference")
    B, H, L, hd, theta = 2, 3, 7, 8, 500.0
    x = torch.randn(B, H, L, hd)
    positions = torch.arange(L).expand(B, L) + torch.tensor([[0], [5]])
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = positions[..., None].float() * inv_freq  # (B, L, R/2)
    emb = torch.cat([angles, angles], -1)
    want, _ = bamba.apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
    torch.testing.assert_close(rope(x, positions, rotary_dim, theta), want, atol=1e-6, rtol=1e-6)


def test_mixer_paths_equal_with_reference_attention():
    """The whole hybrid model with SDPA and with the explicit softmax: forward, chunked prefill, decode."""
    fast = tiny("hybrid")
    slow = tiny("hybrid")
    slow.load_state_dict(fast.state_dict())
    slow.layers[1].mixer.attend = attention_reference
    tokens = torch.randint(0, 97, (2, 14))
    full = slow(tokens).logits
    torch.testing.assert_close(fast(tokens).logits, full, atol=1e-5, rtol=1e-5)
    for model in (fast, slow):
        logits, state = model.prefill(tokens[:, :6], model.empty_state(2), all_logits=True)
        more, state = model.prefill(tokens[:, 6:10], state, all_logits=True)
        torch.testing.assert_close(torch.cat([logits, more], 1), full[:, :10], atol=1e-5, rtol=1e-5)
        state = state.with_capacity(16)
        for t in range(10, 14):
            step, _ = model.decode(tokens[:, t], state, out=state)
            torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)


def test_prefill_refuses_rows_of_different_lengths():
    model: HybridLM = tiny("hybrid")
    _, a = model.prefill(torch.randint(0, 97, (1, 3)), model.empty_state(1))
    state = model.empty_state(2, capacity=8)
    state.copy_rows_(0, a)
    with pytest.raises(ValueError, match="same number of tokens"):
        model.prefill(torch.randint(0, 97, (2, 2)), state)
