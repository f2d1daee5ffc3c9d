"""Sans-io tests for lb.policy: least_conn, p2c, random and round_robin.

A policy is handed the backends that may take a request right now (never
empty) and looks only at their name, load (in_flight, plus in_flight_elsewhere:
the fleet's other balancers' calls there) and weight."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.scheduling.policy import POLICIES, LeastConn, PowerOfTwo, RoundRobin, WeightedRandom, make


class Stub:
    """What a policy looks at of a Backend."""

    def __init__(self, name: str, in_flight: int = 0, weight: int = 1, elsewhere: int = 0):
        self.name = name
        self.in_flight = in_flight
        self.in_flight_elsewhere = elsewhere
        self.weight = weight

    def __repr__(self) -> str:
        return f"Stub({self.name}, in_flight={self.in_flight}, weight={self.weight})"


def load(b: Stub) -> float:
    return (b.in_flight + b.in_flight_elsewhere) / b.weight


candidates_st = st.lists(st.tuples(st.integers(0, 8), st.integers(1, 5)), min_size=1,
                         max_size=8).map(
    lambda pairs: [Stub(f"b{i}", f, w) for i, (f, w) in enumerate(pairs)])


# --- the registry


def test_policies_registry_has_the_four_names():
    assert set(POLICIES) == {"least_conn", "p2c", "random", "round_robin"}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_make_builds_the_named_policy(name):
    policy = make(name, random.Random(0))
    assert policy.name == name
    assert isinstance(policy, POLICIES[name])


def test_make_unknown_name_raises():
    with pytest.raises(KeyError):
        make("least_loaded")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_single_candidate_is_picked(name):
    only = Stub("only", in_flight=3, weight=2)
    policy = make(name, random.Random(0))
    assert all(policy.pick([only]) is only for _ in range(5))


@pytest.mark.parametrize("name", sorted(POLICIES))
@settings(max_examples=100, deadline=None, derandomize=True)
@given(candidates=candidates_st, seed=st.integers(0, 2**32 - 1))
def test_pick_is_one_of_the_candidates(name, candidates, seed):
    policy = make(name, random.Random(seed))
    for _ in range(5):
        chosen = policy.pick(candidates)
        assert any(chosen is c for c in candidates)


# --- least_conn


def test_least_conn_picks_the_least_in_flight():
    a, b, c = Stub("a", 3), Stub("b", 1), Stub("c", 2)
    assert LeastConn(random.Random(0)).pick([a, b, c]) is b


@pytest.mark.parametrize("name", ["least_conn", "p2c"])
def test_calls_from_the_fleets_other_balancers_count_as_load(name):
    # Fewer calls from this process, but more from the whole fleet.
    quiet_here, quiet_fleet = Stub("a", in_flight=0, elsewhere=3), Stub("b", in_flight=1)
    policy = make(name)
    assert {policy.pick([quiet_here, quiet_fleet]).name for _ in range(20)} == {"b"}


def test_least_conn_divides_by_weight():
    small, big = Stub("small", in_flight=2, weight=1), Stub("big", in_flight=3, weight=2)
    assert LeastConn(random.Random(0)).pick([small, big]) is big


@settings(max_examples=300, deadline=None, derandomize=True)
@given(candidates=candidates_st, seed=st.integers(0, 2**32 - 1))
def test_least_conn_picks_a_minimal_load(candidates, seed):
    chosen = LeastConn(random.Random(seed)).pick(candidates)
    assert load(chosen) == min(load(c) for c in candidates)


def test_least_conn_breaks_ties_randomly():
    tied = [Stub(f"s{i}", 1) for i in range(4)] + [Stub("busy", 2)]
    policy = LeastConn(random.Random(1234))
    counts = Counter(policy.pick(tied).name for _ in range(800))
    assert set(counts) == {"s0", "s1", "s2", "s3"}
    assert min(counts.values()) > 120, counts        # about 200 each


def test_least_conn_tie_break_is_reproducible_with_a_seed():
    tied = [Stub(f"s{i}") for i in range(4)]
    one, two = LeastConn(random.Random(7)), LeastConn(random.Random(7))
    assert [one.pick(tied).name for _ in range(50)] == [two.pick(tied).name for _ in range(50)]


def test_least_conn_spreads_a_burst_evenly():
    backends = [Stub(f"b{i}") for i in range(3)]
    policy = LeastConn(random.Random(0))
    for _ in range(9):
        policy.pick(backends).in_flight += 1
    assert [b.in_flight for b in backends] == [3, 3, 3]


# --- p2c


class RecordingRandom(random.Random):
    """Records the indices p2c draws with choices()."""

    def __init__(self, seed: int):
        super().__init__(seed)
        self.draws: list[int] = []

    def choices(self, population, weights=None, *, cum_weights=None, k=1):
        out = super().choices(population, weights=weights, cum_weights=cum_weights, k=k)
        self.draws.extend(out)
        return out


@settings(max_examples=300, deadline=None, derandomize=True)
@given(candidates=candidates_st.filter(lambda c: len(c) >= 2), seed=st.integers(0, 2**32 - 1))
def test_p2c_picks_the_less_loaded_of_two_distinct_draws(candidates, seed):
    rng = RecordingRandom(seed)
    chosen = PowerOfTwo(rng).pick(candidates)
    first, second = rng.draws
    assert first != second
    a, b = candidates[first], candidates[second]
    assert chosen is a or chosen is b
    assert load(chosen) == min(load(a), load(b))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(loads=st.tuples(st.integers(0, 8), st.integers(0, 8)).filter(lambda t: t[0] != t[1]),
       seed=st.integers(0, 2**32 - 1))
def test_p2c_never_picks_the_busier_of_two(loads, seed):
    a, b = Stub("a", loads[0]), Stub("b", loads[1])
    policy = PowerOfTwo(random.Random(seed))
    for _ in range(10):
        assert policy.pick([a, b]) is (a if loads[0] < loads[1] else b)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(candidates=candidates_st.filter(lambda c: len(c) >= 2), seed=st.integers(0, 2**32 - 1))
def test_p2c_never_picks_a_uniquely_busiest_backend(candidates, seed):
    busiest = max(load(c) for c in candidates)
    if sum(load(c) == busiest for c in candidates) > 1:
        return
    policy = PowerOfTwo(random.Random(seed))
    for _ in range(10):
        assert load(policy.pick(candidates)) < busiest


def test_p2c_picks_either_of_two_equals():
    a, b = Stub("a", 2), Stub("b", 2)
    policy = PowerOfTwo(random.Random(5))
    counts = Counter(policy.pick([a, b]).name for _ in range(400))
    assert 150 < counts["a"] < 250, counts


def test_p2c_draws_by_weight():
    # All idle: the first draw is by weight, the second among the rest, the
    # winner of equals a coin toss; the heavy one wins more than half.
    backends = [Stub("heavy", 0, weight=9), Stub("l1", 0), Stub("l2", 0), Stub("l3", 0)]
    policy = PowerOfTwo(random.Random(3))
    counts = Counter(policy.pick(backends).name for _ in range(2000))
    assert counts["heavy"] > 900, counts


# --- random


def test_random_respects_weights():
    backends = [Stub(f"w{w}", 0, weight=w) for w in (1, 2, 3, 4)]
    policy = WeightedRandom(random.Random(2024))
    n = 10_000
    counts = Counter(policy.pick(backends).name for _ in range(n))
    total = sum(b.weight for b in backends)
    chi2 = sum((counts[b.name] - n * b.weight / total) ** 2 / (n * b.weight / total)
               for b in backends)
    assert chi2 < 16.27, (chi2, counts)     # 3 degrees of freedom, p = 0.001


def test_random_ignores_load():
    idle, busy = Stub("idle", 0), Stub("busy", 50)
    policy = WeightedRandom(random.Random(8))
    counts = Counter(policy.pick([idle, busy]).name for _ in range(1000))
    assert 400 < counts["busy"] < 600, counts


# --- round_robin


def test_round_robin_weights_3_1_give_300_and_100_of_400():
    a, b = Stub("a", weight=3), Stub("b", weight=1)
    policy = RoundRobin()
    picks = [policy.pick([a, b]).name for _ in range(400)]
    assert Counter(picks) == {"a": 300, "b": 100}


def test_round_robin_interleaves_rather_than_bursts():
    a, b = Stub("a", weight=3), Stub("b", weight=1)
    policy = RoundRobin()
    picks = "".join(policy.pick([a, b]).name for _ in range(400))
    assert "bb" not in picks
    assert "aaaa" not in picks


def test_round_robin_equal_weights_rotate():
    backends = [Stub(n) for n in "xyz"]
    policy = RoundRobin()
    picks = "".join(policy.pick(backends).name for _ in range(9))
    assert picks in ("xyzxyzxyz", "xzyxzyxzy", "yxzyxzyxz", "yzxyzxyzx", "zxyzxyzxy",
                     "zyxzyxzyx")
    assert Counter(picks) == {"x": 3, "y": 3, "z": 3}


def test_round_robin_ignores_load():
    busy, idle = Stub("busy", 100), Stub("idle", 0)
    policy = RoundRobin()
    assert Counter(policy.pick([busy, idle]).name for _ in range(10)) == {"busy": 5, "idle": 5}


@settings(max_examples=200, deadline=None, derandomize=True)
@given(weights=st.lists(st.integers(1, 6), min_size=2, max_size=5), rounds=st.integers(1, 4))
def test_round_robin_gives_each_its_weight_share_per_cycle(weights, rounds):
    backends = [Stub(f"b{i}", weight=w) for i, w in enumerate(weights)]
    policy = RoundRobin()
    total = sum(weights)
    for _ in range(rounds):
        counts = Counter(policy.pick(backends).name for _ in range(total))
        assert counts == {b.name: b.weight for b in backends}


@settings(max_examples=200, deadline=None, derandomize=True)
@given(weights=st.lists(st.integers(1, 6), min_size=2, max_size=5), picks=st.integers(1, 60))
def test_round_robin_never_runs_ahead_of_its_share(weights, picks):
    # Smooth: after any number of picks, each backend's count is within one
    # of its exact share (weight / total of the picks so far).
    backends = [Stub(f"b{i}", weight=w) for i, w in enumerate(weights)]
    policy = RoundRobin()
    total = sum(weights)
    counts: Counter[str] = Counter()
    for t in range(1, picks + 1):
        counts[policy.pick(backends).name] += 1
        for b in backends:
            assert abs(counts[b.name] - t * b.weight / total) < 1.0 + 1e-9, (t, counts)


def test_round_robin_skips_a_backend_that_is_full():
    a, b, c = Stub("a"), Stub("b"), Stub("c")
    policy = RoundRobin()
    picks = [policy.pick([a, c]).name for _ in range(6)]   # b full or out of the rotation
    assert Counter(picks) == {"a": 3, "c": 3}
    picks = [policy.pick([a, b, c]).name for _ in range(30)]
    assert Counter(picks) == {"a": 10, "b": 10, "c": 10}
