"""Weight-only int8 (model/quantized.py): the int8 kernel (gemv.cpp) against the dequantized reference, alone and in
every model layout, and the quantization error it buys."""

import pytest
import torch

from model import gemv
from model.checkpoint import save_checkpoint
from model.quantized import (
    Int8Experts,
    Int8Linear,
    dequantize_rows,
    int8_linear_reference,
    quantize_int8,
    quantize_rows,
)
from tests.helpers import LAYOUTS, tiny

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def test_rows_round_to_within_half_a_step():
    w = torch.randn(6, 33) * torch.logspace(-3, 1, 6).unsqueeze(-1)  # rows of very different ranges
    w[2] = 0  # an all-zero row keeps a finite scale
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and torch.isfinite(scale).all()
    assert (q.abs().amax(-1)[scale > 1e-11] == 127).all()  # each non-zero row uses the whole range
    err = (q.float() * scale.unsqueeze(-1) - w).abs()
    assert (err <= scale.unsqueeze(-1) / 2 + 1e-7).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features", [80, 72])  # 72: not a multiple of 16, the portable loop
def test_int8_linear_equals_reference(dtype, bias, in_features):
    linear = torch.nn.Linear(in_features, 40, bias=bias).to(dtype)
    layer = Int8Linear.quantize(linear.weight, linear.bias)
    for shape in [(in_features,), (1, in_features), (5, in_features), (2, 3, in_features), (80, in_features)]:
        x = torch.randn(shape, dtype=dtype)
        got = layer(x)  # up to 16 rows: the int8 kernel; 80 rows: dequantize + GEMM
        assert got.shape == (*shape[:-1], 40) and got.dtype == dtype
        torch.testing.assert_close(got, int8_linear_reference(x, layer.qweight, layer.scale, layer.bias), **TOL[dtype])
        # and it approximates the original weights to int8's precision
        torch.testing.assert_close(got.float(), linear(x).float(), atol=0.05, rtol=0.05)


def test_inside_torch_compile():
    lin = torch.nn.Linear(32, 16)
    layer = Int8Linear.quantize(lin.weight, lin.bias)
    fn = torch.compile(lambda x: torch.nn.functional.silu(layer(x * 2)) + 1)
    for batch in (1, 5, 70):
        x = torch.randn(batch, 32)
        want = torch.nn.functional.silu(int8_linear_reference(x * 2, layer.qweight, layer.scale, layer.bias)) + 1
        torch.testing.assert_close(fn(x), want, **TOL[torch.float32])


def copies(layout, dtype, n):
    first = tiny(layout).cast(dtype)
    rest = [tiny(layout).cast(dtype) for _ in range(n - 1)]
    for m in rest:
        m.load_state_dict(first.state_dict())
    return [first, *rest]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_quantized_model_equals_its_reference(layout, dtype, monkeypatch):
    """The quantized model against itself with every int8 product computed by the reference, prefill and decode
    (2 rows: the kernel); and not far from the unquantized model."""
    original, model = copies(layout, dtype, 2)
    n = quantize_int8(model)
    assert n == sum(isinstance(m, Int8Linear) for m in model.modules()) > 0 and isinstance(model.lm_head, Int8Linear)
    assert all(isinstance(m.up_proj, Int8Experts) for m in model.moe_layers().values())
    assert torch.equal(model.embeddings.weight, original.embeddings.weight)  # a tied head is quantized as a copy

    def run(m, tokens, steps=3):
        logits, state = m.prefill(tokens, m.empty_state(2), all_logits=True)
        out, state = [logits], state.with_capacity(tokens.shape[1] + steps)
        for _ in range(steps):
            logits, state = m.decode(out[-1][:, -1].argmax(-1) if out[-1].dim() == 3 else out[-1].argmax(-1), state)
            out.append(logits)
        return out

    # fp32: 2 x 40 prompt rows take the dequantized GEMM; bf16 keeps to 2 x 9 (kernel): over longer prompts its
    # rounding flips top-1 MoE routing somewhere, which the unit test above does not need to survive
    tokens = torch.randint(0, 97, (2, 40 if dtype == torch.float32 else 9))
    got = run(model, tokens)
    with monkeypatch.context() as mp:
        mp.setattr("model.quantized.int8_linear", int8_linear_reference)
        want = run(model, tokens)
    tol = TOL[dtype] if dtype == torch.float32 else dict(atol=6e-2, rtol=5e-2)  # bf16 sums in another order
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)
    full = original.prefill(tokens, original.empty_state(2), all_logits=True)[0].float()
    # int8 moves the logits a little (an MoE token whose expert choice flips may move more)
    assert (got[0].float() - full).abs().mean() < 0.15 * full.abs().mean()  # a wrong scale: ~1x


def test_quantized_model_refuses_to_be_saved(tmp_path):
    model = tiny("mamba")
    quantize_int8(model)
    with pytest.raises(ValueError, match="quantized"):
        save_checkpoint(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_large_weight_is_quantized_in_row_blocks_to_the_same_result():
    """Past 4096 rows the weight goes in blocks; every row still gets its own scale, as the definition says."""
    w = torch.randn(4096 + 37, 16)
    q, scale = quantize_rows(w)
    want_scale = w.abs().amax(dim=-1) / 127
    torch.testing.assert_close(scale, want_scale)
    assert torch.equal(q, torch.round(w / want_scale[:, None]).clamp(-127, 127).to(torch.int8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_pass_dequantization_equals_the_definition(dtype):
    """gemv.cpp's int8_dequant (what prefill's GEMM reads) gives q * scale rounded once, for a weight and an
    expert stack."""
    assert gemv.load()
    for shape in [(37, 72), (3, 16, 40)]:
        q, scale = quantize_rows(torch.randn(shape))
        got = torch.ops.aetheris_gemv.int8_dequant(q, scale, dtype)
        assert got.dtype == dtype and torch.equal(got, dequantize_rows(q, scale, dtype))
