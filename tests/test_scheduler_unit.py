"""Sans-io tests for lb.scheduler.Scheduler: concurrency limits, the FIFO
queue, retries, fleet-wide ejection limits, and the rotation emptying.

Time is a fake clock, randomness is seeded, and a waiting request is a fake
waiter recording the scheduler's dispatch()/no_backend() calls.  The
property tests drive a scheduler through random sequences of events, with
requests that are then finished, failed, retried, abandoned or cancelled."""

from __future__ import annotations

import random

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lb.scheduling.backend import Backend
from lb.control.config import Active, BackendConfig, Passive
from lb.scheduling.health import DRAIN, MAINT, READY
from lb.scheduling.policy import POLICIES, make
from lb.scheduling.scheduler import NO_BACKEND, QUEUE_FULL, Scheduler, Ticket

T0 = 1000.0


def passive(**kw) -> Passive:
    values = dict(consecutive_failures=1, consecutive_5xx=1, statuses=(500, 502, 503, 504),
                  base_ejection=10.0, max_ejection=120.0, jitter=0.0, max_ejected_percent=100)
    values.update(kw)
    return Passive(**values)


ACTIVE = Active(interval=2.0, timeout=1.0, rise=1, fall=1)


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


class StubPool:
    def snapshot(self) -> dict:
        return {}


def make_backend(i: int, max_concurrency: int = 2, weight: int = 1, *,
                 passive_cfg: Passive | None = None, slow_start: float = 0.0) -> Backend:
    cfg = BackendConfig(name=f"b{i}", url=f"http://127.0.0.1:{7000 + i}", host="127.0.0.1",
                        port=7000 + i, max_concurrency=max_concurrency, weight=weight)
    pool = StubPool()   # only snapshot() is used here
    return Backend(cfg, pool, passive=passive_cfg or passive(),  # type: ignore[arg-type]
                   active=ACTIVE, slow_start=slow_start)


class Waiter:
    """A request waiting in the queue: records what the scheduler told it."""

    def __init__(self, name: str = "", log: list | None = None):
        self.name = name
        self.dispatched: list[Backend] = []
        self.let_go = 0
        self.log = log

    def dispatch(self, backend: Backend) -> None:
        self.dispatched.append(backend)
        if self.log is not None:
            self.log.append((self.name, backend.name))

    def no_backend(self) -> None:
        self.let_go += 1


class Fleet:
    """A scheduler over backends b0, b1, ... with a fake clock and recorded wake-ups."""

    def __init__(self, *limits: int, weights: tuple[int, ...] = (), queue_limit: int = 10,
                 slow_start: float = 0.0, policy: str = "least_conn", **passive_kw):
        self.clock = Clock()
        self.passive = passive(**passive_kw)
        self.backends = [make_backend(i, m, weights[i] if weights else 1,
                                      passive_cfg=self.passive, slow_start=slow_start)
                         for i, m in enumerate(limits)]
        self.wakes: list[float] = []
        self.log: list[tuple[str, str]] = []
        self.sched = Scheduler(self.backends, make(policy, random.Random(0)),
                               queue_limit=queue_limit, passive=self.passive, clock=self.clock,
                               rng=random.Random(0), wake_at=self.wakes.append)

    def waiter(self, name: str = "") -> Waiter:
        return Waiter(name, self.log)

    def fill(self, backend: Backend) -> None:
        """Take every free slot of `backend` (the others must be full or out)."""
        while backend.in_flight < backend.max_concurrency:
            assert self.sched.acquire(self.waiter()) is backend

    def eject(self, backend: Backend) -> float:
        """A failure that ejects it (consecutive_failures = 1)."""
        seconds = self.sched.failed(backend, local=True, reason="connection refused")
        assert seconds is not None
        return seconds


# --- the concurrency limit and the queue


def test_acquire_takes_a_slot():
    f = Fleet(2)
    b0 = f.backends[0]
    assert f.sched.acquire(f.waiter()) is b0
    assert b0.in_flight == 1 and b0.requests == 1


def test_full_backend_queues_and_release_dispatches():
    f = Fleet(1)
    b0 = f.backends[0]
    assert f.sched.acquire(f.waiter()) is b0
    w = f.waiter("w")
    ticket = f.sched.acquire(w)
    assert isinstance(ticket, Ticket) and ticket.waiter is w
    assert f.sched.queued == 1 and not w.dispatched
    f.sched.release(b0)
    assert w.dispatched == [b0]
    assert b0.in_flight == 1 and f.sched.queued == 0


def test_queue_is_first_in_first_out():
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)
    for name in "abcde":
        assert isinstance(f.sched.acquire(f.waiter(name)), Ticket)
    for _ in range(5):
        f.sched.release(b0)
    assert [name for name, _ in f.log] == list("abcde")


def test_new_request_does_not_overtake_the_queue():
    # A slot opens by time alone (slow start raises the limit) before the
    # wake-up runs; the request arriving then must not jump the queue.
    f = Fleet(4, slow_start=8.0)
    b0 = f.backends[0]
    f.sched.set_admin(b0, DRAIN)
    f.sched.set_admin(b0, READY)
    assert f.sched.acquire(f.waiter()) is b0             # limit 1 for now
    first = f.waiter("first")
    assert isinstance(f.sched.acquire(first), Ticket)
    f.clock.now = T0 + 4                                 # limit 2 now
    second = f.waiter("second")
    assert isinstance(f.sched.acquire(second), Ticket)
    assert first.dispatched == [b0] and not second.dispatched


def test_queue_full_when_queue_limit_reached():
    f = Fleet(1, queue_limit=2)
    f.fill(f.backends[0])
    assert isinstance(f.sched.acquire(f.waiter()), Ticket)
    assert isinstance(f.sched.acquire(f.waiter()), Ticket)
    assert f.sched.acquire(f.waiter()) == QUEUE_FULL
    assert f.sched.queued == 2
    assert f.sched.snapshot()["rejected_full"] == 1


def test_queue_limit_zero_never_queues():
    f = Fleet(1, queue_limit=0)
    f.fill(f.backends[0])
    assert f.sched.acquire(f.waiter()) == QUEUE_FULL


def test_retry_bypasses_a_full_queue():
    f = Fleet(1, queue_limit=1)
    f.fill(f.backends[0])
    f.sched.acquire(f.waiter())
    assert isinstance(f.sched.acquire(f.waiter(), frozenset({"b0"}), retry=True), Ticket)
    assert f.sched.queued == 2


def test_retry_waits_at_the_head_of_the_queue():
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)
    f.sched.acquire(f.waiter("plain1"))
    f.sched.acquire(f.waiter("plain2"))
    f.sched.acquire(f.waiter("retry"), frozenset({"b0"}), retry=True)
    for _ in range(3):
        f.sched.release(b0)
    assert [name for name, _ in f.log] == ["retry", "plain1", "plain2"]


def test_cancelled_ticket_is_never_dispatched():
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)
    gone, stays = f.waiter("gone"), f.waiter("stays")
    ticket = f.sched.acquire(gone)
    f.sched.acquire(stays)
    f.sched.cancel(ticket)
    assert f.sched.queued == 1
    f.sched.cancel(ticket)          # twice: no harm
    assert f.sched.queued == 1
    f.sched.release(b0)
    assert stays.dispatched == [b0] and not gone.dispatched and f.sched.queued == 0


def test_cancel_after_dispatch_changes_nothing():
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)
    w = f.waiter()
    ticket = f.sched.acquire(w)
    f.sched.release(b0)
    f.sched.cancel(ticket, timed_out=True)
    assert f.sched.queued == 0 and b0.in_flight == 1
    assert f.sched.snapshot()["timed_out"] == 0


def test_queue_timeout_is_counted():
    f = Fleet(1)
    f.fill(f.backends[0])
    f.sched.cancel(f.sched.acquire(f.waiter()), timed_out=True)
    snap = f.sched.snapshot()
    assert snap["timed_out"] == 1 and snap["length"] == 0


def test_many_cancellations_keep_the_count_right():
    f = Fleet(1, queue_limit=1000)
    b0 = f.backends[0]
    f.fill(b0)
    waiters = [f.waiter(str(i)) for i in range(300)]
    tickets = [f.sched.acquire(w) for w in waiters[:200]]
    for t in tickets[:-1]:
        f.sched.cancel(t)
    assert f.sched.queued == 1
    f.sched.release(b0)
    assert waiters[199].dispatched == [b0]
    assert not any(w.dispatched for w in waiters[:199])


def test_waiter_releasing_from_inside_dispatch_does_not_lose_the_next_one():
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)

    class GivesUpAtOnce(Waiter):
        def dispatch(self, backend):
            super().dispatch(backend)
            f.sched.release(backend)      # its connection failed on the spot

    quick, patient = GivesUpAtOnce("quick", f.log), f.waiter("patient")
    f.sched.acquire(quick)
    f.sched.acquire(patient)
    f.sched.release(b0)
    assert [name for name, _ in f.log] == ["quick", "patient"]
    assert b0.in_flight == 1 and f.sched.queued == 0


def test_snapshot_counts_queue_waits_on_the_given_clock():
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)
    f.sched.acquire(f.waiter())
    f.clock.now += 2.5
    f.sched.release(b0)
    snap = f.sched.snapshot()
    assert snap["dispatched"] == 1 and snap["peak"] == 1 and snap["length"] == 0
    assert snap["mean_wait_s"] == 2.5


def test_least_conn_fills_the_emptier_backend_first():
    f = Fleet(2, 2)
    b0, b1 = f.backends
    picks = [f.sched.acquire(f.waiter()) for _ in range(4)]
    assert b0.in_flight == b1.in_flight == 2
    assert isinstance(f.sched.acquire(f.waiter()), Ticket)
    assert sorted(b.name for b in picks) == ["b0", "b0", "b1", "b1"]


def test_weights_share_the_slots():
    f = Fleet(4, 4, weights=(3, 1))
    b0, b1 = f.backends
    for _ in range(4):
        f.sched.acquire(f.waiter())
    assert (b0.in_flight, b1.in_flight) == (3, 1)


def test_backend_snapshot_reports_load_and_state():
    f = Fleet(4, slow_start=8.0)
    b0 = f.backends[0]
    f.sched.acquire(f.waiter())
    f.sched.set_admin(b0, DRAIN)
    snap = orjson.loads(orjson.dumps(b0.snapshot(T0)))
    assert snap["name"] == "b0" and snap["in_flight"] == 1 and snap["max_concurrency"] == 4
    assert snap["state"] == "draining" and snap["admin"] == "drain"
    f.sched.set_admin(b0, READY)
    snap = b0.snapshot(T0 + 2)
    assert snap["state"] == "slow-start" and snap["limit_now"] == 1


# --- the rotation


def test_no_backend_when_nothing_is_in_rotation():
    f = Fleet(2)
    f.sched.set_admin(f.backends[0], DRAIN)
    w = f.waiter()
    assert f.sched.acquire(w) == NO_BACKEND
    assert not w.dispatched and not w.let_go      # answered by the return value only
    assert f.sched.snapshot()["no_backend"] == 1


@pytest.mark.parametrize("state", [DRAIN, MAINT])
def test_drain_and_maint_take_a_backend_out(state):
    f = Fleet(4, 4)
    b0, b1 = f.backends
    f.sched.acquire(f.waiter())
    busy = b0 if b0.in_flight else b1
    other = b1 if busy is b0 else b0
    f.sched.set_admin(busy, state)
    for _ in range(4):
        assert f.sched.acquire(f.waiter()) is other
    assert isinstance(f.sched.acquire(f.waiter()), Ticket)
    f.sched.release(busy)                 # the request in flight still finishes fine
    assert busy.in_flight == 0 and other.in_flight == 4 and f.sched.queued == 1


@pytest.mark.parametrize("state", [DRAIN, MAINT])
def test_emptying_the_rotation_lets_the_queue_go(state):
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)
    waiters = [f.waiter(str(i)) for i in range(3)]
    for w in waiters:
        f.sched.acquire(w)
    f.sched.set_admin(b0, state)
    assert [w.let_go for w in waiters] == [1, 1, 1]
    assert not any(w.dispatched for w in waiters)
    assert f.sched.queued == 0
    f.sched.release(b0)
    assert b0.in_flight == 0
    assert [w.let_go for w in waiters] == [1, 1, 1]


def test_ejecting_the_last_backend_lets_the_queue_go():
    f = Fleet(1)
    b0 = f.backends[0]
    f.fill(b0)
    w = f.waiter()
    f.sched.acquire(w)
    f.eject(b0)
    assert w.let_go == 1 and f.sched.queued == 0
    assert f.sched.acquire(f.waiter()) == NO_BACKEND


def test_ready_again_takes_requests_with_slow_start():
    f = Fleet(4, slow_start=8.0)
    b0 = f.backends[0]
    f.sched.set_admin(b0, DRAIN)
    f.sched.set_admin(b0, READY)
    assert f.sched.acquire(f.waiter()) is b0
    w = f.waiter()
    assert isinstance(f.sched.acquire(w), Ticket)        # limit 1 at first
    assert f.wakes and f.wakes[-1] > T0                  # a wake-up when the limit rises
    f.clock.now = f.wakes[-1]
    f.sched.dispatch()
    assert w.dispatched == [b0] and b0.in_flight == 2


def test_slow_start_ramps_the_limit_through_the_scheduler():
    f = Fleet(4, slow_start=8.0, queue_limit=100)
    b0 = f.backends[0]
    f.sched.set_admin(b0, MAINT)
    f.sched.set_admin(b0, READY)
    for _ in range(10):
        f.sched.acquire(f.waiter())
    seen = {}
    for t in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9):
        f.clock.now = T0 + t
        f.sched.dispatch()
        seen[t] = b0.in_flight
    assert seen == {0: 1, 1: 1, 2: 1, 3: 2, 4: 2, 5: 3, 6: 3, 7: 4, 8: 4, 9: 4}


# --- ejection across the fleet


def test_fleet_of_one_can_eject_its_backend():
    f = Fleet(2, max_ejected_percent=50)
    assert f.sched.max_ejected() == 1
    f.sched.acquire(f.waiter())
    assert f.sched.failed(f.backends[0], local=True, reason="refused") == 10.0
    assert f.sched.acquire(f.waiter()) == NO_BACKEND


def test_fleet_of_two_can_eject_one_but_not_both():
    f = Fleet(2, 2, max_ejected_percent=50)
    b0, b1 = f.backends
    assert f.sched.max_ejected() == 1
    assert f.sched.failed(b0, local=True, reason="refused") is not None
    assert f.sched.failed(b1, local=True, reason="refused") is None
    assert b1.health.in_rotation(T0) and not b0.health.in_rotation(T0)


def test_ten_percent_of_five_still_ejects_one():
    f = Fleet(1, 1, 1, 1, 1, max_ejected_percent=10)
    assert f.sched.max_ejected() == 1
    assert f.sched.failed(f.backends[0], local=True, reason="x") is not None
    assert f.sched.failed(f.backends[1], local=True, reason="x") is None
    assert f.sched.ejected_count() == 1


def test_max_ejected_percent_rounds_down():
    f = Fleet(*[1] * 10, max_ejected_percent=35)
    assert f.sched.max_ejected() == 3
    results = [f.sched.failed(b, local=True, reason="x") for b in f.backends]
    assert sum(r is not None for r in results) == 3


def test_max_ejected_percent_zero_disables_ejection():
    f = Fleet(2, max_ejected_percent=0)
    assert f.sched.max_ejected() == 0
    for _ in range(5):
        assert f.sched.failed(f.backends[0], local=True, reason="x") is None
    assert f.backends[0].health.in_rotation(T0)


def test_an_ejection_slot_frees_when_the_backend_is_readmitted():
    f = Fleet(1, 1, max_ejected_percent=50)
    b0, b1 = f.backends
    f.eject(b0)
    f.clock.now = b0.health.ejected_until
    assert f.sched.acquire(f.waiter()) in (b0, b1)
    f.sched.succeeded(b0)              # a trial (or anything) answered: readmitted
    assert not b0.health.ejected
    assert f.sched.failed(b1, local=True, reason="x") is not None


def test_maint_clears_an_ejection():
    f = Fleet(1)
    b0 = f.backends[0]
    f.eject(b0)
    assert f.sched.acquire(f.waiter()) == NO_BACKEND
    f.sched.set_admin(b0, MAINT)
    assert f.sched.ejected_count() == 0
    f.sched.set_admin(b0, READY)
    assert b0.health.in_rotation(T0) and f.sched.acquire(f.waiter()) is b0


# --- half-open trials


def test_half_open_backend_takes_a_single_trial():
    f = Fleet(4)
    b0 = f.backends[0]
    f.eject(b0)
    assert f.sched.acquire(f.waiter()) == NO_BACKEND
    f.clock.now = b0.health.ejected_until
    assert f.sched.acquire(f.waiter()) is b0
    waiter = f.waiter()
    assert isinstance(f.sched.acquire(waiter), Ticket)    # one trial at a time
    f.sched.succeeded(b0)                                 # the trial answered: readmitted
    assert waiter.dispatched == [b0]


def test_failed_trial_ejects_again_for_longer_and_lets_the_queue_go():
    f = Fleet(4)
    b0 = f.backends[0]
    first = f.eject(b0)
    f.clock.now = b0.health.ejected_until
    assert f.sched.acquire(f.waiter()) is b0
    waiter = f.waiter()
    f.sched.acquire(waiter)
    second = f.sched.failed(b0, local=False, reason="answered 503")
    assert second is not None and second > first
    assert waiter.let_go == 1


def test_failures_of_requests_sent_before_the_ejection_do_not_extend_it():
    f = Fleet(4, consecutive_failures=1)
    b0 = f.backends[0]
    for _ in range(3):
        f.sched.acquire(f.waiter())
    f.sched.failed(b0, local=True, reason="reset")
    until = b0.health.ejected_until
    f.clock.now += 5
    for _ in range(2):
        assert f.sched.failed(b0, local=True, reason="reset") is None
        f.sched.release(b0)
    assert b0.health.ejected_until == until and b0.health.ejections == 1


def test_waiting_for_an_ejection_to_end_asks_for_a_wake_up():
    f = Fleet(1, 1)
    b0, b1 = f.backends
    f.eject(b0)
    f.fill(b1)
    w = f.waiter()
    assert isinstance(f.sched.acquire(w), Ticket)
    assert b0.health.ejected_until in f.wakes
    f.clock.now = b0.health.ejected_until
    f.sched.dispatch()                  # the wake-up
    assert w.dispatched == [b0]


def test_abandoned_trial_lets_the_next_waiter_go():
    # The one trial request to a half-open backend is out and a second
    # request waits for the backend.  The trial's client leaves (exchange.py
    # calls release() with no verdict): the backend is free and no trial is
    # out, so the waiting request must be sent there now.
    f = Fleet(4)
    b0 = f.backends[0]
    f.eject(b0)
    f.clock.now = b0.health.ejected_until
    assert f.sched.acquire(f.waiter()) is b0      # the trial
    waiter = f.waiter()
    assert isinstance(f.sched.acquire(waiter), Ticket)
    f.sched.release(b0)
    assert waiter.dispatched == [b0]
    assert f.sched.queued == 0 and b0.in_flight == 1


def test_abandoned_lone_trial_lets_another_trial_go():
    f = Fleet(4)
    b0 = f.backends[0]
    f.eject(b0)
    f.clock.now = b0.health.ejected_until
    assert f.sched.acquire(f.waiter()) is b0
    f.sched.release(b0)
    assert f.sched.acquire(f.waiter()) is b0


def test_trial_abandoned_beside_an_older_request_is_cleared_when_that_one_ends():
    # An older request (sent before the ejection, already answered) is still
    # streaming; the trial's client leaves.  Once the older one ends too,
    # nothing is out there: the backend must take a trial again, not stay
    # half-open with no trial possible.
    f = Fleet(4)
    b0 = f.backends[0]
    assert f.sched.acquire(f.waiter()) is b0       # the older request
    f.sched.succeeded(b0)                          # its head arrived
    f.eject(b0)
    f.clock.now = b0.health.ejected_until
    assert f.sched.acquire(f.waiter()) is b0       # the trial
    f.sched.release(b0)                            # trial's client left: no verdict
    f.sched.release(b0)                            # the older stream ends
    assert b0.in_flight == 0
    assert f.sched.acquire(f.waiter()) is b0


# --- what probes need to tell busy from dead (see tests/test_probe_unit.py)


def test_in_flight_start_times_are_kept_oldest_first_and_the_oldest_goes_first():
    f = Fleet(3)
    b0 = f.backends[0]
    for _ in range(3):
        assert f.sched.acquire(f.waiter()) is b0
        f.clock.now += 1.5
    assert list(b0.in_flight_since) == [T0, T0 + 1.5, T0 + 3.0]
    f.sched.release(b0)
    assert list(b0.in_flight_since) == [T0 + 1.5, T0 + 3.0]
    f.sched.release(b0)
    f.sched.release(b0)
    assert not b0.in_flight_since and b0.in_flight == 0


def test_last_answer_is_any_answer_of_the_backend_but_not_a_connection_failure():
    f = Fleet(2, consecutive_failures=10, consecutive_5xx=10)
    b0 = f.backends[0]
    assert b0.last_answer is None
    f.sched.acquire(f.waiter())
    f.clock.now += 8
    f.sched.failed(b0, local=True, reason="reset")
    assert b0.last_answer is None
    f.sched.succeeded(b0)
    assert b0.last_answer == T0 + 8
    f.clock.now += 1
    f.sched.failed(b0, local=False, reason="answered 503")   # an answer all the same
    assert b0.last_answer == T0 + 9


# --- retries


def test_retry_avoids_the_backend_it_tried():
    f = Fleet(4, 4)
    for name in ("b0", "b1"):
        for _ in range(5):
            backend = f.sched.acquire(f.waiter(), frozenset({name}), retry=True)
            assert backend.name != name
            f.sched.release(backend)


def test_retry_waits_for_another_backend_rather_than_reuse_the_tried_one():
    f = Fleet(1, 1)
    b0, b1 = f.backends
    f.fill(b1)
    w = f.waiter()
    assert isinstance(f.sched.acquire(w, frozenset({"b0"}), retry=True), Ticket)
    assert b0.in_flight == 0
    f.sched.release(b1)
    assert w.dispatched == [b1]


def test_plain_request_behind_a_waiting_retry_takes_the_free_backend():
    f = Fleet(1, 1)
    b0, b1 = f.backends
    f.fill(b1)
    retry = f.waiter("retry")
    f.sched.acquire(retry, frozenset({"b0"}), retry=True)
    assert f.sched.acquire(f.waiter("plain")) is b0
    assert not retry.dispatched


def test_retry_reuses_the_only_backend_of_a_fleet_of_one():
    f = Fleet(2)
    b0 = f.backends[0]
    assert f.sched.acquire(f.waiter(), frozenset({"b0"}), retry=True) is b0


def test_retry_reuses_the_tried_backend_when_the_others_are_out():
    f = Fleet(2, 2)
    b0, b1 = f.backends
    f.sched.set_admin(b1, DRAIN)
    assert f.sched.acquire(f.waiter(), frozenset({"b0"}), retry=True) is b0


def test_retry_avoids_every_backend_it_tried():
    f = Fleet(2, 2, 2)
    for _ in range(6):
        backend = f.sched.acquire(f.waiter(), frozenset({"b0", "b2"}), retry=True)
        assert backend.name == "b1"
        f.sched.release(backend)


# --- choose: a backend for work that takes no slot


class RecordingPolicy:
    """Picks the last candidate and keeps what it was offered."""
    name = "recording"

    def __init__(self):
        self.offered: list[list[str]] = []

    def pick(self, candidates):
        self.offered.append([b.name for b in candidates])
        return candidates[-1]


def test_choose_is_the_policys_pick_among_the_rotation_whatever_the_limits():
    f = Fleet(1, 1, 1)
    b0, b1, b2 = f.backends
    f.sched.set_admin(b2, DRAIN)
    f.sched.acquire(f.waiter())
    f.sched.acquire(f.waiter())
    queued = f.waiter()
    assert isinstance(f.sched.acquire(queued), Ticket)      # no slot anywhere
    f.sched.policy = policy = RecordingPolicy()
    assert f.sched.choose() is b1
    assert policy.offered == [["b0", "b1"]]                 # full ones too, not the drained
    assert [b.in_flight for b in f.backends] == [1, 1, 0]   # nothing taken
    assert [b.requests for b in f.backends] == [1, 1, 0]
    assert f.sched.queued == 1 and not queued.dispatched    # the queue is not touched


def test_choose_with_least_conn_takes_the_less_loaded_even_when_full():
    f = Fleet(1, 4)
    b0, b1 = f.backends
    for _ in range(3):
        f.sched.acquire(f.waiter())
    assert (b0.in_flight, b1.in_flight) == (1, 2)   # b0 is full
    assert all(f.sched.choose() is b0 for _ in range(5))


def test_choose_avoids_what_it_tried_while_another_is_in_rotation():
    f = Fleet(2, 2, 2)
    for _ in range(6):
        assert f.sched.choose(frozenset({"b0", "b2"})).name == "b1"
    f.sched.set_admin(f.backends[1], MAINT)
    assert {f.sched.choose(frozenset({"b0", "b2"})).name for _ in range(20)} == {"b0", "b2"}
    f.sched.set_admin(f.backends[2], MAINT)
    assert f.sched.choose(frozenset({"b0"})).name == "b0"   # the only one left


def test_choose_skips_an_ejected_backend():
    f = Fleet(2, 2)
    b0, b1 = f.backends
    f.eject(b0)
    assert all(f.sched.choose() is b1 for _ in range(5))


def test_choose_with_nothing_in_rotation_is_none_and_counted():
    f = Fleet(1, 1)
    f.sched.set_admin(f.backends[0], MAINT)
    f.eject(f.backends[1])
    assert f.sched.choose() is None and f.sched.choose(frozenset({"b0"})) is None
    assert f.sched.snapshot()["no_backend"] == 2


# --- random sequences of events

KINDS = ("arrive",) * 5 + ("finish",) * 4 + ("cancel", "advance", "advance", "admin", "probe")
OUTCOMES = ("ok", "ok", "ok", "local", "5xx", "abandon", "abandon", "retry_local", "retry_5xx")
STEPS = (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 12.0)      # multiples of 1/4: exact in binary
STATES = (READY, READY, DRAIN, MAINT)
SLOW_START = 6.0     # ramp steps at multiples of 6/limit: exact for limits 1..4

events_st = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 63), st.integers(0, 63)),
                     min_size=30, max_size=100)


@st.composite
def fleets(draw, policy: str | None = None, slow_start: float | None = None):
    return dict(
        limits=draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 3)), min_size=1,
                             max_size=4)),
        policy=policy or draw(st.sampled_from(sorted(POLICIES))),
        slow_start=draw(st.sampled_from([0.0, SLOW_START])) if slow_start is None else slow_start,
        jitter=draw(st.sampled_from([0.0, 0.5])),
        max_ejected_percent=draw(st.sampled_from([0, 50, 100])),
        failures=draw(st.integers(1, 3)),
        queue_limit=draw(st.integers(0, 4)),
        seed=draw(st.integers(0, 2**16)),
    )


class Request:
    """One client request through the scheduler, as exchange.py drives it."""

    def __init__(self, sim: "Sim", rid: int):
        self.sim = sim
        self.rid = rid
        self.state = "new"      # queued, running, done, cancelled, no_backend, queue_full
        self.backend: Backend | None = None
        self.ticket: Ticket | None = None
        self.tried: list[str] = []
        self.attempt = 0
        self.trial_epoch: int | None = None
        self.verdict = False
        self.dispatches = 0     # dispatch() calls from the scheduler
        self.starts = 0         # slots given, from the queue or at once
        self.let_go = 0

    # the Waiter protocol
    def dispatch(self, backend: Backend) -> None:
        assert self.state == "queued", f"request {self.rid} dispatched while {self.state}"
        self.dispatches += 1
        self.ticket = None
        self.sim.started(self, backend)

    def no_backend(self) -> None:
        assert self.state == "queued", f"request {self.rid} let go while {self.state}"
        self.let_go += 1
        self.ticket = None
        self.state = "no_backend"


class CheckingPolicy:
    """Wraps a policy: what the scheduler offers must be in the rotation with
    room; least_conn's choice must have a minimal load among them."""

    def __init__(self, inner, sim: "Sim"):
        self.inner = inner
        self.name = inner.name
        self.sim = sim

    def pick(self, candidates):
        now = self.sim.clock()
        assert candidates
        for b in candidates:
            assert b.health.in_rotation(now), f"{b.name} offered while out of the rotation"
            assert b.health.has_room(now, b.in_flight, b.max_concurrency), \
                f"{b.name} offered while full"
        chosen = self.inner.pick(candidates)
        assert chosen in candidates
        if self.name == "least_conn":
            least = min(b.in_flight / b.weight for b in candidates)
            assert chosen.in_flight / chosen.weight == least
        return chosen


class Sim:
    """A scheduler over a random fleet, driven event by event.

    Wake-ups are served as balancer.py does: one pending timer, the earliest
    asked for, which calls dispatch() when the clock reaches it."""

    def __init__(self, fleet: dict):
        self.clock = Clock()
        self.target = self.clock.now
        self.pending_wake: float | None = None
        self.passive = passive(consecutive_failures=fleet["failures"],
                               consecutive_5xx=fleet["failures"], base_ejection=4.0,
                               max_ejection=10.0, jitter=fleet["jitter"],
                               max_ejected_percent=fleet["max_ejected_percent"])
        self.backends = [make_backend(i, m, w, passive_cfg=self.passive,
                                      slow_start=fleet["slow_start"])
                         for i, (m, w) in enumerate(fleet["limits"])]
        rng = random.Random(fleet["seed"])
        self.policy = CheckingPolicy(make(fleet["policy"], random.Random(rng.random())), self)
        self.sched = Scheduler(self.backends, self.policy, queue_limit=fleet["queue_limit"],
                               passive=self.passive, clock=self.clock,
                               rng=random.Random(rng.random()), wake_at=self._wake_at)
        self.requests: list[Request] = []
        self.first_starts: list[int] = []     # rid of each plain first attempt, in start order
        self.start_problems: list[str] = []
        self.ejection_times: list[tuple[int, float]] = []   # (ejection number, seconds)

    # --- time

    def _wake_at(self, when: float) -> None:
        if self.pending_wake is None or when < self.pending_wake:
            self.pending_wake = when

    def _fire_wakes(self, until: float) -> None:
        while self.pending_wake is not None and self.pending_wake <= until:
            self.clock.now = max(self.clock.now, self.pending_wake)
            self.pending_wake = None
            self.sched.dispatch()

    def advance(self, dt: float) -> None:
        self.target += dt
        self._fire_wakes(self.target)
        self.clock.now = self.target

    # --- requests

    def running(self) -> list[Request]:
        return [r for r in self.requests if r.state == "running"]

    def queued(self) -> list[Request]:
        return [r for r in self.requests if r.state == "queued"]

    def arrive(self) -> Request:
        r = Request(self, len(self.requests))
        self.requests.append(r)
        self._acquire(r, retry=False)
        return r

    def _acquire(self, r: Request, retry: bool) -> None:
        r.state = "acquiring"
        result = self.sched.acquire(r, frozenset(r.tried), retry=retry)
        if isinstance(result, Backend):
            self.started(r, result)
        elif isinstance(result, Ticket):
            assert result.waiter is r
            r.state, r.ticket = "queued", result
        elif result == QUEUE_FULL:
            assert not retry, "a retry was refused for a full queue"
            r.state = "queue_full"
        else:
            assert result == NO_BACKEND
            now = self.clock()
            assert not any(b.health.in_rotation(now) for b in self.backends), \
                "NO_BACKEND with a backend in the rotation"
            r.state = "no_backend"

    def started(self, r: Request, backend: Backend) -> None:
        """Called the moment the scheduler gives `r` a slot on `backend`."""
        now = self.clock()
        health = backend.health
        r.state, r.backend, r.verdict = "running", backend, False
        r.starts += 1
        if health.ejected:
            # a half-open trial: at most one without a verdict per ejection
            if not health.half_open(now):
                self.start_problems.append(f"{backend.name} got request {r.rid} while ejected")
            others = [o.rid for o in self.running() if o is not r and o.backend is backend
                      and o.trial_epoch == health.ejections_total and not o.verdict]
            if others:
                self.start_problems.append(f"{backend.name} got trial {r.rid} while trial(s) "
                                           f"{others} still out")
            r.trial_epoch = health.ejections_total
        else:
            r.trial_epoch = None
            limit = health.limit(now, backend.max_concurrency)
            if backend.in_flight > limit:
                self.start_problems.append(f"{backend.name} started request {r.rid} with "
                                           f"{backend.in_flight} in flight, limit {limit}")
        if r.attempt == 0:
            self.first_starts.append(r.rid)

    def finish(self, r: Request, outcome: str) -> None:
        b = r.backend
        assert b is not None
        if outcome == "ok":
            r.verdict = True
            self.sched.succeeded(b)
        elif outcome in ("local", "retry_local", "5xx", "retry_5xx"):
            r.verdict = True
            seconds = self.sched.failed(b, local=outcome.endswith("local"), reason=outcome)
            if seconds is not None:
                self.ejection_times.append((b.health.ejections, seconds))
        r.tried.append(b.name)
        r.state, r.backend = "releasing", None
        self.sched.release(b)   # an abandoned attempt (client left) is only this
        if outcome.startswith("retry"):
            r.attempt += 1
            self._acquire(r, retry=True)
        else:
            r.state = "done"

    def cancel(self, r: Request) -> None:
        self.sched.cancel(r.ticket)
        r.state, r.ticket = "cancelled", None

    # --- one event

    def step(self, kind: str, i: int, j: int) -> None:
        if kind == "arrive":
            self.arrive()
        elif kind == "finish":
            running = self.running()
            if running:
                self.finish(running[i % len(running)], OUTCOMES[j % len(OUTCOMES)])
        elif kind == "cancel":
            queued = self.queued()
            if queued:
                self.cancel(queued[i % len(queued)])
        elif kind == "advance":
            self.advance(STEPS[i % len(STEPS)])
        elif kind == "admin":
            self.sched.set_admin(self.backends[i % len(self.backends)], STATES[j % len(STATES)])
        elif kind == "probe":
            backend = self.backends[i % len(self.backends)]
            if j % 4 == 3:  # connected, no answer: inconclusive while the backend works
                self.sched.probed(backend, False, "no answer", no_answer=True, first_byte=10.0)
            else:
                self.sched.probed(backend, j % 3 != 0, "probe")
        self._fire_wakes(self.clock.now)     # a timer already due runs next

    def settle(self) -> None:
        """Finish everything, give every backend back, let time pass."""
        for b in self.backends:
            self.sched.set_admin(b, READY)
            self.sched.probed(b, True, "probe")
        for _ in range(4 * len(self.requests) + 10):
            running = self.running()
            if not running and not self.queued():
                return
            for r in running:
                self.finish(r, "ok")
            self.advance(20.0)

    # --- invariants

    def check_limits(self) -> None:
        for b in self.backends:
            holding = sum(1 for r in self.requests if r.state == "running" and r.backend is b)
            assert b.in_flight >= 0, f"{b.name} in_flight {b.in_flight}"
            assert b.in_flight <= b.max_concurrency, \
                f"{b.name} in_flight {b.in_flight} > max_concurrency {b.max_concurrency}"
            assert b.in_flight == holding, f"{b.name} in_flight {b.in_flight}, holders {holding}"
            # one start time per request in flight, oldest first (for busy-or-dead probes)
            assert len(b.in_flight_since) == b.in_flight, (b.name, list(b.in_flight_since))
            assert list(b.in_flight_since) == sorted(b.in_flight_since), b.name

    def check_ejections(self) -> None:
        assert self.sched.ejected_count() <= self.sched.max_ejected()
        p = self.passive
        for n, seconds in self.ejection_times:
            nominal = min(p.max_ejection, p.base_ejection * n)
            assert nominal * (1 - p.jitter) - 1e-9 <= seconds <= nominal + 1e-9, (n, seconds)

    def check_queue(self) -> None:
        assert self.sched.queued == len(self.queued())
        assert all(r.starts <= r.attempt + 1 for r in self.requests)
        assert all(r.dispatches <= r.starts for r in self.requests)
        assert self.first_starts == sorted(self.first_starts), \
            f"plain requests started out of arrival order: {self.first_starts}"

    def check_no_idle_slot_while_waiting(self) -> None:
        now = self.clock()
        rotation = [b for b in self.backends if b.health.in_rotation(now)]
        for r in self.queued():
            pool = [b for b in rotation if b.name not in r.tried] or rotation
            free = [b.name for b in pool
                    if b.health.has_room(now, b.in_flight, b.max_concurrency)]
            assert not free, f"request {r.rid} waits while {free} have room"


def run(fleet: dict, events, *checks: str) -> Sim:
    sim = Sim(fleet)
    for kind, i, j in events:
        sim.step(kind, i, j)
        for check in checks:
            getattr(sim, check)()
    return sim


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fleet=fleets(), events=events_st)
def test_no_backend_ever_exceeds_its_max_concurrency(fleet, events):
    sim = run(fleet, events, "check_limits")
    sim.settle()
    sim.check_limits()
    assert all(b.in_flight == 0 for b in sim.backends)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(fleet=fleets(), events=events_st)
def test_ejections_stay_within_max_ejected_and_their_jittered_time(fleet, events):
    run(fleet, events, "check_ejections")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fleet=fleets(slow_start=SLOW_START), events=events_st)
def test_requests_start_only_within_the_ramped_limit_or_as_the_one_trial(fleet, events):
    sim = run(fleet, events)
    sim.settle()
    assert sim.start_problems == []


@settings(max_examples=150, deadline=None, derandomize=True)
@given(fleet=fleets(policy="least_conn"), events=events_st)
def test_least_conn_in_the_scheduler_picks_a_least_loaded_backend_with_room(fleet, events):
    # CheckingPolicy asserts on every pick
    run(fleet, events).settle()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(fleet=fleets(), events=events_st)
def test_queue_is_fifo_and_never_loses_or_duplicates_a_request(fleet, events):
    sim = run(fleet, events, "check_queue")
    sim.settle()
    sim.check_queue()
    assert sim.sched.queued == 0
    for r in sim.requests:
        assert r.state in ("done", "cancelled", "no_backend", "queue_full"), \
            f"request {r.rid} left {r.state}"
        assert r.let_go <= 1
        # every attempt got a slot exactly once, but the last if it never got one
        expected = r.attempt + 1 if r.state == "done" else r.attempt
        assert r.starts == expected, (r.rid, r.state, r.attempt, r.starts)


# The trial to a half-open backend is out, a second request waits, and the
# trial's client leaves.
ABANDONED_TRIAL = dict(
    fleet=dict(limits=[(4, 1)], policy="least_conn", slow_start=0.0, jitter=0.0,
               max_ejected_percent=100, failures=1, queue_limit=4, seed=0),
    events=[("arrive", 0, 0),
            ("finish", 0, OUTCOMES.index("local")),        # ejected for 4 s
            ("advance", STEPS.index(5.0), 0),              # half-open
            ("arrive", 0, 0),                              # the trial
            ("arrive", 0, 0),                              # waits
            ("finish", 0, OUTCOMES.index("abandon"))])     # the trial's client leaves


@settings(max_examples=300, deadline=None, derandomize=True)
@example(**ABANDONED_TRIAL)
@given(fleet=fleets(), events=events_st)
def test_no_request_waits_while_a_backend_it_may_use_has_room(fleet, events):
    run(fleet, events, "check_no_idle_slot_while_waiting")
