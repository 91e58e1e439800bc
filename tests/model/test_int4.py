"""Weight-only int4 (model/int4.py): the packing is what the docstring says, the error stays within half a step
of each group's scale, and the kernel of every instruction-set build equals the plain dequantize-then-matmul
reference, alone, in a model and inside torch.compile."""

from __future__ import annotations

import pytest
import torch

from model import gemv
from model.int4 import GROUP, INT4, dequantize_int4, int4_linear, int4_linear_reference, quantize_int4
from tests.helpers import tiny

# namespace -> (compiler flags, the int4 kernel that build takes): this CPU's own, without AVX512-BF16, then
# AVX2, then plain loops.
BUILDS = {
    "aetheris_gemv": (gemv.NATIVE, None),
    "aetheris_gemv_no_bf16": (("-march=native", "-mno-avx512bf16"), None),
    "aetheris_gemv_avx2": (("-march=native", "-mno-avx512f"), "avx2"),
    "aetheris_gemv_plain": (("-march=native", "-mno-avx512f", "-mno-avx2", "-mno-fma"), "portable"),
}
TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def test_packing_and_error_bound():
    torch.manual_seed(0)
    w = torch.randn(5, 4 * GROUP)
    packed, scale = quantize_int4(w)
    assert packed.shape == (5, 2 * GROUP) and packed.dtype == torch.uint8 and scale.shape == (5, 4)
    groups = w.reshape(5, 4, GROUP)
    torch.testing.assert_close(scale.float(), (groups.abs().amax(-1) / 7).bfloat16().float())
    b = packed.reshape(5, 4, GROUP // 2)  # byte j of a group: weight j low, weight j + G/2 high
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-7, 7) + 8
    assert torch.equal((b & 15).float(), q[..., : GROUP // 2]) and torch.equal((b >> 4).float(), q[..., GROUP // 2 :])
    err = (dequantize_int4(packed, scale) - w).reshape(5, 4, GROUP).abs()
    assert bool((err <= scale.float().unsqueeze(-1) / 2 + 1e-6).all())


@pytest.fixture(scope="module", params=list(BUILDS))
def build(request):
    flags, kernel = BUILDS[request.param]
    assert gemv.load(flags, request.param), "the kernel must build wherever a C++ compiler is present"
    flags_line = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    native = "avx512" if "avx512f" in flags_line else "avx2"
    if native == "avx512" and "avx512_bf16" in flags_line and request.param == "aetheris_gemv":
        native = "avx512_bf16"  # bf16 tokens multiply as they are
    assert getattr(torch.ops, request.param).int4_kernel() == (kernel or native)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_in", [(37, GROUP), (8, 3 * GROUP), (261, 768)])
def test_kernel_equals_the_reference(build, dtype, out_in):
    """Every token tile (1-16 rows: tiles of 4, 2 and 1), rows not a multiple of anything, one group and an
    odd number of groups."""
    o, i = out_in
    torch.manual_seed(o)
    packed, scale = quantize_int4(torch.randn(o, i) / i**0.5)
    op = getattr(torch.ops, build).int4_mm
    for m in (1, 2, 3, 4, 5, 7, 16):
        x = torch.randn(m, i).to(dtype)
        got = op(x, packed, scale, GROUP).to(dtype)
        torch.testing.assert_close(got, int4_linear_reference(x, packed, scale), **TOL[dtype])


def test_more_rows_go_through_the_dequantized_weight():
    torch.manual_seed(1)
    packed, scale = quantize_int4(torch.randn(40, GROUP))
    bias = torch.randn(40)
    for rows in (3, 17, 64):
        x = torch.randn(2, rows, GROUP)
        torch.testing.assert_close(
            int4_linear(x, packed, scale, bias), int4_linear_reference(x, packed, scale, bias), **TOL[torch.float32]
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_int4_model_decodes_as_its_reference_and_compiles(dtype):
    """A Mamba-2 + attention + MoE model in int4 (experts included): decode through the kernel equals the same
    model through the reference product, eager and compiled."""
    assert gemv.load()
    torch.manual_seed(0)
    model = tiny("mamba2-hybrid", d_model=GROUP, d_ff=GROUP).to(dtype)  # shared_d_ff 24: that Linear stays as it is
    INT4.quantize(model)
    tokens = torch.tensor([[3, 9, 27, 81, 17, 51]])
    with torch.no_grad():
        logits, state = model.prefill(tokens, model.empty_state(1).with_capacity(16))
        step, _ = model.decode(torch.tensor([5]), state.clone())
        reference = _with_reference(model, lambda: model.decode(torch.tensor([5]), state.clone())[0])
        torch.testing.assert_close(step, reference, **TOL[dtype])
        compiled = torch.compile(lambda s: model.decode(torch.tensor([5]), s)[0])
        torch.testing.assert_close(compiled(state.clone()), step, **TOL[dtype])


def _with_reference(model, fn):
    import model.int4 as int4

    kernel = int4.int4_linear
    int4.int4_linear = int4_linear_reference
    try:
        return fn()
    finally:
        int4.int4_linear = kernel


def test_a_large_weight_is_quantized_in_row_blocks_to_the_same_result():
    from model.int4 import ROWS, _quantize_rows

    w = torch.randn(ROWS + 37, GROUP)
    for got, want in zip(quantize_int4(w), _quantize_rows(w, GROUP)):
        assert torch.equal(got, want)


def test_the_one_pass_dequantization_equals_the_reference(build):
    packed, scale = quantize_int4(torch.randn(70, 3 * GROUP))
    for dtype in (torch.float32, torch.bfloat16):
        got = getattr(torch.ops, build).int4_dequant(packed, scale, GROUP, dtype)
        assert got.dtype == dtype and torch.equal(got, dequantize_int4(packed, scale, dtype))
