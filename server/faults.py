"""Test-only fault injection, so the tests can prove that one request's failure stays that request's.

AETHERIS_FAULTS="point=seed[:seconds],..." makes the engine fail at `point` for the requests whose sampling
seed is `seed`. Outside tests the variable is unset and every check is a lookup in an empty dict.

Points: prefill (an out-of-range token id reaches the embedding), nan (the request's logits are NaN),
sampler (the sampler raises on a batch holding the request), token (the sampler returns an id outside the
vocabulary), step (the batched decode step raises), hang (the iteration sleeps `seconds`), die (the engine
thread exits).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

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


def at_step(seeds: list[int | None]) -> None:
    """The faults of a whole iteration: hang (sleep) and die (end the engine thread)."""
    if hit("hang", seeds):  # once: the watchdog test needs the engine to come back
        time.sleep(FAULTS.pop("hang")[1])
    if hit("die", seeds):
        raise SystemExit("injected: the engine thread exits")
