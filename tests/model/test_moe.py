"""MoE: grouped dispatch == per-token loop; losses at known values; capacity drops; statistics."""

import math

import pytest
import torch

from model.moe import (
    MoE,
    SigmoidMoE,
    load_balancing_loss,
    moe_reference,
    route,
    router_z_loss,
    sigmoid_route_reference,
    use_static_dispatch,
)
from model.packed import packed_linear
from tests.helpers import tiny


@pytest.mark.parametrize("top_k,renorm", [(1, False), (2, False), (2, True)])
def test_grouped_dispatch_equals_naive_loop(top_k, renorm):
    moe = MoE(16, 24, n_experts=5, top_k=top_k, renormalize=renorm).eval()
    x = torch.randn(3, 7, 16)
    out, router = moe(x)
    assert torch.allclose(out, moe_reference(moe, x), atol=1e-6)
    assert int(moe.expert_counts.sum()) == 21 * top_k
    if renorm:
        assert torch.allclose(router.weights.sum(-1), torch.ones(21))


def test_shared_expert_is_added_to_every_token():
    """Granite's MoE: softmax top-k renormalised, plus a SwiGLU shared expert on every token, unweighted."""
    moe = MoE(16, 24, n_experts=5, top_k=2, renormalize=True, shared_d_ff=12).eval()
    x = torch.randn(2, 5, 16)
    out, _ = moe(x)
    torch.testing.assert_close(out, moe_reference(moe, x), atol=1e-6, rtol=1e-6)
    shared = moe.shared_mlp
    moe.shared_mlp = None
    torch.testing.assert_close(out - moe(x)[0], shared(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("groups,keep,renorm", [(1, 1, True), (3, 2, True), (3, 1, False), (2, 2, True)])
def test_sigmoid_routing_equals_per_token_definition(groups, keep, renorm):
    """Nemotron-H's router: the vectorised grouped top-k with a correction bias == the plain-Python definition,
    and the whole MoE (relu² experts + shared expert) == the per-token loop."""
    moe = SigmoidMoE(16, 24, 6, 2, renorm, shared_d_ff=8, n_groups=groups, topk_groups=keep, scaling=2.5).eval()
    moe.router_bias.copy_(torch.randn(6) * 0.3)  # big enough to change choices
    x = torch.randn(40, 16)
    r = moe.route(x)
    for t in range(40):
        want = sigmoid_route_reference(moe, x[t])
        got = dict(zip(r.experts[t].tolist(), r.weights[t].tolist()))
        assert set(got) == {e for e, _ in want}
        for e, w in want:
            assert math.isclose(got[e], w, rel_tol=1e-5)
    out, _ = moe(x)
    torch.testing.assert_close(out, moe_reference(moe, x), atol=1e-5, rtol=1e-5)
    assert moe.gate_proj is None and moe.expert_params() == [moe.up_proj, moe.down_proj]


def test_sigmoid_routing_bias_steers_choice_not_weight():
    """A large correction bias on expert 0 makes every token choose it, at its unbiased sigmoid weight."""
    moe = SigmoidMoE(8, 4, 4, 1, renormalize=False).eval()
    moe.router_bias[0] = 10.0
    x = torch.randn(9, 8)
    r = moe.route(x)
    assert (r.experts[:, 0] == 0).all()
    torch.testing.assert_close(r.weights[:, 0], moe.router_logits(x)[:, 0].sigmoid())


def test_aux_loss_at_perfect_balance_is_k():
    E, T = 4, 8
    logits = torch.zeros(T, E)  # uniform probabilities
    for k in (1, 2):
        experts = torch.stack([(torch.arange(T) + j) % E for j in range(k)], dim=1)  # every expert equally often
        assert math.isclose(load_balancing_loss(logits, experts, E).item(), k, rel_tol=1e-6)


def test_aux_loss_collapsed_routing_is_E():
    logits = torch.tensor([[10.0, 0, 0, 0]]).repeat(6, 1)
    experts = torch.zeros(6, 1, dtype=torch.long)
    p0 = torch.softmax(logits[0], 0)[0].item()
    assert math.isclose(load_balancing_loss(logits, experts, 4).item(), 4 * p0, rel_tol=1e-6)


def test_z_loss_known_value():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-6)


def test_router_topk_weights_not_renormalised_by_default():
    r = route(torch.tensor([[2.0, 1.0, 0.0]]), top_k=2, renormalize=False)
    p = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    assert torch.allclose(r.weights[0], p[:2]) and r.experts[0].tolist() == [0, 1]


def test_capacity_drops_overflow_in_training_only():
    moe = MoE(8, 16, n_experts=2, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 strongly prefers expert 0
    x = torch.randn(40, 8).abs()
    moe.train()
    out, _ = moe(x)
    capacity = math.ceil(1.0 * 40 / 2)
    assert int(moe.expert_counts[0]) == capacity and int(moe.dropped_count) == 40 - capacity
    assert (out.abs().sum(-1) == 0).sum() == 40 - capacity  # dropped tokens get no expert output
    moe.reset_stats()
    moe.eval()
    moe(x)
    assert int(moe.expert_counts.sum()) == 40 and int(moe.dropped_count) == 0


def _moes() -> dict[str, MoE]:
    torch.manual_seed(0)
    sigmoid = SigmoidMoE(16, 24, 6, 2, True, shared_d_ff=8, n_groups=3, topk_groups=2, scaling=2.5).eval()
    sigmoid.router_bias.copy_(torch.randn(6) * 0.3)
    return {"softmax": MoE(16, 24, n_experts=6, top_k=2, renormalize=True, shared_d_ff=12).eval(), "sigmoid": sigmoid}


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 8])  # T*k < E gathers the chosen experts' weights; else every expert
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_dispatch_equals_the_grouped_one_and_the_definition(kind, tokens, dtype):
    """The decode step's static-shape dispatch (both of its forms) against the grouped dispatch and the per-token
    loop, with the same expert counts."""
    moe = _moes()[kind].to(dtype)
    x = torch.randn(tokens, 16).to(dtype)
    grouped = moe.step(x)
    grouped_counts = moe.expert_counts.clone()
    moe.reset_stats()
    moe.static_dispatch = True
    got = moe.step(x)
    assert got.dtype == dtype and torch.equal(moe.expert_counts, grouped_counts)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got, grouped, **tol)
    torch.testing.assert_close(got.float(), moe_reference(moe, x).float(), **tol)


def test_static_dispatch_is_given_only_to_plain_expert_weights():
    model = tiny("jamba")
    assert use_static_dispatch(model) and all(m.static_dispatch for m in model.moe_layers().values())
    next(iter(model.moe_layers().values())).linear = packed_linear  # as pack_experts() leaves it
    assert not use_static_dispatch(model)
