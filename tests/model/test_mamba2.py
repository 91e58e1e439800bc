"""The Mamba-2 mixer: chunked SSD == the sequential recurrence; decode, chunked prefill and one-shot forward
agree; HF's Mamba-2 family mixers load by name and give the same outputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import HybridLM, LayerSpec, ModelConfig
from model.mamba2 import Mamba2Mixer, RMSNormGated, ssd_chunked, ssd_reference
from model.state import StateSpec

TOL = dict(atol=1e-5, rtol=1e-5)
HF_TOL = dict(atol=1e-4, rtol=1e-4)
# Odd sizes throughout: H = 6 heads in G = 3 groups (2 heads each), P = 5, N = 7, D = 15, K = 4.
SIZES = dict(d_model=15, n_heads=6, head_dim=5, d_state=7, n_groups=3)


def _ssd_inputs(B=2, L=21, H=6, P=5, G=3, N=7):
    x = torch.randn(B, L, H, P)
    dt = F.softplus(torch.randn(B, L, H))
    A = -torch.rand(H) * 3
    return x, dt, A, torch.randn(B, L, G, N), torch.randn(B, L, G, N), torch.randn(H), torch.randn(B, H, P, N)


def _mixer(**kw) -> Mamba2Mixer:
    """A mixer with every parameter random (dt_bias, A_log, D, the norm weight, biases too), in eval mode."""
    m = Mamba2Mixer(**{**SIZES, "chunk_size": 8, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return m.eval()


def _random_state(m: Mamba2Mixer, batch: int) -> dict:
    """Random, and strided: every other row of a larger cache, as a batched server's slice would be."""
    return {k: torch.randn(2 * batch, *v.shape[1:], dtype=v.dtype)[::2] for k, v in m.empty_state(batch).items()}


# --- the SSD scan on its own -------------------------------------------------------------------------------


def test_reference_matches_definition():
    """ssd_reference is the recurrence h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t."""
    x, dt, A, Bm, Cm, D, h = _ssd_inputs(B=1, L=3, H=4, P=2, G=2, N=3)
    y, h_last = ssd_reference(x, dt, A, Bm, Cm, D, h)
    for t in range(3):
        for hd in range(4):
            g = hd // 2  # two heads per group
            h[:, hd] = torch.exp(dt[:, t, hd] * A[hd]) * h[:, hd] + dt[:, t, hd] * torch.outer(x[0, t, hd], Bm[0, t, g])
            y_t = h[0, hd] @ Cm[0, t, g] + D[hd] * x[0, t, hd]
            torch.testing.assert_close(y[0, t, hd], y_t, **TOL)
    torch.testing.assert_close(h_last, h, **TOL)


@pytest.mark.parametrize(
    "L, chunk, G",
    [(21, 8, 3), (24, 8, 3), (21, 8, 1), (21, 8, 6), (5, 8, 3), (1, 8, 3), (21, 1, 3), (40, 13, 2)],
)
def test_chunked_equals_reference(L, chunk, G):
    """Across chunk boundaries, L a multiple of the chunk and not, L shorter than a chunk, one-step chunks,
    one group, a group per head; from a random initial state, which the call leaves untouched."""
    args = _ssd_inputs(L=L, G=G)
    before = [a.clone() for a in args]
    y_ref, h_ref = ssd_reference(*args)
    y, h = ssd_chunked(*args, chunk_size=chunk)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    assert all(torch.equal(a, b) for a, b in zip(args, before))


def test_a_cpu_forward_scans_in_chunks_of_at_most_64_to_the_same_result():
    """A checkpoint's chunk of 256 becomes 64 on the CPU (faster there); the output is the one a chunk of 256
    gives, to rounding."""
    from model.mamba2 import CPU_CHUNK

    m = _mixer(chunk_size=256)
    u = torch.randn(1, 150, SIZES["d_model"])
    assert m.chunk_length(u) == CPU_CHUNK == 64 and _mixer(chunk_size=8).chunk_length(u) == 8
    with torch.no_grad():
        got, got_state = m(u)
        m.chunk_length = lambda u: 256  # the checkpoint's chunk, as on a GPU
        want, want_state = m(u)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(got_state["ssm"], want_state["ssm"], **TOL)


def test_chunked_gradients_equal_reference():
    """The chunked form is what training differentiates: its gradients are the reference's."""
    args = _ssd_inputs(L=19)
    grads = []
    for fn in (ssd_reference, lambda *a: ssd_chunked(*a, chunk_size=8)):
        leaves = [a.clone().requires_grad_(True) for a in args]
        y, h = fn(*leaves)
        (y.square().sum() + h.sum()).backward()
        grads.append([leaf.grad for leaf in leaves])
    for g_chunked, g_ref in zip(grads[1], grads[0]):
        assert torch.isfinite(g_chunked).all()
        torch.testing.assert_close(g_chunked, g_ref, atol=1e-4, rtol=1e-4)


def test_chunked_keeps_small_decays_over_a_long_chunk():
    """Strong decay over a 256-step chunk: a cumsum difference would lose the few terms that survive."""
    x, dt, A, Bm, Cm, D, h0 = _ssd_inputs(B=1, L=300, H=2, P=3, G=1, N=4)
    A = torch.tensor([-8.0, -0.5])
    y_ref, h_ref = ssd_reference(x, dt, A, Bm, Cm, D, h0)
    y, h = ssd_chunked(x, dt, A, Bm, Cm, D, h0, chunk_size=256)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)


# --- the mixer ---------------------------------------------------------------------------------------------


def test_parameter_names_shapes_and_state_spec():
    m = Mamba2Mixer(**SIZES, d_conv=4)
    H, P, N, G, D, K = 6, 5, 7, 3, 15, 4
    Di, conv_dim = H * P, H * P + 2 * G * N
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * Di + 2 * G * N + H, D),
        "conv1d.weight": (conv_dim, 1, K),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (H,),
        "A_log": (H,),
        "D": (H,),
        "norm.weight": (Di,),
        "out_proj.weight": (D, Di),
    }
    assert m.state_spec() == {"conv": StateSpec((conv_dim, K)), "ssm": StateSpec((H, P, N), torch.float32)}
    state = m.to(torch.bfloat16).empty_state(3)
    assert state["conv"].shape == (3, conv_dim, K) and state["conv"].dtype == torch.bfloat16
    assert state["ssm"].shape == (3, H, P, N) and state["ssm"].dtype == torch.float32
    assert not any(t.any() for t in state.values())


def test_from_config_and_fp32_params_through_a_model_cast():
    """A `mamba2` layer takes its sizes from ModelConfig; HybridLM.cast keeps A_log, D and dt_bias fp32 and
    unrounded while the projections go bf16."""
    cfg = ModelConfig(
        vocab_size=11, d_model=15, layers=[LayerSpec("mamba2")], mamba2_heads=6, mamba2_head_dim=5, d_state=7,
        n_groups=3, chunk_size=8, time_step_limit_min=0.1, norm_before_gate=True,
    )  # fmt: skip
    model = HybridLM(cfg)
    m = model.layers[0].mixer
    assert (m.n_heads, m.head_dim, m.d_state, m.n_groups, m.chunk_size) == (6, 5, 7, 3, 8)
    assert m.time_step_limit == (0.1, math.inf) and m.norm.norm_before_gate
    with torch.no_grad():
        m.A_log.add_(1e-4)  # not representable in bf16
    before = {n: getattr(m, n).detach().clone() for n in Mamba2Mixer.FP32_PARAMS}
    model.cast(torch.bfloat16)
    assert all(torch.equal(getattr(m, n), before[n]) for n in Mamba2Mixer.FP32_PARAMS)
    assert m.in_proj.weight.dtype == torch.bfloat16
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def _decode(m: Mamba2Mixer, u: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
    """Step through u on a copy of `state`, in place, as the model's decode does."""
    state = {k: v.clone() for k, v in state.items()}
    outs = [m.step(u[:, t], state) for t in range(u.shape[1])]
    return torch.stack(outs, 1), state


@pytest.mark.parametrize("kw", [{}, {"norm_before_gate": True, "time_step_limit": (0.1, 0.8), "proj_bias": True}])
def test_step_decode_equals_forward(kw):
    """Token-by-token decode from an empty state == one forward over the sequence: outputs and final state."""
    m = _mixer(**kw)
    u = torch.randn(2, 21, 15)
    with torch.no_grad():
        out, state = m(u)
        out_dec, state_dec = _decode(m, u, m.empty_state(2))
    torch.testing.assert_close(out_dec, out, **TOL)
    torch.testing.assert_close(state_dec["ssm"], state["ssm"], **TOL)
    torch.testing.assert_close(state_dec["conv"], state["conv"], **TOL)


def test_forward_without_state_is_forward_from_zeros():
    m = _mixer()
    u = torch.randn(2, 11, 15)
    with torch.no_grad():
        a, sa = m(u)
        b, sb = m(u, m.empty_state(2))
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("split", [1, 3, 8, 13])
def test_two_chunk_prefill_equals_one_shot(split):
    """Prefill in two pieces, the second continuing the first's state (conv window and SSM state), from a
    random cached state == one forward over the concatenation, and == stepping through it; inputs untouched."""
    m = _mixer()
    u = torch.randn(2, 21, 15)
    state0 = _random_state(m, 2)
    saved = {k: v.clone() for k, v in state0.items()}
    with torch.no_grad():
        out, state = m(u, state0)
        out1, state1 = m(u[:, :split], state0)
        out2, state2 = m(u[:, split:], state1)
        out_dec, state_dec = _decode(m, u, state0)
    torch.testing.assert_close(torch.cat([out1, out2], 1), out, **TOL)
    torch.testing.assert_close(out_dec, out, **TOL)
    for k in state:
        torch.testing.assert_close(state2[k], state[k], **TOL)
        torch.testing.assert_close(state_dec[k], state[k], **TOL)
        assert torch.equal(state0[k], saved[k])


def test_time_step_limit_clamps_dt():
    """dt = softplus(dt + dt_bias) is clamped to time_step_limit, in forward and step alike."""
    lo, hi = 0.3, 0.9
    m = _mixer(time_step_limit=(lo, hi))
    u = torch.randn(2, 9, 15)
    with torch.no_grad():
        raw = F.softplus(m._split(m.in_proj(u))[2] + m.dt_bias)
        assert (raw < lo).any() and (raw > hi).any()  # both ends bind on these inputs
        out, _ = m(u)
        out_dec, _ = _decode(m, u, m.empty_state(2))
        m.time_step_limit = (0.0, math.inf)
        out_free, _ = m(u)
    torch.testing.assert_close(out_dec, out, **TOL)
    assert not torch.allclose(out, out_free, atol=1e-3)


def test_gated_norm_groups():
    """Each group of `group_size` channels is normalised on its own; one group is a plain gated RMSNorm."""
    x, z = torch.randn(3, 12), torch.randn(3, 12)
    whole, grouped = RMSNormGated(12, 12), RMSNormGated(12, 4)
    g = x * F.silu(z)
    torch.testing.assert_close(whole(x, z), g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5), **TOL)
    expect = torch.cat([p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + 1e-5) for p in g.split(4, -1)], -1)
    torch.testing.assert_close(grouped(x, z), expect, **TOL)
    assert Mamba2Mixer(**SIZES).norm.group_size == 10  # Di / G by default
    assert Mamba2Mixer(**SIZES, rmsnorm_group_size=30).norm.group_size == 30


def test_bf16_step_matches_forward():
    """In bf16 weights the SSM and state stay fp32 and the conv accumulates in fp32, so decode follows
    prefill to bf16 rounding."""
    m = _mixer()
    keep = {n: getattr(m, n).data for n in Mamba2Mixer.FP32_PARAMS}
    m.to(torch.bfloat16)
    for n, data in keep.items():  # as HybridLM.cast does
        getattr(m, n).data = data
    u = torch.randn(2, 21, 15, dtype=torch.bfloat16)
    with torch.no_grad():
        out, state = m(u)
        out_dec, state_dec = _decode(m, u, m.empty_state(2))
    assert out.dtype == torch.bfloat16 and state["ssm"].dtype == torch.float32
    torch.testing.assert_close(out_dec.float(), out.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(state_dec["ssm"], state["ssm"], atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(state_dec["conv"], state["conv"], atol=0, rtol=0)


# --- parity with transformers' Mamba-2 family (their PyTorch paths; no CUDA kernels on this machine) ------

# Each builder returns (HF mixer, our constructor kwargs) for the same odd sizes: D 15, H 6 in G 3, P 5, N 7.


def _hf_mamba2():
    from transformers.models.mamba2.configuration_mamba2 import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HF

    cfg = Mamba2Config(
        hidden_size=15, expand=2, num_heads=6, head_dim=5, state_size=7, n_groups=3, chunk_size=8,
        num_hidden_layers=1, layer_norm_epsilon=1e-5, use_bias=True, time_step_limit=(0.0, float("inf")),
    )  # fmt: skip
    return HF(cfg, 0), dict(proj_bias=True)


def _hf_bamba(module="bamba"):
    """Bamba's mixer; GraniteMoeHybrid's is a copy of it (module="granitemoehybrid"). A finite dt limit."""
    if module == "bamba":
        from transformers.models.bamba.configuration_bamba import BambaConfig as Config
        from transformers.models.bamba.modeling_bamba import BambaMixer as HF
    else:
        from transformers.models.granitemoehybrid.configuration_granitemoehybrid import (
            GraniteMoeHybridConfig as Config,
        )
        from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer as HF
    cfg = Config(
        hidden_size=15, mamba_expand=2, mamba_n_heads=6, mamba_d_head=5, mamba_d_state=7, mamba_n_groups=3,
        mamba_chunk_size=8, num_hidden_layers=1, rms_norm_eps=1e-5, num_attention_heads=1, num_key_value_heads=1,
        time_step_limit=(0.3, 0.9), mamba_proj_bias=module == "bamba",
    )  # fmt: skip
    return HF(cfg, 0), dict(proj_bias=module == "bamba", time_step_limit=(0.3, 0.9))


def _hf_nemotron_h():
    """NemotronH clamps dt from below only, at time_step_min."""
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer as HF

    cfg = NemotronHConfig(
        hidden_size=15, mamba_num_heads=6, mamba_head_dim=5, ssm_state_size=7, n_groups=3, chunk_size=8,
        layers_block_type=["mamba"], layer_norm_epsilon=1e-5, time_step_min=0.3, num_attention_heads=1,
        num_key_value_heads=1,
    )  # fmt: skip
    return HF(cfg, 0), dict(time_step_limit=(0.3, math.inf))


def _hf_falcon_h1():
    """Falcon-H1 with its gated norm on and norm_before_gate=True; its muP multipliers left at 1."""
    from transformers.models.falcon_h1.configuration_falcon_h1 import FalconH1Config
    from transformers.models.falcon_h1.modeling_falcon_h1 import FalconH1Mixer as HF
    from transformers.models.falcon_h1.modeling_falcon_h1 import compute_mup_vector

    cfg = FalconH1Config(
        hidden_size=15, mamba_expand=2, mamba_n_heads=6, mamba_d_head=5, mamba_d_state=7, mamba_n_groups=3,
        mamba_chunk_size=8, num_hidden_layers=1, rms_norm_eps=1e-5, num_attention_heads=1, num_key_value_heads=1,
        mamba_d_ssm=30, mamba_rms_norm=True, mamba_norm_before_gate=True, time_step_limit=(0.0, float("inf")),
    )  # fmt: skip
    hf = HF(cfg, 0)
    mup = compute_mup_vector(cfg)
    assert torch.equal(mup, torch.ones_like(mup))  # so its in_proj output is the plain one
    hf.register_buffer("mup_vector", mup, persistent=False)  # FalconH1Model registers it on each layer
    return hf, dict(norm_before_gate=True)


HF_BUILDERS = {
    "mamba2": _hf_mamba2,
    "bamba": _hf_bamba,
    "granitemoehybrid": lambda: _hf_bamba("granitemoehybrid"),
    "nemotron_h": _hf_nemotron_h,
    "falcon_h1": _hf_falcon_h1,
}


@pytest.mark.parametrize("family", list(HF_BUILDERS))
def test_hf_parity(family):
    """HF's weights load into ours by name (strict); outputs agree on a sequence spanning 3 chunks (21 > 8).
    The dt limits bind at the ends the family has, so the clamp is exercised where it exists."""
    pytest.importorskip("transformers", reason="transformers is the reference implementation")
    hf, kw = HF_BUILDERS[family]()
    hf.eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    ours = Mamba2Mixer(**SIZES, chunk_size=8, norm_eps=1e-5, **kw).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    u = torch.randn(2, 21, 15)
    with torch.no_grad():
        expected = hf(u)  # no cache: HF's chunked torch path from a zero state
        out, _ = ours(u)
        lo, hi = ours.time_step_limit
        raw = F.softplus(ours._split(ours.in_proj(u))[2] + ours.dt_bias)
    assert (lo == 0 or (raw < lo).any()) and (hi == math.inf or (raw > hi).any())
    torch.testing.assert_close(out, expected, **HF_TOL)


def test_ssd_matches_hf_chunk_scan_from_an_initial_state():
    """HF's chunked scan function, given an initial state and asked for the final one, agrees with ours:
    the state layout (B, H, P, N) and its continuation are HF's."""
    pytest.importorskip("transformers", reason="transformers is the reference implementation")
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    x, _, A, Bm, Cm, D, h0 = _ssd_inputs(L=21)
    dt_raw, dt_bias = torch.randn(2, 21, 6), torch.randn(6)
    y_hf, h_hf = mamba2_chunk_scan(
        x, dt_raw, A, Bm, Cm, chunk_size=8, D=D, dt_bias=dt_bias, initial_states=h0, dt_softplus=True,
        dt_limit=(0.2, 1.5), return_final_states=True,
    )  # fmt: skip
    dt = F.softplus(dt_raw + dt_bias).clamp(0.2, 1.5)
    y, h = ssd_chunked(x, dt, A, Bm, Cm, D, h0, chunk_size=8)
    torch.testing.assert_close(y, y_hf, **HF_TOL)
    torch.testing.assert_close(h, h_hf, **HF_TOL)


def test_autocast_bf16_step_matches_forward():
    """Under CPU autocast (fp32 weights, bf16 matmuls) the SSM and its state stay fp32 in both paths."""
    m = _mixer()
    u = torch.randn(2, 21, 15)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = m(u)
        out_dec, state_dec = _decode(m, u, m.empty_state(2))
    assert state["ssm"].dtype == state_dec["ssm"].dtype == torch.float32
    torch.testing.assert_close(out_dec.float(), out.float(), atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(state_dec["ssm"], state["ssm"], atol=3e-2, rtol=2e-2)
