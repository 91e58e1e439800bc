"""Token sampling, vectorised over a batch with per-row parameters.

Glossary: B batch (rows), V vocab size, K top logprobs.

Each row has its own temperature (0 = greedy), top_k (0 = off), top_p (1 = off), presence and frequency
penalties (OpenAI's definition: logit -= presence * [count > 0] + frequency * count, over the row's
generated tokens), additive logit bias, and optionally its own torch.Generator so that a seeded request
draws the same numbers whatever else shares the batch. Random numbers are drawn one per row from that row's
generator; the draw itself (inverse CDF on the sorted, truncated distribution) is vectorised.

The per-row parameters (temperature, top_k, top_p, penalties) are small host tensors, uploaded with the logits'
step (`upload`): deciding "is every row greedy?" then reads nothing back from the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SamplingBatch:
    temperature: Tensor  # (B,) float; 0 = greedy
    top_k: Tensor  # (B,) long; 0 = off
    top_p: Tensor  # (B,) float; 1 = off
    presence_penalty: Tensor | None = None  # (B,) float
    frequency_penalty: Tensor | None = None  # (B,) float
    token_counts: Tensor | None = None  # (B, V) generated-token counts, needed with penalties
    logit_bias: Tensor | None = None  # (B, V) additive
    generators: list[torch.Generator | None] | None = None  # one per row, None = global RNG
    all_greedy: bool | None = None  # every temperature is 0, as known on the host; None: read from temperature

    @classmethod
    def uniform(cls, batch: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> SamplingBatch:
        return cls(
            torch.full((batch,), float(temperature)),
            torch.full((batch,), top_k, dtype=torch.long),
            torch.full((batch,), float(top_p)),
            all_greedy=temperature <= 0,
        )


def upload(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for the device: to a GPU through pinned memory, queued behind
    the work already there (a copy from pageable memory makes the host wait for the device)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def apply_penalties(logits: Tensor, s: SamplingBatch) -> Tensor:
    """logits (B, V) fp32 -> logits with logit bias and presence/frequency penalties applied."""
    if s.logit_bias is not None:
        logits = logits + s.logit_bias
    if s.token_counts is not None and (s.presence_penalty is not None or s.frequency_penalty is not None):
        counts = s.token_counts.to(logits.dtype)  # (B, V)
        if s.frequency_penalty is not None:
            logits = logits - upload(s.frequency_penalty, logits.device).unsqueeze(1) * counts
        if s.presence_penalty is not None:
            logits = logits - upload(s.presence_penalty, logits.device).unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def _uniforms(s: SamplingBatch, batch: int, device: torch.device) -> Tensor:
    gens = s.generators or [None] * batch
    draws = [torch.rand(1, generator=g) if g is not None else torch.rand(1) for g in gens]
    return upload(torch.cat(draws), device)  # (B,)


def sample(logits: Tensor, s: SamplingBatch) -> Tensor:
    """logits (B, V) fp32 (already penalised) -> token ids (B,)."""
    greedy = s.temperature <= 0  # (B,) on the host
    greedy_ids = logits.argmax(dim=-1)  # (B,)
    if s.all_greedy if s.all_greedy is not None else bool(greedy.all()):
        return greedy_ids
    temp = upload(torch.where(greedy, torch.ones_like(s.temperature), s.temperature), logits.device)
    scaled = logits / temp.unsqueeze(1)  # (B, V)
    # A temperature so small that logits / temperature overflows is greedy: its limit as temperature -> 0,
    # where the overflow would make the softmax NaN and the draw arbitrary.
    overflow = ~torch.isfinite(scaled.amax(dim=-1)) & torch.isfinite(logits.amax(dim=-1))  # (B,)
    greedy = upload(greedy, logits.device) | overflow
    scaled = torch.where(overflow.unsqueeze(1), logits, scaled)
    probs = torch.softmax(scaled, dim=-1)  # (B, V)
    sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
    ranks = torch.arange(probs.shape[-1], device=probs.device).unsqueeze(0)  # (1, V)
    k = upload(s.top_k, probs.device).unsqueeze(1)  # (B, 1)
    keep = (k <= 0) | (ranks < k)
    # top-p over the top-k survivors, renormalised (as HF and vLLM): keep the smallest prefix whose mass
    # reaches p; the most likely token always stays, whatever p.
    kept = sorted_p * keep
    kept = kept / kept.sum(dim=-1, keepdim=True)
    mass_before = kept.cumsum(dim=-1) - kept
    keep &= (mass_before < upload(s.top_p, probs.device).unsqueeze(1)) | (ranks == 0)
    sorted_p = sorted_p * keep
    cdf = sorted_p.cumsum(dim=-1)  # (B, V)
    u = _uniforms(s, logits.shape[0], probs.device) * cdf[:, -1]  # (B,)
    pos = torch.searchsorted(cdf, u.unsqueeze(1), right=True).clamp_(max=probs.shape[-1] - 1)  # (B, 1)
    drawn = order.gather(1, pos).squeeze(1)  # (B,)
    return torch.where(greedy, greedy_ids, drawn)


def top_logprobs(logprobs: Tensor, chosen: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """logprobs (B, V) -> chosen logprob (B,), top-k values (B, K) and ids (B, K). Tokens a grammar or a bias
    forbids (-inf) report -9999.0, as vLLM does: JSON has no infinity."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).clamp(min=-9999.0)
    if k <= 0:
        empty = logprobs.new_zeros(logprobs.shape[0], 0)
        return chosen_lp, empty, empty.long()
    vals, ids = logprobs.topk(k, dim=-1)
    return chosen_lp, vals.clamp(min=-9999.0), ids


def sampleable_vocab(model_vocab: int, tokenizer_vocab: int) -> int:
    """How many logit rows name a token: checkpoints pad the embedding past the tokenizer (mamba-130m's 50277
    tokens sit in 50280 rows), and the padding rows must never be sampled or scored."""
    return min(model_vocab, tokenizer_vocab)
