"""The few-row kernels against their references: model/gemv.cpp against F.linear and model/moe_decode.cpp against
the MoE's per-token loop; each instruction-set build this CPU can run, alone, inside torch.compile and in the
model."""

import logging

import pytest
import torch
import torch.nn.functional as F

from model import gemv
from model.checkpoint import save_checkpoint
from model.int4 import INT4, dequantize_int4
from model.moe import MoE, SigmoidMoE, moe_reference
from model.quantized import INT8, dequantize_rows, int8_linear_reference, quantize_rows
from model.weights import as_node
from tests.helpers import LAYOUTS, assert_states_close, tiny


def cpu_has(flag: str) -> bool:
    with open("/proc/cpuinfo") as f:
        return flag in next(line for line in f if line.startswith("flags")).split()


# namespace -> (compiler flags, the bf16 kernel that build must take). The AVX512-BF16 build is this CPU's own;
# the others switch instructions off so that every CPU runs the portable kernel too, AVX-512 and AVX2 forms.
BUILDS = {
    "aetheris_gemv": (gemv.NATIVE, "avx512_bf16" if cpu_has("avx512_bf16") else "portable"),
    "aetheris_gemv_no_bf16": (("-march=native", "-mno-avx512bf16"), "portable"),
    "aetheris_gemv_avx2": (("-march=native", "-mno-avx512f"), "portable"),
}
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


@pytest.fixture(scope="module", params=list(BUILDS))
def build(request):
    flags, kernel = BUILDS[request.param]
    assert gemv.load(flags, request.param), "the kernel must build wherever a C++ compiler is present"
    assert gemv.bf16_kernel(request.param) == kernel
    return request.param


def reference(x, w, b):
    """F.linear in fp32 on the same values, rounded to the inputs' dtype once at the end."""
    return F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_in", [(37, 64), (8, 50), (1, 96), (261, 768)])
def test_kernel_equals_linear(build, dtype, bias, out_in):
    """Every row count the kernel tiles (1-16: tiles of 4, 2 and 1 tokens), past it (at::linear), leading batch
    dimensions; rows that are not a whole block of 4, and in_features that are not a multiple of 32 (the
    portable kernel then serves bf16 on any build)."""
    o, i = out_in
    op = getattr(torch.ops, build).linear
    w = (torch.randn(o, i) / i**0.5).to(dtype)  # outputs of order 1, as nn.Linear's initialisation gives
    b = torch.randn(o).to(dtype) if bias else None
    for shape in [(1, i), (i,), (2, i), (3, i), (5, i), (16, i), (17, i), (2, 3, i)]:
        x = torch.randn(shape).to(dtype)
        got = op(x, w, b)
        assert got.shape == (*shape[:-1], o) and got.dtype == dtype
        torch.testing.assert_close(got, reference(x, w, b), **TOL[dtype])


def _moe(kind: str, d: int, f: int, shared: int) -> MoE:
    if kind == "sigmoid":  # relu² experts, a relu² shared expert
        moe = SigmoidMoE(d, f, 8, 3, shared_d_ff=shared, n_groups=2, topk_groups=2, scaling=1.5)
        moe.router_bias.copy_(torch.randn(8) * 0.3)
        return moe.eval()
    return MoE(d, f, 8, 3, renormalize=True, shared_d_ff=shared).eval()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dims", [(64, 96, 128), (37, 21, 19), (32, 64, 0)])  # D, F, shared F (0: none)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_decode_equals_the_definition(build, kind, dims, dtype):
    """One call for the chosen experts of 1-16 tokens and the shared expert against moe_reference: fp32 to
    rounding; bf16 against the definition in fp32 on the same weights, the kernel rounding once per product as
    gemv does (expert ids repeat across tokens, and most experts go unused at one token)."""
    torch.manual_seed(0)
    moe = _moe(kind, *dims)
    exact = {n: p.clone() for n, p in moe.state_dict().items()}
    moe = moe.to(dtype)
    ref32 = _moe(kind, *dims)
    ref32.load_state_dict({n: p.to(dtype).float() if n != "router_bias" else p for n, p in exact.items()})
    op = getattr(torch.ops, build).moe_decode
    s = moe.shared_mlp
    shared = (
        []
        if s is None
        else [getattr(s, n).weight if hasattr(s, n) else None for n in ("gate_proj", "up_proj", "down_proj")]
    )
    for tokens in (1, 2, 5, 16):
        x = torch.randn(tokens, dims[0])
        r = ref32.route(x.to(dtype).float())
        got = op(x.to(dtype), r.experts, r.weights, [moe.gate_proj, moe.up_proj, moe.down_proj], shared)
        assert got.shape == x.shape and got.dtype == dtype
        want = moe_reference(ref32, x.to(dtype).float())
        torch.testing.assert_close(got.float(), want, **TOL[dtype])


def _dequantized(m) -> torch.Tensor:
    """A quantized Linear or expert stack's weights as the fp32 values they stand for."""
    w, scale = m.operands()
    if w.dtype == torch.int8:
        return dequantize_rows(w, scale)
    return torch.stack(
        [dequantize_int4(p, sc) for p, sc in zip(w.reshape(-1, *w.shape[-2:]), scale.reshape(-1, *scale.shape[-2:]))]
    ).reshape(*w.shape[:-1], -1)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize(
    "quantizer, dims", [(INT8, (64, 96, 128)), (INT8, (37, 21, 19)), (INT4, (64, 128, 64)), (INT4, (128, 64, 0))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_moe_decode_equals_its_dequantized_reference(build, kind, quantizer, dims, dtype):
    """int8 and int4 experts (routed and shared) in one call against moe_reference on the dequantized weights
    in fp32: the kernel widens x, sums in fp32 and rounds once at the end (int4 with bf16 tokens keeps h in
    bf16, the model's own rounding)."""
    torch.manual_seed(0)
    moe = _moe(kind, *dims)
    ref = _moe(kind, *dims)
    ref.load_state_dict(moe.state_dict())
    quantizer.quantize(moe)
    for name in ("gate_proj", "up_proj", "down_proj"):
        if getattr(ref, name) is not None:
            getattr(ref, name).data = _dequantized(getattr(moe, name))
        if ref.shared_mlp is not None and hasattr(ref.shared_mlp, name):
            getattr(ref.shared_mlp, name).weight.data = _dequantized(getattr(moe.shared_mlp, name))
    routed, shared = moe.kernel_operands()
    op = getattr(torch.ops, build).moe_decode
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for tokens in (1, 3, 16):
        x = torch.randn(tokens, dims[0]).to(dtype)
        r = ref.route(x.float())
        got = op(x, r.experts, r.weights, routed, shared)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), moe_reference(ref, x.float()), **tol)


@pytest.mark.parametrize("out_in", [(37, 64), (8, 50), (261, 768)])
def test_int8_kernel_equals_the_reference(build, out_in):
    """Tiles of 4, 2 and 1 tokens, rows not a whole block, in_features not a multiple of 16 (the portable
    loop), fp32 and bf16 tokens."""
    o, i = out_in
    q, scale = quantize_rows(torch.randn(o, i) / i**0.5)
    op = getattr(torch.ops, build).int8_mm
    for m in (1, 2, 3, 5, 16):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(m, i).to(dtype)
            torch.testing.assert_close(
                op(x, q, scale), int8_linear_reference(x.float(), q, scale), **TOL[torch.float32]
            )


def test_kernel_refuses_what_it_cannot_multiply():
    assert gemv.load()
    op = torch.ops.aetheris_gemv.linear
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="one dtype"):
        op(torch.randn(1, 16).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.randn(1, 8), w.t(), None)
    with pytest.raises(RuntimeError, match="features"):
        op(torch.randn(1, 15), w, None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        op(torch.randn(1, 16).half(), w.half(), None)
    moe = _moe("softmax", 16, 8, 0)
    x, experts, weights = torch.randn(2, 16), torch.tensor([[0, 9], [1, 2]]), torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="expert id 9 of 8"):
        torch.ops.aetheris_gemv.moe_decode(x, experts, weights, [moe.gate_proj, moe.up_proj, moe.down_proj], [])
    with pytest.raises(RuntimeError, match="moe_decode: experts"):
        torch.ops.aetheris_gemv.moe_decode(
            x.bfloat16(), experts % 8, weights, [moe.gate_proj, moe.up_proj, moe.down_proj], []
        )
    with pytest.raises(RuntimeError, match="6 weight tensors"):  # int8 experts without their scales
        q = [w.to(torch.int8) for w in (moe.gate_proj, moe.up_proj, moe.down_proj)]
        torch.ops.aetheris_gemv.moe_decode(x, experts % 8, weights, q, [])
    q, scale = INT8.experts(as_node(moe.up_proj.detach()), torch.float32).operands()  # (E, F, D), (E, F)
    with pytest.raises(RuntimeError, match="one fp32 scale per row"):  # bf16 scales would be misread
        torch.ops.aetheris_gemv.moe_decode(x, experts % 8, weights, [None, None, q, scale.bfloat16(), q, scale], [])
    with pytest.raises(ValueError, match="float32 / bfloat16"):
        gemv.GemvLinear(torch.nn.Linear(16, 8).half())
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        gemv.use_gemv(tiny("mamba").cast(torch.float16))


def test_gemv_linear_inside_torch_compile():
    """Inside a compiled graph the op is one extern call, shaped by its fake implementation."""
    linear = torch.nn.Linear(16, 8)
    assert gemv.load()
    fast = gemv.GemvLinear(linear)
    fn = torch.compile(lambda x: F.silu(fast(x * 2)) + 1)
    with torch.inference_mode():  # the kernel has no backward: it serves, it does not train
        for batch in (1, 5):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(fn(x), F.silu(linear(x * 2)) + 1, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_on_the_kernel_equals_plain(layout, dtype):
    """Every called Linear and the MoE experts through the kernel; same weights (shared, not copied: the
    state_dict and the head's tie to the embeddings stay), same logits and states as plain F.linear."""
    ref = tiny(layout).cast(dtype)
    model = tiny(layout).cast(dtype)
    model.load_state_dict(ref.state_dict())
    assert gemv.use_gemv(model) == len(gemv.called_linears(ref))
    assert not gemv.called_linears(model)  # none left on F.linear
    assert (model.lm_head.weight is model.embeddings.weight) == (ref.lm_head.weight is ref.embeddings.weight)
    assert model.state_dict().keys() == ref.state_dict().keys()
    assert all(m.linear is gemv.expert_linear and m.kernel_step for m in model.moe_layers().values())
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    tokens = torch.randint(0, 97, (2, 9))
    want, want_state = ref.prefill(tokens, ref.empty_state(2), all_logits=True)
    got, state = model.prefill(tokens, model.empty_state(2), all_logits=True)
    torch.testing.assert_close(got, want, **tol)
    state = state.with_capacity(16)
    for _ in range(4):
        step = want[:, -1].argmax(-1) if want.dim() == 3 else want.argmax(-1)
        want, want_state = ref.decode(step, want_state)
        got, state = model.decode(step, state, out=state)
        torch.testing.assert_close(got, want, **tol)
    if dtype == torch.float32:
        assert_states_close(state, want_state)


def test_model_on_the_kernel_can_be_saved(tmp_path):
    """The kernel keeps the model's own parameters, so a served model still saves (a packed one cannot)."""
    model = tiny("mamba")
    gemv.use_gemv(model)
    save_checkpoint(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt").exists()


def test_without_a_compiler_the_model_keeps_f_linear(monkeypatch, caplog):
    monkeypatch.setattr(gemv, "_loaded", {})
    monkeypatch.setattr(gemv, "compiler", lambda: None)
    model = tiny("mamba")
    with caplog.at_level(logging.WARNING, logger="model.gemv"):
        assert gemv.use_gemv(model) == 0
    assert "no C++ compiler" in caplog.text
    assert len(gemv.called_linears(model)) == 3 * 3 + 1  # 3 per Mamba mixer and the head: all still nn.Linear


def test_a_build_is_reused():
    """The library is compiled once per source, flags, compiler, torch and CPU, then found in the cache."""
    assert gemv.load()
    first = gemv.build()
    stamp = first.stat().st_mtime_ns
    assert gemv.build() == first and first.stat().st_mtime_ns == stamp
    assert gemv.build(("-march=native", "-mno-avx512f"), "aetheris_gemv_avx2") != first
