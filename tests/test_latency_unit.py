"""Sans-io tests for lb.latency: the histograms behind /metrics and the
sliding window and percentile estimates behind /lb-stats."""

from __future__ import annotations

import math
from bisect import bisect_left

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.scheduling.backend import FAILURE_KINDS
from lb.tts.cartesia import OUTCOMES
from lb.proxy.latency import (BOUNDS, NBUCKETS, QUANTILES, Histogram, LatencyBook, Window, quantile,
                        summary)
from lb.scheduling.retry import DENIAL_REASONS, RETRYABLE_KINDS, retry_reasons

durations = st.floats(min_value=0.0, max_value=200.0, allow_nan=False)
# Values on the bounds themselves, where an off-by-one would show.
edgy = st.one_of(durations, st.sampled_from(BOUNDS), st.sampled_from([0.0, 1e-9, 60.0001]))


def counts_of(values) -> list[int]:
    h = Histogram()
    for v in values:
        h.observe(v)
    return h.counts


# --- Histogram


def test_a_value_on_a_bound_is_in_that_bounds_bucket():
    h = Histogram()
    assert h.observe(0.25) == BOUNDS.index(0.25)      # le="0.25" holds 0.25 itself
    assert h.observe(0.2500001) == BOUNDS.index(0.5)
    assert h.observe(0.0) == 0
    assert h.observe(61.0) == len(BOUNDS)              # +Inf
    assert h.cumulative() == [1, 1, 1, 1, 1, 2, 3, 3, 3, 3, 3, 3, 3, 4]
    assert h.count == 4 and h.sum == pytest.approx(0.25 + 0.2500001 + 61.0)


@given(st.lists(edgy, max_size=200))
def test_buckets_are_cumulative_monotone_and_end_at_the_count(values):
    h = Histogram()
    for v in values:
        h.observe(v)
    cumulative = h.cumulative()
    assert len(cumulative) == NBUCKETS
    assert all(a <= b for a, b in zip(cumulative, cumulative[1:]))
    assert cumulative[-1] == h.count == len(values)
    # What Prometheus's le means: observations less than or equal to the bound.
    for bound, n in zip(BOUNDS, cumulative):
        assert n == sum(1 for v in values if v <= bound)
    assert h.sum == pytest.approx(math.fsum(values), rel=1e-9, abs=1e-9)


# --- quantile estimates


def bucket_bounds(value: float) -> tuple[float, float]:
    i = bisect_left(BOUNDS, value)
    if i == len(BOUNDS):
        return BOUNDS[-1], BOUNDS[-1]   # the +Inf bucket answers its lower bound
    return (BOUNDS[i - 1] if i else 0.0), BOUNDS[i]


@given(st.lists(edgy, min_size=1, max_size=300),
       st.one_of(st.sampled_from(QUANTILES), st.floats(min_value=1e-6, max_value=1.0)))
def test_the_estimate_lies_in_the_bucket_of_the_true_quantile(values, q):
    ordered = sorted(values)
    true = ordered[max(1, math.ceil(q * len(values))) - 1]   # nearest rank
    lower, upper = bucket_bounds(true)
    estimate = quantile(counts_of(values), q)
    assert lower <= estimate <= upper, (true, estimate)


@given(st.lists(durations, min_size=1, max_size=100))
def test_estimates_grow_with_the_quantile(values):
    counts = counts_of(values)
    estimates = [quantile(counts, q) for q in (0.1, 0.5, 0.9, 0.95, 0.99, 1.0)]
    assert estimates == sorted(estimates)


def test_nothing_counted_gives_no_estimate():
    assert quantile([0] * NBUCKETS, 0.5) is None
    assert summary([0] * NBUCKETS) == {"count": 0, "p50": None, "p95": None, "p99": None}


def test_interpolates_inside_the_bucket_like_histogram_quantile():
    # Ten observations in (0.1, 0.25]: the median is half way through it.
    counts = counts_of([0.2] * 10)
    assert quantile(counts, 0.5) == pytest.approx(0.175)
    assert summary(counts) == {"count": 10, "p50": 0.175, "p95": 0.2425, "p99": 0.2485}


# --- Window


def test_the_window_forgets_what_is_older_than_its_span():
    w = Window(span=300, step=10)
    w.add(3, now=1000.0)
    w.add(5, now=1105.0)
    assert w.counts(1105.0)[3] == 1 and w.counts(1105.0)[5] == 1
    assert w.counts(1290.0)[3] == 1            # 290 s old: still inside
    assert w.counts(1300.0)[3] == 0            # its slot's time is over
    assert w.counts(1300.0)[5] == 1
    assert sum(w.counts(1410.0)) == 0          # everything gone
    w.add(7, now=1410.0)                       # and the ring is usable again
    assert w.counts(1410.0) == [0] * 7 + [1] + [0] * (NBUCKETS - 8)


def test_a_reused_slot_is_cleared_first():
    w = Window(span=30, step=10)               # three slots
    for t in (0.0, 10.0, 20.0):
        w.add(0, now=t)
    w.add(1, now=31.0)                         # slot of t=0 again, its count dropped
    counts = w.counts(31.0)
    assert counts[0] == 2 and counts[1] == 1


def test_series_side_by_side_in_one_window_are_counted_apart():
    w = Window(span=60, step=10, series=3)
    w.add(2, now=50.0, series=0)
    w.add(4, now=51.0, series=2)
    w.slot(52.0)[2][4] += 1
    assert w.counts(55.0, 0)[2] == 1 and sum(w.counts(55.0, 0)) == 1
    assert sum(w.counts(55.0, 1)) == 0
    assert w.counts(55.0, 2)[4] == 2 and sum(w.counts(55.0, 2)) == 2


@settings(max_examples=200)
@given(st.integers(1, 12), st.lists(st.tuples(st.floats(0, 40), st.integers(0, NBUCKETS - 1)),
                                    max_size=60),
       st.floats(0, 200))
def test_window_counts_exactly_the_slots_inside_it(slots, steps, later):
    step = 10.0
    w = Window(span=slots * step, step=step)
    now, added = 5.0, []
    for dt, index in steps:
        now += dt
        w.add(index, now)
        added.append((now, index))
    query = now + later
    epoch = int(query // step)
    expected = [0] * NBUCKETS
    for t, index in added:
        if epoch - slots < int(t // step) <= epoch:
            expected[index] += 1
    assert w.counts(query) == expected
    # Anything from the last span - step seconds is there for sure; nothing older than span.
    assert sum(expected) >= sum(1 for t, _ in added if t >= query - (slots - 1) * step)
    assert sum(expected) <= sum(1 for t, _ in added if t > query - slots * step)


# --- LatencyBook


def test_the_book_makes_every_series_up_front_and_keeps_counts_across_a_reload():
    book = LatencyBook(["b0", "b1", "-"], ["chatterbox", "other"])
    assert [(b, k) for b, k, _ in book.series()] == [
        ("b0", "chatterbox"), ("b0", "other"), ("b1", "chatterbox"), ("b1", "other"),
        ("-", "chatterbox"), ("-", "other")]
    book.observe("b0", "chatterbox", 100.0, 0.3, 0.1, 0.0)
    book.observe("b1", "other", 100.0, 0.3, None, None)     # no byte sent; no queue asked
    series = {(b, k): s for b, k, s in book.series()}
    assert series["b1", "other"].duration.count == 1
    assert series["b1", "other"].first_byte.count == 0
    assert series["b1", "other"].queue_wait.count == 0
    book.relabel(["b0", "b2", "-"], ["chatterbox", "openai", "other"])
    series = {(b, k): s for b, k, s in book.series()}
    assert ("b1", "other") not in series                      # removed backend: gone
    assert series["b0", "chatterbox"].duration.count == 1     # kept: its counts stay
    assert series["b0", "openai"].duration.count == 0         # new kind: made at 0
    assert series["b2", "other"].duration.count == 0
    snap = book.snapshot(100.0)
    assert set(snap["backends"]) == {"b0", "b2", "-"}
    assert snap["backends"]["b0"]["duration"]["count"] == 1


def test_a_label_the_book_does_not_know_is_made_when_it_first_shows_up():
    book = LatencyBook(["b0"], ["other"])
    book.observe("gone", "chatterbox", 5.0, 0.01, 0.01, 0.0)
    series = {(b, k): s for b, k, s in book.series()}
    assert series["gone", "chatterbox"].duration.count == 1
    assert book.snapshot(5.0)["backends"]["gone"]["duration"]["count"] == 1


def test_window_percentiles_per_backend_cover_all_its_kinds_and_forget():
    book = LatencyBook(["b0"], ["openai", "other"], span=60, step=10)
    for _ in range(50):
        book.observe("b0", "openai", 1000.0, 0.3, 0.02, 0.0)
    for _ in range(50):
        book.observe("b0", "other", 1000.0, 3.0, 0.02, 0.0)
    snap = book.snapshot(1000.0)["backends"]["b0"]
    assert snap["duration"]["count"] == 100
    assert 0.25 <= snap["duration"]["p50"] <= 0.5
    assert 2.5 <= snap["duration"]["p95"] <= 5.0
    assert snap["queue_wait"]["p99"] <= 0.005
    assert book.snapshot(1070.0)["backends"]["b0"]["duration"]["count"] == 0


# --- the vocabularies /metrics shows from the start


def test_retry_vocabulary_is_made_of_failure_kinds_and_configured_statuses():
    assert RETRYABLE_KINDS <= set(FAILURE_KINDS)
    assert retry_reasons((503, 502)) == sorted(RETRYABLE_KINDS) + ["status_502", "status_503"]
    assert len(set(DENIAL_REASONS)) == len(DENIAL_REASONS)
    assert len(set(OUTCOMES)) == len(OUTCOMES) and "ok" in OUTCOMES
