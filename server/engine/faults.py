"""Test-only fault injection, so the tests can prove that one request's failure stays that request's.

AETHERIS_FAULTS="point=seed[:seconds],..." makes the engine fail at `point` for the requests whose sampling
seed is `seed`. `install` wraps the engine core's collaborators (its step, the model runner's prefill and
decode, the sampler) when the variable is set; outside tests it installs nothing, so the engine's own code
has no fault checks at all.

Points: prefill (an out-of-range token id reaches the embedding), nan (the request's logits are NaN),
sampler (the sampler raises on a batch holding the request), token (the sampler returns an id outside the
vocabulary), step (the batched decode step raises), device (the decode step raises a CUDA error, which stops
the engine), hang (the iteration sleeps `seconds`), die (the engine thread exits).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import torch

from .sampler import Sampled

log = logging.getLogger("aetheris.engine")


def _parse(spec: str) -> dict[str, tuple[int, float]]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, arg = item.partition("=")
        seed, _, seconds = arg.partition(":")
        out[point] = (int(seed), float(seconds or 0))
    return out


FAULTS = _parse(os.environ.get("AETHERIS_FAULTS", ""))
if FAULTS:
    log.warning("test fault injection is on: %s", FAULTS)


def hit(point: str, seeds: Iterable[int | None]) -> bool:
    """Whether the fault at `point` applies to a request among those with these seeds."""
    if point not in FAULTS:
        return False
    return FAULTS[point][0] in set(seeds)


def _seeds(seqs) -> list[int | None]:
    return [s.params.seed for s in seqs]


def install(core) -> None:
    """Wrap an EngineCore's step, its runner's prefill / decode / start_decoding and its sampler with the faults of
    AETHERIS_FAULTS; nothing when it is unset."""
    if not FAULTS:
        return
    step, runner, sample_next = core.step, core.runner, core.sample_next
    prefill, decode, start_decoding = runner.prefill, runner.decode, runner.start_decoding

    def faulty_step() -> None:
        seeds = [r.req.params.seed for r in core.scheduler.requests.values()]
        if hit("hang", seeds):  # once: the watchdog test needs the engine to come back
            time.sleep(FAULTS.pop("hang")[1])
        if hit("die", seeds):
            raise SystemExit("injected: the engine thread exits")
        step()

    def faulty_prefill(r, tokens):
        if hit("prefill", [r.req.params.seed]):
            tokens = [core.model.config.vocab_size + 1] * len(tokens)
        return prefill(r, tokens)

    def nan_rows(seqs, logits):
        rows = [i for i, s in enumerate(seqs) if hit("nan", [s.params.seed])]
        if rows:
            logits = logits.clone()  # the runner's logits feed the prefix cache too
            logits[rows] = float("nan")
        return logits

    def faulty_decode():
        if hit("step", _seeds(runner.running)):
            raise RuntimeError("injected: the decode step fails")
        if hit("device", _seeds(runner.running)):
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered (injected)")
        seqs, logits = decode()
        return seqs, nan_rows(seqs, logits)

    def faulty_start_decoding(r):
        return nan_rows(r.seqs, start_decoding(r))

    def faulty_sample_next(seqs, logits) -> Sampled:
        if hit("sampler", _seeds(seqs)):
            raise RuntimeError("injected: the sampler fails")
        sampled = sample_next(seqs, logits)
        tokens = [core.vocab + 1 if hit("token", [s.params.seed]) else t for s, t in zip(seqs, sampled.tokens)]
        return Sampled(tokens, sampled.logprobs, sampled.nan)

    core.step = faulty_step
    runner.prefill, runner.decode, runner.start_decoding = faulty_prefill, faulty_decode, faulty_start_decoding
    core.sample_next = faulty_sample_next
