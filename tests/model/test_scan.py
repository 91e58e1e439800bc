"""The fused inference scan equals the textbook reference, and both equal a hand-unrolled recurrence."""

import pytest
import torch

from model.scan import CHUNK, scan_chunk, selective_scan_chunked, selective_scan_fused, selective_scan_ref


def _inputs(B=2, L=9, Di=6, N=4):
    x = torch.randn(B, L, Di)
    delta = torch.nn.functional.softplus(torch.randn(B, L, Di))
    A = -torch.rand(Di, N) * 3
    return x, delta, A, torch.randn(B, L, N), torch.randn(B, L, N), torch.randn(Di), torch.randn(B, Di, N)


def test_fused_equals_reference():
    args = _inputs()
    y_ref, h_ref = selective_scan_ref(*args)
    y, h = selective_scan_fused(*args)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(h, h_ref, atol=1e-6)


@pytest.mark.parametrize("compiled", [False, True])
def test_chunked_equals_reference(compiled):
    """Lengths below, at and across chunk boundaries (the tail padded with no-op steps), batch 1 and 3."""
    chunk_fn = torch.compile(scan_chunk) if compiled else scan_chunk
    for B, L in [(1, 5), (3, CHUNK), (3, 2 * CHUNK + 7), (1, 1)]:
        args = _inputs(B=B, L=L)
        h0 = args[-1].clone()
        y_ref, h_ref = selective_scan_ref(*args)
        y, h = selective_scan_chunked(*args, chunk_fn=chunk_fn)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(args[-1], h0)  # the caller's state is not written


def test_reference_matches_definition():
    x, delta, A, Bm, Cm, D, h = _inputs(B=1, L=3, Di=2, N=2)
    y, h_last = selective_scan_ref(x, delta, A, Bm, Cm, D, h)
    for t in range(3):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * x[:, t, :, None]
        y_t = (h * Cm[:, t, None, :]).sum(-1) + D * x[:, t]
        assert torch.allclose(y[:, t], y_t, atol=1e-6)
    assert torch.allclose(h_last, h, atol=1e-6)


def test_reference_backward_matches_the_recurrence_and_forward_matches_fused():
    """Gradients through the reference scan equal those through the hand-unrolled recurrence, and its
    forward under autograd equals the fused (inference) scan."""
    x, delta, A, Bm, Cm, D, h0 = _inputs(B=1, L=4, Di=3, N=2)
    x_ref, x_def = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, _ = selective_scan_ref(x_ref, delta, A, Bm, Cm, D, h0)
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * x_def[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + D * x_def[:, t])
    weights = torch.randn_like(y_ref)  # a loss that weighs every output differently
    (y_ref * weights).sum().backward()
    (torch.stack(ys, 1) * weights).sum().backward()
    torch.testing.assert_close(x_ref.grad, x_def.grad, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        y_fused, _ = selective_scan_fused(x, delta, A, Bm, Cm, D, h0)
    torch.testing.assert_close(y_ref.detach(), y_fused, atol=1e-6, rtol=1e-6)
