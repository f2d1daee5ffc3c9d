"""Sans-io tests for lb.health.Health: passive ejection, half-open trials,
admin states, slow start, and telling a busy backend's unanswered probe from
a dead one's (probe_inconclusive).  Time is passed in explicitly; nothing
sleeps."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.control.config import Active, Passive
import pytest

from lb.scheduling.health import BUSY, DRAIN, MAINT, READY, Health, probe_inconclusive

T0 = 1000.0   # a monotonic-looking start time


def passive(**kw) -> Passive:
    values = dict(consecutive_failures=3, consecutive_5xx=5, statuses=(500, 502, 503, 504),
                  base_ejection=10.0, max_ejection=120.0, jitter=0.0, max_ejected_percent=50)
    values.update(kw)
    return Passive(**values)


ACTIVE = Active(interval=2.0, timeout=1.0, rise=2, fall=3)


def health(slow_start: float = 0.0, **kw) -> Health:
    return Health(passive(**kw), ACTIVE, slow_start)


def ejected(h: Health, now: float = T0, seed: int = 0) -> float:
    """Eject `h` at `now` (as the scheduler does when failed() says so)."""
    return h.eject(now, random.Random(seed))


# --- when a backend gets ejected


def test_consecutive_local_failures_reach_the_threshold():
    h = health(consecutive_failures=3)
    assert h.failed(T0, local=True) is False
    assert h.failed(T0, local=True) is False
    assert h.failed(T0, local=True) is True


def test_consecutive_5xx_reach_their_own_threshold():
    h = health(consecutive_failures=1, consecutive_5xx=2)
    assert h.failed(T0, local=False) is False
    assert h.failed(T0, local=False) is True


def test_a_success_resets_the_run_of_failures():
    h = health(consecutive_failures=2, consecutive_5xx=2)
    for _ in range(10):
        assert h.failed(T0, local=True) is False
        assert h.failed(T0, local=False) is False
        assert h.succeeded(T0) is False      # not half-open: no readmission to report
    assert h.in_rotation(T0)


def test_zero_threshold_never_ejects():
    h = health(consecutive_failures=0, consecutive_5xx=0)
    assert not any(h.failed(T0, local=local) for local in (True, False) * 50)


def test_ejected_backend_is_out_of_the_rotation_until_its_time_is_up():
    h = health(base_ejection=10.0)
    assert ejected(h) == 10.0
    assert not h.in_rotation(T0)
    assert not h.in_rotation(T0 + 9.99)
    assert h.in_rotation(T0 + 10.0)
    assert h.half_open(T0 + 10.0)
    assert h.state(T0 + 5, 0) == "ejected"
    assert h.state(T0 + 10, 0) == "half-open"


# --- how long


def test_ejection_times_grow_by_base_and_stop_at_max():
    h = health(base_ejection=10.0, max_ejection=35.0)
    now, seen = T0, []
    for _ in range(6):
        seen.append(ejected(h, now))
        now = h.ejected_until            # half-open: the trial fails at once
        h.started(now)
        assert h.failed(now, local=True) is True
    assert seen == [10.0, 20.0, 30.0, 35.0, 35.0, 35.0]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(base=st.floats(0.5, 30.0), factor=st.floats(1.0, 10.0), jitter=st.floats(0.0, 0.9),
       count=st.integers(1, 15), seed=st.integers(0, 2**32 - 1))
def test_ejection_time_is_nominal_shortened_by_at_most_jitter(base, factor, jitter, count, seed):
    max_ejection = base * factor
    h = health(base_ejection=base, max_ejection=max_ejection, jitter=jitter)
    rng = random.Random(seed)
    now = T0
    for n in range(1, count + 1):
        duration = h.eject(now, rng)
        nominal = min(max_ejection, base * n)
        assert nominal * (1 - jitter) - 1e-9 <= duration <= nominal + 1e-9
        assert math.isclose(h.ejected_until, now + duration)
        assert h.ejections == n
        now = h.ejected_until
        h.started(now)
        assert h.failed(now, local=False) is True     # the trial failed


@settings(max_examples=100, deadline=None, derandomize=True)
@given(base=st.floats(0.5, 30.0), factor=st.floats(1.0, 10.0), count=st.integers(2, 15))
def test_without_jitter_ejection_times_never_shrink(base, factor, count):
    h = health(base_ejection=base, max_ejection=base * factor, jitter=0.0)
    now, durations = T0, []
    for _ in range(count):
        durations.append(ejected(h, now))
        now = h.ejected_until
        h.started(now)
        h.failed(now, local=True)
    assert durations == sorted(durations)
    assert max(durations) <= base * factor


def test_each_max_ejection_of_healthy_time_forgets_one_ejection():
    h = health(base_ejection=10.0, max_ejection=40.0, consecutive_failures=1)
    ejected(h, T0)                           # ejection 1: 10 s
    now = T0 + 10
    h.started(now)
    h.failed(now, local=True)
    assert ejected(h, now) == 20.0           # ejection 2
    now = h.ejected_until
    h.started(now)
    assert h.succeeded(now) is True          # readmitted
    healthy_for = 40.0 * 1 + 5               # one max_ejection of health: forget one
    assert ejected(h, now + healthy_for) == 20.0   # ejection 2 again, not 3


# --- half-open


def test_half_open_allows_exactly_one_trial():
    h = health()
    ejected(h)
    now = h.ejected_until
    assert h.has_room(now, 0, 4)
    h.started(now)
    assert h.trial
    assert not h.has_room(now, 1, 4)


def test_successful_trial_readmits():
    h = health(consecutive_failures=1)
    ejected(h)
    now = h.ejected_until + 1
    h.started(now)
    assert h.succeeded(now) is True
    assert not h.ejected and h.in_rotation(now) and h.state(now, 1) == "up"
    assert h.has_room(now, 1, 4)


def test_failed_trial_re_ejects_for_longer():
    h = health(base_ejection=10.0)
    first = ejected(h)
    now = h.ejected_until
    h.started(now)
    assert h.failed(now, local=True) is True
    second = ejected(h, now)
    assert second > first
    assert not h.in_rotation(now)


def test_failures_of_earlier_requests_do_not_extend_the_ejection():
    h = health(consecutive_failures=1)
    ejected(h)
    until = h.ejected_until
    for dt in (0.0, 1.0, 9.0):
        assert h.failed(T0 + dt, local=True) is False
        assert h.failed(T0 + dt, local=False) is False
    assert h.ejected_until == until and h.ejections == 1


def test_failure_of_an_earlier_request_after_the_ejection_time_is_not_a_failed_trial():
    # A long TTS request sent before the ejection times out after the
    # ejection time is over, before any trial request went out: it says
    # nothing new about the backend and must not eject it again.
    h = health(consecutive_failures=1)
    ejected(h)
    now = h.ejected_until + 1
    assert not h.trial
    assert h.failed(now, local=True) is False
    assert h.ejections == 1 and h.in_rotation(now)


def test_abandoned_trial_lets_another_trial_go():
    h = health()
    ejected(h)
    now = h.ejected_until
    h.started(now)
    assert not h.has_room(now, 1, 4)
    h.abandoned()
    assert h.has_room(now, 0, 4)


def test_half_open_trial_never_exceeds_max_concurrency():
    h = health()
    ejected(h)
    now = h.ejected_until
    assert not h.has_room(now, 4, 4)      # four requests from before the ejection still out
    assert h.has_room(now, 3, 4)


# --- admin states


def test_drain_and_maint_take_the_backend_out_of_the_rotation():
    for state in (DRAIN, MAINT):
        h = health()
        h.set_admin(T0, state)
        assert not h.in_rotation(T0)
        h.set_admin(T0, READY)
        assert h.in_rotation(T0)


def test_drain_state_reports_whether_requests_are_still_out():
    h = health()
    h.set_admin(T0, DRAIN)
    assert h.state(T0, 2) == "draining"
    assert h.state(T0, 0) == "drained"


def test_maint_clears_the_ejection_and_the_probe_verdict():
    h = health()
    h.probed(T0, False, "down")
    ejected(h)
    h.set_admin(T0 + 1, MAINT)
    assert not h.ejected and h.probe_up is None
    h.set_admin(T0 + 1, READY)
    assert h.in_rotation(T0 + 1)


def test_drain_keeps_the_ejection():
    h = health()
    ejected(h)
    h.set_admin(T0 + 1, DRAIN)
    h.set_admin(T0 + 1, READY)
    assert h.ejected and not h.in_rotation(T0 + 1)


# --- slow start


def test_slow_start_after_ready_ramps_from_one_to_max():
    h = health(slow_start=10.0)
    h.set_admin(T0, DRAIN)
    h.set_admin(T0, READY)
    limits = [h.limit(T0 + t, 4) for t in (0, 1, 2.5, 3, 5, 7.5, 8, 9.99, 10, 50)]
    assert limits == [1, 1, 1, 2, 2, 3, 4, 4, 4, 4]


def test_readmission_starts_slow_start():
    h = health(slow_start=10.0)
    ejected(h)
    now = h.ejected_until
    h.started(now)
    h.succeeded(now)
    assert h.limit(now, 6) == 1
    assert h.state(now + 1, 0) == "slow-start"
    assert h.limit(now + 10, 6) == 6
    assert h.state(now + 10, 0) == "up"


def test_no_slow_start_when_it_is_zero():
    h = health(slow_start=0.0)
    h.set_admin(T0, DRAIN)
    h.set_admin(T0, READY)
    assert h.limit(T0, 4) == 4


def test_has_room_follows_the_ramped_limit():
    h = health(slow_start=8.0)
    h.set_admin(T0, MAINT)
    h.set_admin(T0, READY)
    assert h.has_room(T0, 0, 4) and not h.has_room(T0, 1, 4)
    assert h.has_room(T0 + 4.5, 2, 4) and not h.has_room(T0 + 4.5, 3, 4)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(limit=st.integers(1, 64), slow_start=st.floats(0.5, 120.0),
       offsets=st.lists(st.floats(0.0, 200.0), min_size=1, max_size=30))
def test_slow_start_limit_is_monotone_between_one_and_max(limit, slow_start, offsets):
    h = health(slow_start=slow_start)
    h.set_admin(T0, DRAIN)
    h.set_admin(T0, READY)
    previous = 0
    for t in sorted(offsets):
        now = T0 + t
        current = h.limit(now, limit)
        assert 1 <= current <= limit
        assert current >= previous
        elapsed = now - T0
        if elapsed >= slow_start:
            assert current == limit
        else:
            assert current == max(1, math.ceil(limit * elapsed / slow_start))
        previous = current


@settings(max_examples=100, deadline=None, derandomize=True)
@given(limit=st.integers(2, 16), slow_start=st.sampled_from([1.0, 6.0, 10.0, 30.0]))
def test_next_change_is_when_the_ramped_limit_rises(limit, slow_start):
    h = health(slow_start=slow_start)
    h.set_admin(T0, DRAIN)
    h.set_admin(T0, READY)
    now = T0
    for _ in range(limit + 2):
        when = h.next_change(now, limit)
        if when is None:
            assert h.limit(now, limit) == limit
            break
        assert when > now
        before = h.limit(when - 2e-3, limit)
        after = h.limit(when, limit)
        # a wake-up then finds a higher limit (or the ramp already at full)
        assert after > before or after == before == limit
        now = when
    else:
        raise AssertionError("the ramp never finished")


def test_maint_forgets_past_ejections():
    # An operator who took the backend out to fix it starts it afresh: the
    # next ejection is the first again, not a longer one.
    h = health(consecutive_failures=1)
    ejected(h)
    ejected(h)
    h.set_admin(T0, MAINT)
    h.set_admin(T0, READY)
    assert h.in_rotation(T0)
    assert ejected(h, T0 + 1) == 10.0


# --- busy is not dead: probe_inconclusive and Health.probe_was_busy

WINDOW, FIRST_BYTE = 6.0, 60.0    # fall x interval = 3 x 2 s; timeouts.first_byte


def inconclusive(now: float = T0, *, no_answer: bool = True, oldest: float | None = T0 - 1,
                 answered: float | None = None) -> bool:
    return probe_inconclusive(now, no_answer=no_answer, oldest_in_flight=oldest,
                              last_answer=answered, window=WINDOW, first_byte=FIRST_BYTE)


@pytest.mark.parametrize("case, kwargs, expected", [
    ("young request in flight", dict(oldest=T0 - 8), True),
    ("old request, but another answered just now", dict(oldest=T0 - 100, answered=T0 - 1), True),
    ("old request, an answer exactly fall x interval ago", dict(oldest=T0 - 100,
                                                               answered=T0 - WINDOW), True),
    ("old request, last answer longer ago", dict(oldest=T0 - 100, answered=T0 - WINDOW - 0.1),
     False),
    ("request in flight exactly first_byte", dict(oldest=T0 - FIRST_BYTE), False),
    ("old request, never an answer", dict(oldest=T0 - 61), False),
    ("nothing in flight, an answer just now", dict(oldest=None, answered=T0 - 1), False),
    ("refused, with a young request and an answer just now",
     dict(no_answer=False, oldest=T0 - 1, answered=T0 - 1), False),
])
def test_probe_inconclusive_only_while_requests_are_still_completing(case, kwargs, expected):
    assert inconclusive(**kwargs) is expected, case


@settings(max_examples=300, deadline=None, derandomize=True)
@given(no_answer=st.booleans(),
       age=st.none() | st.floats(0, 200), since_answer=st.none() | st.floats(0, 200),
       window=st.floats(0, 50), first_byte=st.floats(0, 120), more=st.floats(0, 50))
def test_probe_inconclusive_needs_no_answer_and_work_in_flight_and_grows_with_its_bounds(
        no_answer, age, since_answer, window, first_byte, more):
    def decide(w, f):
        return probe_inconclusive(T0, no_answer=no_answer,
                                  oldest_in_flight=None if age is None else T0 - age,
                                  last_answer=None if since_answer is None else T0 - since_answer,
                                  window=w, first_byte=f)
    verdict = decide(window, first_byte)
    if verdict:
        assert no_answer and age is not None
        assert decide(window + more, first_byte + more)  # longer bounds: still busy
    if no_answer and age is not None and age < first_byte:
        assert verdict


def test_inconclusive_probe_neither_counts_towards_fall_nor_resets_it():
    h = health()
    assert h.probed(T0, True, "answered 200") == "up"
    assert h.probed(T0 + 2, False, "no answer") is None        # 1 of fall 3
    assert h.probe_was_busy("no answer while busy") is True
    assert h.probe_was_busy("no answer while busy") is False   # already busy
    assert h.probe_streak == 1 and h.probe_up is True
    assert h.state(T0 + 6, 1) == BUSY and h.in_rotation(T0 + 6)
    assert h.probed(T0 + 8, False, "refused") is None          # 2 of 3: the busy ones in
    assert h.probe_busy is False and h.state(T0 + 8, 1) == "up"  # between did not count
    assert h.probed(T0 + 10, False, "refused") == "down"


def test_inconclusive_probe_does_not_reset_the_rise_count():
    h = health()
    h.probed(T0, False, "answered 503")
    assert h.probed(T0 + 2, True, "answered 200") is None      # 1 of rise 2
    h.probe_was_busy("no answer while busy")
    assert h.state(T0 + 4, 1) == "down"                        # out: down says more than busy
    assert h.probed(T0 + 6, True, "answered 200") == "up"


def test_any_number_of_inconclusive_probes_leaves_the_standing_alone():
    h = health()
    h.probed(T0, True, "answered 200")
    for _ in range(50):
        h.probe_was_busy("no answer while busy")
    assert h.probe_up is True and h.in_rotation(T0) and h.probe_reason == "no answer while busy"


def test_maint_forgets_busy_and_ejected_shows_over_busy():
    h = health()
    h.probed(T0, True, "answered 200")
    h.probe_was_busy("no answer")
    ejected(h)
    assert h.state(T0 + 1, 1) == "ejected"
    h.set_admin(T0 + 1, MAINT)
    h.set_admin(T0 + 1, READY)
    assert h.probe_busy is False and h.state(T0 + 1, 0) == "up"

