"""From logits to tokens for a batch of sequences: per-row sampling parameters as a SamplingBatch, the draw,
and the raw log-probabilities the API reports.

Glossary: B rows (one per sequence), V sampleable vocab, K top logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from model.sampling import SamplingBatch, apply_penalties, sample, top_logprobs

from ..engine_io import TokenLogprob
from .grammar import constrain
from .sequence import Sequence


@dataclass
class Sampled:
    tokens: list[int]  # one per row
    logprobs: list[TokenLogprob | None]  # one per row; None where the request asked for none
    nan: list[bool] | None = None  # one per row: its logits held a NaN (its token means nothing)


def token_logprobs(logits: Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Raw model log-probabilities (before temperature or penalties) of `targets` (B,), with the top k."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen, top_v, top_i = top_logprobs(lp, torch.tensor(targets, device=lp.device), k)
    return [
        TokenLogprob(t, c, list(zip(ids, vals)))
        for t, c, ids, vals in zip(targets, chosen.tolist(), top_i.tolist(), top_v.tolist())
    ]


def sampling_batch(seqs: list[Sequence], logits: Tensor) -> SamplingBatch:
    """Each sequence's parameters as one row of a SamplingBatch; logits (B, V) give device and vocab. The
    per-row scalars stay on the host (model/sampling.py uploads them); a row's logit bias and token counts are
    device tensors its sequence keeps, so a step costs one scatter and one stack whatever the request's bias
    size or output length."""
    dev, vocab = logits.device, logits.shape[-1]
    ps = [s.params for s in seqs]
    batch = SamplingBatch(
        temperature=torch.tensor([p.temperature for p in ps]),
        top_k=torch.tensor([min(p.top_k, vocab) for p in ps]),
        top_p=torch.tensor([p.top_p for p in ps]),
        generators=[s.generator for s in seqs],
        all_greedy=all(p.temperature <= 0 for p in ps),
    )
    if any(p.logit_bias for p in ps):
        batch.logit_bias = _bias_rows(seqs, logits)
    if any(p.needs_penalties for p in ps):
        batch.token_counts = torch.stack([_counts(s, vocab, dev) for s in seqs])  # (B, V)
        batch.presence_penalty = torch.tensor([p.presence_penalty for p in ps])
        batch.frequency_penalty = torch.tensor([p.frequency_penalty for p in ps])
    return batch


def _bias_rows(seqs: list[Sequence], logits: Tensor) -> Tensor:
    """(B, V) additive bias: each row's (ids, values), built once per sequence, scattered in one call."""
    vocab = logits.shape[-1]
    rows, ids, vals = [], [], []
    for i, s in enumerate(seqs):
        if s.params.logit_bias and s.bias is None:
            kept = {t: b for t, b in s.params.logit_bias.items() if t < vocab}
            s.bias = (
                torch.tensor(list(kept), device=logits.device, dtype=torch.long),
                torch.tensor(list(kept.values()), device=logits.device),
            )
        if s.bias is not None:
            rows.append(torch.full_like(s.bias[0], i))
            ids.append(s.bias[0])
            vals.append(s.bias[1])
    bias = torch.zeros_like(logits)
    bias[torch.cat(rows), torch.cat(ids)] = torch.cat(vals).to(bias)
    return bias


def _counts(s: Sequence, vocab: int, device) -> Tensor:
    """The sequence's generated-token counts (V,), counted from its output once, then kept up to date by
    Sequence.append."""
    if s.counts is None:
        s.counts = torch.zeros(vocab, device=device)
        if s.output_ids:
            ids = torch.tensor(s.output_ids, device=device)
            s.counts.index_add_(0, ids, torch.ones(len(ids), device=device))
    return s.counts


def sample_next(seqs: list[Sequence], logits: Tensor) -> Sampled:
    """One token per sequence (seqs[i] <-> logits[i], (B, V) fp32), and its logprobs where asked. The tokens and
    which rows' logits held a NaN come back to the host in one read, the step's only one without logprobs."""
    batch = sampling_batch(seqs, logits)
    shaped = constrain(apply_penalties(logits, batch), [s.grammar for s in seqs])  # grammar rows only
    drawn = sample(shaped, batch)  # (B,)
    tokens, nan = torch.stack([drawn, torch.isnan(logits).any(dim=-1).to(drawn.dtype)]).tolist()  # (2, B)
    out: list[TokenLogprob | None] = [None] * len(seqs)
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if rows:
        k = max(seqs[i].params.logprobs for i in rows)
        for i, lp in zip(rows, token_logprobs(logits[rows], [tokens[i] for i in rows], k)):
            lp.top = lp.top[: seqs[i].params.logprobs]
            out[i] = lp
    return Sampled(tokens, out, [bool(x) for x in nan])
