"""Core invariances of the recurrent model: decode == forward, chunked == one-shot, batched == alone."""

import pytest
import torch

from model import HybridLM, ModelState, preset
from model.packed import pack_linears
from tests.helpers import LAYOUTS, tiny  # test_packed.py imports them from here too


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_then_decode_equals_forward(layout):
    model = tiny(layout)
    tokens = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(tokens).logits  # (B, L, V)
    logits, state = model.prefill(tokens[:, :3], model.empty_state(2))
    diffs = [(logits - full[:, 2]).abs().max()]
    for t in range(3, 12):
        logits, state = model.decode(tokens[:, t], state)
        diffs.append((logits - full[:, t]).abs().max())
    assert max(diffs) <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunked_prefill_equals_one_shot(layout):
    model = tiny(layout)
    tokens = torch.randint(0, 97, (2, 17))
    one_logits, one_state = model.prefill(tokens, model.empty_state(2), all_logits=True)
    state, chunks = model.empty_state(2), []
    for a, b in [(0, 2), (2, 7), (7, 8), (8, 17)]:  # chunks shorter and longer than d_conv
        logits, state = model.prefill(tokens[:, a:b], state, all_logits=True)
        chunks.append(logits)
    assert (torch.cat(chunks, 1) - one_logits).abs().max() <= 1e-5
    assert (state.ssm - one_state.ssm).abs().max() <= 1e-5
    assert (state.conv - one_state.conv).abs().max() <= 1e-5


def test_state_is_fixed_size_and_inputs_untouched():
    model = tiny("moe-mamba")
    state = model.empty_state(1)
    before = (state.conv.clone(), state.ssm.clone())
    _, s1 = model.prefill(torch.randint(0, 97, (1, 5)), state)
    _, s2 = model.prefill(torch.randint(0, 97, (1, 50)), state)
    assert s1.conv.shape == s2.conv.shape == state.conv.shape and s1.ssm.shape == s2.ssm.shape
    assert torch.equal(state.conv, before[0]) and torch.equal(state.ssm, before[1])
    cfg = model.config
    assert state.bytes_per_sequence() == cfg.n_layers * cfg.d_inner * (cfg.d_conv + cfg.d_state) * 4


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mixed_lengths_through_slots_equal_alone(layout):
    """Sequences of different lengths decoded together through a slot pool equal each decoded alone."""
    model = tiny(layout)
    prompts = [torch.randint(0, 97, (n,)) for n in (3, 8, 5)]
    steps = 6

    def alone(prompt):
        logits, state = model.prefill(prompt[None], model.empty_state(1))
        out = [logits[0]]
        for _ in range(steps):
            logits, state = model.decode(logits.argmax(-1), state)
            out.append(logits[0])
        return torch.stack(out)

    expected = [alone(p) for p in prompts]
    pool = model.empty_state(5)  # more slots than sequences; the sequences live in slots 4, 0, 2
    slots = torch.tensor([4, 0, 2])
    outs, last = [[] for _ in prompts], []
    for i, (slot, p) in enumerate(zip(slots.tolist(), prompts)):
        logits, st = model.prefill(p[None], pool.select([slot]))
        pool.conv[:, slot], pool.ssm[:, slot] = st.conv[:, 0], st.ssm[:, 0]
        outs[i].append(logits[0])
        last.append(logits[0].argmax())
    tokens = torch.stack(last)
    for _ in range(steps):
        logits, st = model.decode(tokens, pool.select(slots))
        pool.conv[:, slots], pool.ssm[:, slots] = st.conv, st.ssm
        for i in range(len(prompts)):
            outs[i].append(logits[i])
        tokens = logits.argmax(-1)
    for got, want in zip(outs, expected):
        assert (torch.stack(got) - want).abs().max() <= 1e-5


def test_training_forward_returns_losses_and_gradients():
    model = tiny("moe-mamba").train()
    tokens = torch.randint(0, 97, (2, 10))
    loss, out = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert out.aux_loss > 0 and out.z_loss > 0 and len(out.routers) == 2
    assert model.layers[0].mixer.A_log.grad is not None and model.layers[0].ffn.router.weight.grad.abs().sum() > 0


def test_gradient_checkpointing_same_gradients():
    model = tiny("jamba").train()
    tokens = torch.randint(0, 97, (2, 10))
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing = True
    model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
    for n, p in model.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_init_follows_mamba():
    model = tiny("mamba")
    mixer = model.layers[0].mixer
    assert torch.allclose(-torch.exp(mixer.A_log[0]), -torch.arange(1, 9, dtype=torch.float32))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_decode_close_to_forward(dtype):
    model = tiny("moe-mamba").cast(dtype)
    assert model.layers[0].mixer.A_log.dtype == torch.float32
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        full = model(tokens).logits
    logits, state = model.prefill(tokens[:, :2], model.empty_state(1))
    assert state.ssm.dtype == torch.float32 and state.conv.dtype == dtype
    for t in range(2, 6):
        logits, state = model.decode(tokens[:, t], state)
        assert (logits - full[:, t]).abs().max() < 2e-2  # forward and step share the fp32 conv and scan


def test_presets_build():
    for name in ("debug", "aetheris-hybrid"):
        assert HybridLM(preset(name)).config.n_layers >= 2
    paper = preset("moe-mamba-paper")
    assert paper.d_model == 512 and len(paper.moe_layers) == 8 and paper.n_experts == 32 and paper.d_ff == 1536
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("nope")


def test_decode_in_place_equals_fresh_state():
    model = tiny("moe-mamba")
    _, state = model.prefill(torch.randint(0, 97, (3, 6)), model.empty_state(3))
    tokens = torch.randint(0, 97, (3,))
    fresh_logits, fresh = model.decode(tokens, ModelState(state.conv.clone(), state.ssm.clone()))
    logits, same = model.decode(tokens, state, out=state)
    assert same is state and torch.equal(logits, fresh_logits)
    assert torch.equal(state.conv, fresh.conv) and torch.equal(state.ssm, fresh.ssm)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("layout", ["moe-mamba", "jamba"])
def test_compiled_inference_equals_eager(layout, packed):
    """The torch.compile'd prefill scan and mixer step (fused kernels, state stored straight into `out`), on
    plain or oneDNN-packed projections (the serving fast path), against the plain eager reference, at batch 1
    (specialised graphs) and batch 3 (dynamic batch), a prompt longer than one scan chunk, decode in place
    and not."""
    eager = tiny(layout)
    compiled = tiny(layout)
    compiled.load_state_dict(eager.state_dict())
    if packed:
        pack_linears(compiled)
    compiled.compile_inference()
    for batch in (1, 3):
        prompt = torch.randint(0, 97, (batch, 21))
        want, state = eager.prefill(prompt, eager.empty_state(batch), all_logits=True)
        got, pool = compiled.prefill(prompt, compiled.empty_state(batch), all_logits=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pool.ssm, state.ssm, atol=1e-5, rtol=1e-5)
        for _ in range(4):
            tokens = torch.randint(0, 97, (batch,))
            want, state = eager.decode(tokens, state)
            fresh_logits, fresh = compiled.decode(tokens, pool)
            got, same = compiled.decode(tokens, pool, out=pool)
            assert same is pool
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fresh_logits, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pool.ssm, state.ssm, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fresh.conv, state.conv, atol=1e-6, rtol=1e-6)
