"""The sampler's per-row tensors: the logit bias scattered from tensors each sequence builds once, and penalty
counts kept up to date token by token, both equal to building them from scratch (the obvious reference)."""

from __future__ import annotations

import random

import torch

from server.engine.sampler import sampling_batch
from server.engine.sequence import Sequence
from server.engine_io import SamplingParams
from tests.helpers import toy_tokenizer

V = 50


def reference(seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
    bias, counts = torch.zeros(len(seqs), V), torch.zeros(len(seqs), V)
    for i, s in enumerate(seqs):
        for tok, b in s.params.logit_bias.items():
            if tok < V:
                bias[i, tok] = b
        for tok in s.output_ids:
            counts[i, tok] += 1
    return bias, counts


def test_bias_and_counts_equal_a_rebuild_every_step():
    rng = random.Random(0)
    tok = toy_tokenizer()
    seqs = []
    for i in range(4):
        bias = {rng.randrange(V + 5): rng.uniform(-100, 100) for _ in range(rng.randrange(0, 8))} if i else {}
        params = SamplingParams(logit_bias=bias, presence_penalty=0.5 * (i % 2), frequency_penalty=0.3, ignore_eos=True)
        seqs.append(Sequence.create("r", i, params, tok, set()))
    seqs[2].output_ids = [3, 3, 7]  # a sequence that already has output when its counts are first needed
    logits = torch.zeros(len(seqs), V)
    for _ in range(6):
        batch = sampling_batch(seqs, logits)
        want_bias, want_counts = reference(seqs)
        torch.testing.assert_close(batch.logit_bias, want_bias)
        torch.testing.assert_close(batch.token_counts, want_counts)
        for s in seqs:
            s.append(rng.randrange(V), None)
    assert all(s.bias is not None for s in seqs[1:] if s.params.logit_bias)  # built once, kept
