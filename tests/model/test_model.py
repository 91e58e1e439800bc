"""Core invariances of the model: decode == forward, chunked == one-shot, batched == alone, for every layout
(pure Mamba, MoE-Mamba, attention-free Jamba, and a hybrid with grouped-query RoPE attention)."""

import json

import pytest
import torch
import torch.nn.functional as F

from model import HybridLM, ModelConfig, preset
from model.gemv import use_gemv
from model.packed import pack_linears
from tests.helpers import LAYOUTS, assert_states_close, tiny


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
    assert_states_close(state, one_state)


def test_state_is_fixed_size_and_inputs_untouched():
    model = tiny("moe-mamba")
    state = model.empty_state(1)
    before = state.clone()
    _, s1 = model.prefill(torch.randint(0, 97, (1, 5)), state)
    _, s2 = model.prefill(torch.randint(0, 97, (1, 50)), state)
    for (_, a, _), (_, b, _), (_, c, _), (_, d, _) in zip(s1.items(), s2.items(), state.items(), before.items()):
        assert a.shape == b.shape == c.shape and torch.equal(c, d)
    cfg = model.config
    per_seq = cfg.n_layers * cfg.d_inner * (cfg.d_conv + cfg.d_state) * 4
    assert state.bytes_per_sequence(10_000) == {"fixed": per_seq, "growing": 0}


def test_hybrid_state_grows_only_in_attention_layers():
    model = tiny("hybrid")
    _, s1 = model.prefill(torch.randint(0, 97, (1, 5)), model.empty_state(1))
    _, s2 = model.prefill(torch.randint(0, 97, (1, 9)), s1)
    k = s2.layers[1]["k"]
    assert k.shape == (1, 2, 14, 8) and int(s2.layers[1]["len"]) == 14  # (B, nKV, T, hd)
    assert s2.layers[0]["ssm"].shape == s1.layers[0]["ssm"].shape
    # K and V: 2 kv heads x 8 dims x 4 bytes each, per token, in the one attention layer
    assert s2.bytes_per_sequence(100)["growing"] == 2 * 2 * 8 * 4 * 100


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
    pool = model.empty_state(5, capacity=32)  # more slots than sequences; they live in slots 4, 0, 2
    slots = [4, 0, 2]
    outs, last = [[] for _ in prompts], []
    for i, (slot, p) in enumerate(zip(slots, prompts)):
        logits, st = model.prefill(p[None], model.empty_state(1))
        pool.copy_rows_(slot, st)
        outs[i].append(logits[0])
        last.append(logits[0].argmax())
    tokens = torch.stack(last)
    for _ in range(steps):
        logits, st = model.decode(tokens, pool.rows(slots))  # rows of lengths 3, 8, 5 (+ steps) together
        for i, slot in enumerate(slots):
            pool.copy_rows_(slot, st.rows([i]))
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
    assert state.layers[0]["ssm"].dtype == torch.float32 and state.layers[0]["conv"].dtype == dtype
    for t in range(2, 6):
        logits, state = model.decode(tokens[:, t], state)
        assert (logits - full[:, t]).abs().max() < 2e-2  # forward and step share the fp32 conv and scan


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(layers=[{"mixer": None, "ffn": None}]), "needs a mixer, a feed-forward or both"),
        (dict(layers=[{"mixer": "mamba2"}], mamba2_heads=6, n_groups=4), "n_groups dividing"),
        (
            dict(layers=[{"mixer": "mamba2"}], mamba2_head_dim=8, time_step_limit_min=0.5, time_step_limit_max=0.1),
            "time_step",
        ),
        (dict(layers=[{"mixer": None, "ffn": "moe_sigmoid"}], d_ff=8, n_experts=6, n_expert_groups=4), "divide"),
        (dict(layers=[{"mixer": "mamba", "ffn": "mlp_relu2"}]), "d_ff > 0"),
        (dict(logits_scaling=0.0), "logits_scaling"),
        (dict(n_groups=1.5), "n_groups must be an integer"),
    ],
)
def test_config_refuses_inconsistent_layouts(kw, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{"vocab_size": 11, "d_model": 16, **kw})


def test_config_json_round_trip_of_every_layout():
    for layout in LAYOUTS:
        cfg = tiny(layout).config
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_presets_build():
    for name in ("debug", "aetheris-hybrid"):
        assert HybridLM(preset(name)).config.n_layers >= 2
    paper = preset("moe-mamba-paper")
    assert paper.d_model == 512 and len(paper.moe_layers) == 8 and paper.n_experts == 32 and paper.d_ff == 1536
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("nope")


@pytest.mark.parametrize("layout", ["moe-mamba", "hybrid"])
def test_decode_in_place_equals_fresh_state(layout):
    model = tiny(layout)
    _, prefilled = model.prefill(torch.randint(0, 97, (3, 6)), model.empty_state(3))
    roomy = prefilled.with_capacity(8)  # a pool's rows: room for more tokens than they hold
    state = roomy.narrowed(7)  # shown as the pool shows them to a step: as far as the step reaches
    tokens = torch.randint(0, 97, (3,))
    fresh_logits, fresh = model.decode(tokens, prefilled)
    logits, same = model.decode(tokens, state, out=state)
    assert same is state and torch.equal(logits, fresh_logits)
    assert_states_close(state, fresh, tol=0)
    assert_states_close(roomy, fresh, tol=0)  # written through the view, into the rows themselves
    wide = prefilled.with_capacity(9)  # the whole room shown: attention over 9 positions, 2 of them masked
    wide_logits, _ = model.decode(tokens, wide, out=wide)
    torch.testing.assert_close(wide_logits, fresh_logits, atol=1e-6, rtol=1e-6)
    assert_states_close(wide, fresh, tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_batch1_dt_proj_is_fused_and_equals_linear(dtype):
    """The compiled batch-1 decode step computes dt_proj as a product and sum that inductor fuses (no GEMM call
    left in the generated code); batch 3 keeps the GEMM. Both equal F.linear, the reference."""
    from torch._inductor.utils import run_and_get_code

    mixer = tiny("mamba").cast(dtype).layers[0].mixer
    fn = torch.compile(mixer._dt_proj, dynamic=False)
    for batch, fused in ((1, True), (3, False)):
        dt = torch.randn(batch, mixer.dt_rank).to(dtype)
        got, code = run_and_get_code(fn, dt)
        assert ("extern_kernels.mm(" not in "".join(code)) == fused
        want = F.linear(dt, mixer.dt_proj.weight)
        torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)))


def test_models_in_one_process_keep_their_own_compiled_graphs():
    """Dynamo compiles at most `recompile_limit` (8) graphs per code object and past that runs the function
    eagerly. Six compiled models (two graphs each: batch 1 and dynamic batch) in one process: each one's
    decode step keeps its own graphs, and none falls back to eager (which would raise here)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    # config.patch, not a monkeypatch: undoing a monkeypatch deletes the key from dynamo's config module
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        models = []
        for dtype, packed in [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)] * 2:
            model = tiny("mamba").cast(dtype)
            if packed:
                pack_linears(model)
            model.compile_inference()
            models.append(model)
        for model in models:
            for batch in (1, 3):
                state = model.empty_state(batch, capacity=2)
                model.decode(torch.zeros(batch, dtype=torch.long), state, out=state)
            code = model._runs[0][2]._torchdynamo_orig_callable.__code__
            assert len(_debug_get_cache_entry_list(code)) == 2


@pytest.mark.parametrize("linears", ["plain", "packed", "gemv"])
@pytest.mark.parametrize("layout", ["mamba", "moe-mamba", "jamba", "hybrid", "mamba2-hybrid"])
def test_compiled_inference_equals_eager(layout, linears):
    """The torch.compile'd prefill scan and decode step (runs of whole layers as one graph, fused kernels, state
    stored straight into `out`), on plain, oneDNN-packed or few-row-kernel projections (the serving fast paths;
    with the kernel, MoE layers join the runs through moe_decode), against the plain eager reference, at batch
    1 (specialised graphs) and batch 3 (dynamic batch), a prompt longer than one scan chunk, decode in place
    and not."""
    eager = tiny(layout)
    compiled = tiny(layout)
    compiled.load_state_dict(eager.state_dict())
    if linears == "packed":
        pack_linears(compiled)
    elif linears == "gemv":
        assert use_gemv(compiled)
    compiled.compile_inference()
    runs = [(start, end) for start, end, step in compiled._runs if step is not None]
    assert all(step is None for *_, step in eager._runs)
    if layout == "mamba":  # every layer in one compiled run
        assert runs == [(0, 3)]
    if layout == "moe-mamba":  # with the kernel, MoE layers too; the grouped MoE dispatch stays eager
        assert runs == ([(0, 2)] if linears == "gemv" else [])
    for batch in (1, 3):
        prompt = torch.randint(0, 97, (batch, 21))
        want, state = eager.prefill(prompt, eager.empty_state(batch), all_logits=True)
        got, pool = compiled.prefill(prompt, compiled.empty_state(batch), all_logits=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert_states_close(pool, state)
        pool = pool.with_capacity(32)
        for _ in range(4):
            tokens = torch.randint(0, 97, (batch,))
            want, state = eager.decode(tokens, state)
            fresh_logits, fresh = compiled.decode(tokens, pool)
            got, same = compiled.decode(tokens, pool, out=pool)
            assert same is pool
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(fresh_logits, want, atol=1e-5, rtol=1e-5)
            assert_states_close(pool, state)
            assert_states_close(fresh, state)
