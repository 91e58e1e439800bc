"""Vectorised sampling against its definitions, row by row."""

import torch

from model.sampling import SamplingBatch, apply_penalties, sample


def _draws(logits, n=4000, **kw):
    batch = SamplingBatch.uniform(n, **kw)
    return sample(logits.expand(n, -1).clone(), batch)


def test_greedy_and_mixed_rows():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    s = SamplingBatch(torch.tensor([0.0, 0.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert sample(logits, s).tolist() == [1, 0]


def test_top_k_and_top_p_restrict_support():
    logits = torch.log(torch.tensor([[0.3, 0.25, 0.2, 0.15, 0.1]]))
    assert set(_draws(logits, temperature=1.0, top_k=2).tolist()) == {0, 1}
    # top-p 0.5 after top-k 2 renormalises [0.3, 0.25] -> [0.545, 0.455]: only the first token is kept.
    assert set(_draws(logits, temperature=1.0, top_k=2, top_p=0.5).tolist()) == {0}
    assert set(_draws(logits, temperature=1.0, top_p=0.6).tolist()) == {0, 1, 2}
    assert set(_draws(logits, temperature=1.0, top_p=1e-9).tolist()) == {0}  # the best token always stays


def test_temperature_one_matches_the_distribution():
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.2])
    got = torch.bincount(_draws(torch.log(probs)[None], n=20000, temperature=1.0), minlength=3) / 20000
    assert (got - probs).abs().max() < 0.02


def test_seeded_generators_reproduce_per_row():
    logits = torch.randn(2, 50)
    make = lambda: SamplingBatch(
        torch.ones(2),
        torch.zeros(2, dtype=torch.long),
        torch.ones(2),  # noqa: E731
        generators=[torch.Generator().manual_seed(7), None],
    )
    a, b = make(), make()
    first = [sample(logits, a)[0].item() for _ in range(20)]
    second = [sample(logits, b)[0].item() for _ in range(20)]
    assert first == second


def test_penalties_follow_openai_definition():
    logits = torch.zeros(1, 4)
    s = SamplingBatch.uniform(1)
    s.token_counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]])
    s.presence_penalty, s.frequency_penalty = torch.tensor([0.5]), torch.tensor([0.25])
    s.logit_bias = torch.tensor([[0.0, 0.0, 0.0, 2.0]])
    assert apply_penalties(logits, s).tolist() == [[0.0, -0.75, -1.25, 2.0]]


def test_a_temperature_so_small_that_logits_overflow_is_greedy():
    """logits / 1e-38 overflows float32 (and all-negative logits underflow to -inf): the draw must be the
    argmax, as at temperature 0, not whatever a NaN softmax gives."""
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 5
    logits[:8] = -logits[:8].abs() - 1  # rows whose every logit is negative
    for t in (1e-38, 1e-40):
        got = sample(logits, SamplingBatch.uniform(64, temperature=t))
        assert got.tolist() == logits.argmax(-1).tolist()
