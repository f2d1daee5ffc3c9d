"""Backend choice, behind one small interface.

The scheduler hands a policy the backends that may take a request right now
(in the rotation and below their concurrency limit, never empty) and the
policy returns one.  A policy looks only at the load and `weight`; the load
is `in_flight`, requests from the moment a backend is chosen (connecting
and sending included), not only those with a response under way, plus
`in_flight_elsewhere`, what the fleet's other balancers have there when
they share slots through Redis (fleet_slots).

A new policy is one class with a `name` and a `pick`, added to POLICIES.
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence

from .backend import Backend


class Policy(Protocol):
    name: str

    def pick(self, candidates: Sequence[Backend]) -> Backend: ...


def _load(backend: Backend) -> float:
    return (backend.in_flight + backend.in_flight_elsewhere) / backend.weight


class LeastConn:
    """Full scan for the lowest in-flight count per unit of weight, random tie-break.

    Exact and cheap for fleets of a few GPU servers, where sampling (power of
    two choices) too often lands on the busier host.
    """

    name = "least_conn"

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        least = min(_load(b) for b in candidates)
        tied = [b for b in candidates if _load(b) == least]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class WeightedRandom:
    """A random backend, in proportion to weight: what apps do today."""

    name = "random"

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        return self._rng.choices(candidates, weights=[b.weight for b in candidates])[0]


class PowerOfTwo:
    """Power of two choices: two distinct backends drawn by weight, the less
    loaded one wins (random between equals).  Scales to large fleets; with a
    handful of backends least_conn is the better choice."""

    name = "p2c"

    def __init__(self, rng: random.Random | None = None):
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        rng = self._rng
        weights = [b.weight for b in candidates]
        first = rng.choices(range(len(candidates)), weights=weights)[0]
        weights[first] = 0
        second = rng.choices(range(len(candidates)), weights=weights)[0]
        a, b = candidates[first], candidates[second]
        if _load(a) == _load(b):
            return a if rng.random() < 0.5 else b
        return a if _load(a) < _load(b) else b


class RoundRobin:
    """Smooth weighted round robin (as nginx does it): over any run of picks
    from the same candidates, each gets its weight's share, interleaved
    rather than in bursts.  Backends that are full or out of the rotation are
    skipped for that pick."""

    name = "round_robin"

    def __init__(self, rng: random.Random | None = None):
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[Backend]) -> Backend:
        if len(candidates) == 1:
            return candidates[0]
        current = self._current
        total = 0
        best: Backend | None = None
        best_score = 0
        for b in candidates:
            score = current.get(b.name, 0) + b.weight
            current[b.name] = score
            total += b.weight
            if best is None or score > best_score:
                best, best_score = b, score
        current[best.name] -= total
        return best


POLICIES: dict[str, type] = {cls.name: cls for cls in (LeastConn, PowerOfTwo, WeightedRandom,
                                                         RoundRobin)}


def make(name: str, rng: random.Random | None = None) -> Policy:
    return POLICIES[name](rng)
