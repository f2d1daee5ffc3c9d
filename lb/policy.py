"""Backend choice, behind one small interface.

A policy sees the backends and returns one, or None when there is nothing to
send to.  `in_flight` counts requests from the moment a backend is chosen
(connecting and sending included), not only those with a response under way.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence

from .backend import Backend


class Policy(Protocol):
    name: str

    def pick(self, backends: Sequence[Backend]) -> Backend | None: ...


class LeastInFlight:
    """Full scan for the fewest in-flight requests, random tie-break.

    Exact and cheap for fleets of a few GPU servers, where sampling (power of
    two choices) too often lands on the busier host.  Backends that are up are
    preferred; when none is, the least loaded of the rest is tried, which is
    also how a recovered backend is noticed before active probes exist.
    """

    name = "least_conn"

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, backends: Sequence[Backend]) -> Backend | None:
        candidates = [b for b in backends if b.usable] or list(backends)
        if not candidates:
            return None
        least = min(b.in_flight for b in candidates)
        tied = [b for b in candidates if b.in_flight == least]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)
