"""oneDNN-packed Linear layers (model/packed.py) against nn.Linear, their reference, alone and in the model."""

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.packed import (
    NO_BF16_ENV,
    PackedExperts,
    PackedLinear,
    can_pack,
    pack_if_supported,
    pack_linears,
    packable_dtype,
    packing_pays_here,
)
from tests.helpers import LAYOUTS, assert_states_close, tiny

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
CPU_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()  # AVX512-BF16 / AMX or AVX-NE-CONVERT: not on every CPU


@pytest.fixture(params=["this CPU", "forced fallback"])
def capability(request, monkeypatch):
    """Each test runs with this CPU's own answer and again with bf16 packing switched off, so both branches run
    on every machine (the fallback is what a CPU without bf16 instructions takes)."""
    if request.param == "forced fallback":
        monkeypatch.setenv(NO_BF16_ENV, "1")
    else:
        monkeypatch.delenv(NO_BF16_ENV, raising=False)
    return request.param


def test_bf16_capability_follows_the_cpu_and_the_switch(capability):
    assert packable_dtype(torch.float32)
    assert packable_dtype(torch.bfloat16) == (CPU_BF16 and capability == "this CPU")
    assert not packable_dtype(torch.float16)


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
def test_packing_default_follows_dtype_and_vendor(vendor, monkeypatch, capability):
    """bf16 packs wherever oneDNN can pack it; fp32 everywhere but on Intel, where MKL's fp32 GEMV is faster at
    batch 1."""
    import io

    import model.packed as packed

    cpuinfo = f"processor\t: 0\nvendor_id\t: {vendor}\nmodel name\t: x\n"
    monkeypatch.setattr(packed, "open", lambda *a, **k: io.StringIO(cpuinfo), raising=False)
    assert packing_pays_here(torch.bfloat16) == packable_dtype(torch.bfloat16)
    assert packing_pays_here(torch.float32) == (vendor != "GenuineIntel")
    assert packing_pays_here() == packing_pays_here(torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(dtype, bias, capability):
    linear = torch.nn.Linear(40, 24, bias=bias).to(dtype)
    if not packable_dtype(dtype):  # the fallback: a clear refusal, never oneDNN's crash
        with pytest.raises(ValueError, match="cannot pack"):
            PackedLinear(linear)
        return
    packed = PackedLinear(linear)
    for shape in [(40,), (1, 40), (7, 40), (2, 3, 40)]:
        x = torch.randn(shape, dtype=dtype)
        got = packed(x)
        assert got.shape == (*shape[:-1], 24) and got.dtype == dtype
        torch.testing.assert_close(got, linear(x), **TOL[dtype])


def test_bf16_model_serves_on_either_path(capability):
    """What the server does at load: pack where the CPU can, keep nn.Linear where it cannot; same logits."""
    ref = tiny("moe-mamba").cast(torch.bfloat16)
    model = tiny("moe-mamba").cast(torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    packed = pack_if_supported(model)
    assert (packed > 0) == (CPU_BF16 and capability == "this CPU")
    tokens = torch.randint(0, 97, (2, 7))
    want, _ = ref.prefill(tokens, ref.empty_state(2))
    got, _ = model.prefill(tokens, model.empty_state(2))
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_packed_linear_inside_torch_compile():
    """The custom op keeps the packed call whole inside a compiled graph (inductor cannot lower mkldnn's op)."""
    linear = torch.nn.Linear(16, 8)
    packed = PackedLinear(linear)
    fn = torch.compile(lambda x: torch.nn.functional.silu(packed(x * 2)) + 1)
    for batch in (1, 5):
        x = torch.randn(batch, 16)
        torch.testing.assert_close(fn(x), torch.nn.functional.silu(linear(x * 2)) + 1, **TOL[torch.float32])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_model_equals_unpacked(layout):
    ref = tiny(layout)
    model = tiny(layout)
    model.load_state_dict(ref.state_dict())
    n = pack_linears(model)
    # in_proj, x_proj, out_proj per Mamba mixer (dt_proj stays), in_proj, out_proj per Mamba-2 mixer, q/k/v/o per
    # attention, 3 per SwiGLU and 2 per relu² MLP (dense or an MoE's shared expert), lm_head; routers stay
    cfg = model.config
    per_mixer = {"mamba": 3, "mamba2": 2, "attention": 4, None: 0}
    shared = cfg.shared_d_ff > 0
    per_ffn = {"mlp": 3, "mlp_relu2": 2, "moe": 3 * shared, "moe_sigmoid": 2 * shared, None: 0}
    assert n == sum(per_mixer[s.mixer] + per_ffn[s.ffn] for s in cfg.layers) + 1
    if cfg.layers[0].mixer == "mamba":
        assert isinstance(model.layers[0].mixer.dt_proj, torch.nn.Linear)
    assert torch.equal(model.embeddings.weight, ref.embeddings.weight)  # a tied head is packed as a copy
    assert all(isinstance(m.up_proj, PackedExperts) for m in model.moe_layers().values())  # experts too
    tokens = torch.randint(0, 97, (2, 9))
    want, want_state = ref.prefill(tokens, ref.empty_state(2), all_logits=True)
    got, state = model.prefill(tokens, model.empty_state(2), all_logits=True)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    state = state.with_capacity(16)  # decoding in place, as the engine's pool does, needs room for K/V
    for _ in range(4):
        step = want[:, -1].argmax(-1) if want.dim() == 3 else want.argmax(-1)
        want, want_state = ref.decode(step, want_state)
        got, state = model.decode(step, state, out=state)
        torch.testing.assert_close(got, want, **TOL[torch.float32])
        assert_states_close(state, want_state)


def test_packed_model_refuses_to_be_saved(tmp_path):
    model = tiny("mamba")
    pack_linears(model)
    with pytest.raises(ValueError, match="packed for inference"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_packing_refuses_what_onednn_cannot_pack():
    model = tiny("mamba").cast(torch.float16)
    assert not can_pack(model)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        pack_linears(model)
