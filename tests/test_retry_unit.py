"""Sans-io tests for lb.retry.RetryBudget: the fleet-wide retry budget and
the back-off between attempts."""

from __future__ import annotations

import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.control.config import Retry
from lb.scheduling.retry import RECENT, RETRYABLE_KINDS, RetryBudget


def cfg(**kw) -> Retry:
    values = dict(attempts=2, statuses=(502, 503, 504), budget_percent=20, budget_min=3,
                  backoff_base=0.025, backoff_max=0.25, replay_max_bytes=1 << 20)
    values.update(kw)
    return Retry(**values)


def budget(active: int, retrying: int, **kw) -> RetryBudget:
    b = RetryBudget(cfg(**kw), random.Random(0))
    b.active, b.retrying = active, retrying
    return b


# --- allows()


def test_min_floor_allows_retries_when_few_requests_are_under_way():
    assert budget(active=1, retrying=0, budget_min=3).allows()
    assert budget(active=3, retrying=2, budget_min=3).allows()
    assert not budget(active=3, retrying=3, budget_min=3).allows()


def test_percent_of_active_above_the_floor():
    # 20% of 100 under way: 20 may be retrying
    assert budget(active=100, retrying=19, budget_min=3).allows()
    assert not budget(active=100, retrying=20, budget_min=3).allows()


def test_floor_wins_when_larger_than_the_percent():
    assert budget(active=10, retrying=4, budget_percent=20, budget_min=5).allows()
    assert not budget(active=10, retrying=5, budget_percent=20, budget_min=5).allows()


def test_zero_budget_allows_no_retry():
    assert not budget(active=1000, retrying=0, budget_percent=0, budget_min=0).allows()


def test_full_percent_allows_every_request_to_retry():
    assert budget(active=7, retrying=6, budget_percent=100, budget_min=0).allows()
    assert not budget(active=7, retrying=7, budget_percent=100, budget_min=0).allows()


def test_allows_keeps_retrying_within_the_percent_of_active():
    # 20% of 12 requests under way is 2.4: two may be retrying, not three
    # ("at most budget_percent of the requests under way may be retrying").
    assert not budget(active=12, retrying=2, budget_percent=20, budget_min=0).allows()


def test_a_lone_request_cannot_retry_on_a_percent_budget_without_a_floor():
    # 20% of one request is 0.2 of a retry: with budget_min = 0 none is allowed.
    assert not budget(active=1, retrying=0, budget_percent=20, budget_min=0).allows()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(active=st.integers(0, 500), percent=st.integers(0, 100), floor=st.integers(0, 10),
       delta=st.integers(-2, 2))
def test_allows_exactly_when_one_more_retry_stays_within_the_budget(active, percent, floor,
                                                                   delta):
    # retrying near the edge of the budget, where rounding matters
    retrying = max(0, max(floor, active * percent // 100) + delta)
    b = budget(active=active, retrying=retrying, budget_percent=percent, budget_min=floor)
    # one more retrying must stay within max(floor, percent% of those under way)
    within = (retrying + 1) * 100 <= max(floor * 100, active * percent)
    assert b.allows() is within


# --- backoff()


def test_backoff_doubles_from_base_up_to_max():
    b = RetryBudget(cfg(backoff_base=0.1, backoff_max=1.0), random.Random(0))
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for n, cap in enumerate(caps, start=1):
        for _ in range(50):
            assert cap / 2 <= b.backoff(n) <= cap


@settings(max_examples=200, deadline=None, derandomize=True)
@given(base=st.floats(0.001, 1.0), factor=st.floats(1.0, 50.0), seed=st.integers(0, 2**32 - 1),
       numbers=st.lists(st.integers(1, 10), min_size=1, max_size=20))
def test_backoff_is_within_the_upper_half_of_its_cap(base, factor, seed, numbers):
    backoff_max = base * factor
    b = RetryBudget(cfg(backoff_base=base, backoff_max=backoff_max), random.Random(seed))
    for n in numbers:
        cap = min(backoff_max, base * 2 ** (n - 1))
        value = b.backoff(n)
        assert cap / 2 - 1e-12 <= value <= cap + 1e-12
        assert value <= backoff_max + 1e-12


def test_backoff_grows_with_the_retry_number_on_average():
    b = RetryBudget(cfg(backoff_base=0.025, backoff_max=0.25), random.Random(42))
    means = [sum(b.backoff(n) for _ in range(200)) / 200 for n in range(1, 7)]
    assert means[0] < means[1] < means[2] < means[3] < means[4]
    assert abs(means[4] - means[5]) < 0.02          # both at the 0.25 s cap
    assert 0.125 <= min(means[4:]) and max(means[4:]) <= 0.25


def test_backoff_is_jittered():
    b = RetryBudget(cfg(), random.Random(1))
    assert len({b.backoff(2) for _ in range(20)}) > 10


def test_backoff_is_reproducible_with_a_seed():
    one, two = RetryBudget(cfg(), random.Random(9)), RetryBudget(cfg(), random.Random(9))
    assert [one.backoff(n) for n in range(1, 6)] == [two.backoff(n) for n in range(1, 6)]


# --- accounting


def test_idle_timeout_while_sending_is_not_retryable():
    assert "idle_timeout" not in RETRYABLE_KINDS
    assert {"connect", "reset", "first_byte_timeout"} <= RETRYABLE_KINDS


def test_recent_keeps_the_last_retried_requests_only():
    b = RetryBudget(cfg())
    for i in range(RECENT + 5):
        b.remember(f"r{i}", 200, ["b0", "b1"], ["b0 answered 503"])
    snap = b.snapshot()
    assert len(snap["recent"]) == RECENT
    assert snap["recent"][0]["request_id"] == "r5"
    assert snap["recent"][-1] == {"request_id": f"r{RECENT + 4}", "status": 200, "attempts": 2,
                                  "backends": ["b0", "b1"], "why": ["b0 answered 503"]}


def test_snapshot_is_json_serialisable():
    b = RetryBudget(cfg())
    b.retries, b.retrying = 4, 1
    b.by_reason["reset"] += 3
    b.denied["budget"] += 1
    snap = b.snapshot()
    assert orjson.loads(orjson.dumps(snap)) == snap
    assert snap["attempts_max"] == 2 and snap["retries"] == 4 and snap["retrying_now"] == 1
    assert snap["by_reason"] == {"reset": 3} and snap["not_retried"] == {"budget": 1}
