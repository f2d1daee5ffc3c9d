"""Sans-io tests for active health probes: lb.probe.verdict() on what TTS
servers answer, and how probe results move a backend in and out of the
rotation (Health.probed, Scheduler.probed), a busy backend's unanswered
probes included (tests/test_busy.py has the real-process side)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.scheduling.backend import Backend
from lb.control.config import Active, BackendConfig, Passive
from lb.scheduling.health import MAINT, READY, Health
from lb.scheduling.policy import LeastConn
from lb.scheduling.probe import verdict
from lb.scheduling.scheduler import NO_BACKEND, Scheduler, Ticket

T0 = 1000.0
PASSIVE = Passive(consecutive_failures=1, consecutive_5xx=1, statuses=(500, 502, 503, 504),
                  base_ejection=10.0, max_ejection=120.0, jitter=0.0, max_ejected_percent=100)


def active(rise: int = 2, fall: int = 3) -> Active:
    return Active(interval=2.0, timeout=1.0, rise=rise, fall=fall)


def health(rise: int = 2, fall: int = 3, slow_start: float = 0.0) -> Health:
    return Health(PASSIVE, active(rise, fall), slow_start)


# --- verdict()


@pytest.mark.parametrize("status, body", [
    (200, b'{"status":"healthy"}'),
    (200, b'{"status":"ok"}'),
    (200, b'{"status":"OK"}'),
    (200, b'{"status":"healthy","model_loaded":true}'),
    (200, b"OK"),
    (200, b""),
    (204, b""),
    (200, b"[1, 2]"),
    (200, b"{not json"),
])
def test_verdict_ready(status, body):
    ok, reason = verdict(status, body)
    assert ok is True
    assert str(status) in reason


def test_verdict_503_model_not_loaded_is_not_ready_and_says_why():
    ok, reason = verdict(503, b'{"detail":"Model not loaded"}')
    assert ok is False
    assert "503" in reason and "Model not loaded" in reason


@pytest.mark.parametrize("status, body", [
    (200, b'{"status":"initializing"}'),
    (200, b'{"status":"loading"}'),
    (200, b'{"status":"healthy","model_loaded":false}'),
    (200, b'{"status":"ok","model_loaded":false}'),
    (500, b""),
    (500, b'{"status":"healthy"}'),
    (503, b"Service Unavailable"),
    (404, b'{"detail":"Not Found"}'),
    (301, b""),
])
def test_verdict_not_ready(status, body):
    ok, reason = verdict(status, body)
    assert ok is False
    assert str(status) in reason


def test_verdict_names_the_status_a_loading_server_reports():
    ok, reason = verdict(200, b'{"status":"initializing"}')
    assert not ok and "initializing" in reason


def test_verdict_names_model_loaded_false():
    ok, reason = verdict(200, b'{"status":"healthy","model_loaded":false}')
    assert not ok and "model_loaded" in reason


@settings(max_examples=200, deadline=None, derandomize=True)
@given(status=st.integers(100, 599), body=st.binary(max_size=64))
def test_verdict_never_calls_a_non_2xx_ready(status, body):
    ok, reason = verdict(status, body)
    assert isinstance(reason, str) and reason
    if not 200 <= status < 300:
        assert ok is False


# --- probe results and the rotation


def test_first_failing_probe_takes_the_backend_out_at_once():
    h = health(fall=3)
    assert h.probed(T0, False, "answered 503 (Model not loaded)") == "down"
    assert not h.in_rotation(T0)
    assert h.state(T0, 0) == "down"
    assert "Model not loaded" in h.probe_reason


def test_first_passing_probe_counts_at_once():
    h = health(rise=5)
    assert h.probed(T0, True, "answered 200") == "up"
    assert h.probe_up is True and h.in_rotation(T0)


def test_rise_passing_probes_in_a_row_bring_it_back():
    h = health(rise=2)
    h.probed(T0, False, "x")
    assert h.probed(T0 + 2, True, "ok") is None
    assert not h.in_rotation(T0 + 2)
    assert h.probed(T0 + 4, True, "ok") == "up"
    assert h.in_rotation(T0 + 4)


def test_fall_failing_probes_in_a_row_take_it_out():
    h = health(fall=3)
    h.probed(T0, True, "ok")
    assert h.probed(T0 + 2, False, "x") is None
    assert h.probed(T0 + 4, False, "x") is None
    assert h.in_rotation(T0 + 4)
    assert h.probed(T0 + 6, False, "x") == "down"
    assert not h.in_rotation(T0 + 6)


def test_an_interrupted_streak_starts_over():
    h = health(rise=2)
    h.probed(T0, False, "x")
    h.probed(T0 + 2, True, "ok")
    h.probed(T0 + 4, False, "x")
    assert h.probed(T0 + 6, True, "ok") is None
    assert not h.in_rotation(T0 + 6)


def test_passing_probe_readmits_a_half_open_backend():
    h = health()
    h.probed(T0, True, "ok")
    h.eject(T0, random.Random(0))
    now = h.ejected_until + 0.5
    assert h.probed(now, True, "ok") == "readmitted"
    assert not h.ejected and h.in_rotation(now)


def test_passing_probe_does_not_cut_an_ejection_short():
    h = health()
    h.probed(T0, True, "ok")
    h.eject(T0, random.Random(0))
    now = h.ejected_until - 0.5
    assert h.probed(now, True, "ok") is None
    assert h.ejected and not h.in_rotation(now)


def test_probe_coming_up_readmits_a_half_open_backend():
    h = health(rise=2)
    h.probed(T0, False, "x")
    h.eject(T0, random.Random(0))
    now = h.ejected_until + 1
    h.probed(now, True, "ok")
    assert h.probed(now + 2, True, "ok") == "up"
    assert not h.ejected and h.in_rotation(now + 2)


def test_probe_coming_up_starts_slow_start():
    h = health(rise=1, slow_start=10.0)
    h.probed(T0, False, "x")
    assert h.probed(T0 + 2, True, "ok") == "up"
    assert h.limit(T0 + 2, 4) == 1
    assert h.limit(T0 + 12, 4) == 4


def test_maint_forgets_the_probe_verdict_and_the_next_one_counts_at_once():
    h = health(rise=3)
    h.probed(T0, False, "x")
    h.set_admin(T0, MAINT)
    h.set_admin(T0, READY)
    assert h.probe_up is None and h.in_rotation(T0)
    assert h.probed(T0 + 2, False, "x") == "down"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(rise=st.integers(1, 4), fall=st.integers(1, 4), results=st.lists(st.booleans(), max_size=40))
def test_probe_standing_follows_rise_and_fall(rise, fall, results):
    h = health(rise=rise, fall=fall)
    up, streak = None, 0
    for i, ok in enumerate(results):
        h.probed(T0 + 2 * i, ok, "r")
        # reference model: the first result counts; then `rise`/`fall` in a row flip it
        if up is None:
            up, streak = ok, 0
        elif ok == up:
            streak = 0
        else:
            streak += 1
            if streak >= (rise if ok else fall):
                up, streak = ok, 0
        assert h.probe_up is up
        assert h.in_rotation(T0 + 2 * i) is up


# --- through the scheduler


class StubPool:
    def snapshot(self) -> dict:
        return {}


class Waiter:
    def __init__(self):
        self.dispatched: list[Backend] = []
        self.let_go = 0

    def dispatch(self, backend: Backend) -> None:
        self.dispatched.append(backend)

    def no_backend(self) -> None:
        self.let_go += 1


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def fleet(n: int, max_concurrency: int = 1, fall: int = 1):
    clock = Clock()
    backends = [Backend(BackendConfig(name=f"b{i}", url=f"http://127.0.0.1:{7000 + i}",
                                      host="127.0.0.1", port=7000 + i,
                                      max_concurrency=max_concurrency, health_path="/health"),
                        StubPool(), passive=PASSIVE, active=active(rise=1, fall=fall),
                        slow_start=0.0)  # type: ignore[arg-type]
                for i in range(n)]
    sched = Scheduler(backends, LeastConn(random.Random(0)), queue_limit=10, passive=PASSIVE,
                      clock=clock, rng=random.Random(0))
    return sched, backends, clock


def test_backend_probed_down_gets_no_requests():
    sched, (b0, b1), _ = fleet(2, max_concurrency=4)
    sched.probed(b0, False, "answered 503")
    for _ in range(4):
        assert sched.acquire(Waiter()) is b1


def test_all_probed_down_means_no_backend():
    sched, (b0,), _ = fleet(1)
    sched.probed(b0, False, "answered 503")
    assert sched.acquire(Waiter()) == NO_BACKEND


def test_probe_down_of_the_last_backend_lets_the_queue_go():
    sched, (b0,), _ = fleet(1)
    assert sched.acquire(Waiter()) is b0
    waiter = Waiter()
    assert isinstance(sched.acquire(waiter), Ticket)
    sched.probed(b0, False, "answered 503")
    assert waiter.let_go == 1 and not waiter.dispatched
    assert sched.queued == 0


def test_passing_probe_on_a_half_open_backend_dispatches_the_queue():
    sched, backends, clock = fleet(2)
    for b in backends:
        sched.probed(b, True, "answered 200")
    b0 = sched.acquire(Waiter())
    b1 = sched.acquire(Waiter())
    assert {b0, b1} == set(backends)
    sched.failed(b1, local=True, reason="reset")     # ejected for 10 s
    sched.release(b1)
    waiter = Waiter()
    assert isinstance(sched.acquire(waiter), Ticket)  # b0 full, b1 ejected
    clock.now = b1.health.ejected_until + 1
    sched.probed(b1, True, "answered 200")           # half-open + a passing probe
    assert waiter.dispatched == [b1]
    assert not b1.health.ejected


def test_first_passing_probe_readmits_a_backend_ejected_before_any_probe():
    h = health()
    h.eject(1000.0, random.Random(0))
    assert h.probed(h.ejected_until + 1, True, "answered 200") == "readmitted"
    assert not h.ejected and h.in_rotation(h.ejected_until + 1)


def test_verdict_reads_json_after_leading_whitespace():
    assert verdict(200, b'\n  {"status": "initializing"}') == (
        False, "answered 200 but status is 'initializing' (model not ready)")


# --- busy is not dead, through the scheduler (fall 3, interval 2 s: a window of 6 s)

FIRST_BYTE = 60.0
NO_ANSWER = "no answer within 1s (health.active.timeout)"


def busy_fleet(n: int = 1):
    sched, backends, clock = fleet(n, max_concurrency=1, fall=3)
    for b in backends:
        sched.probed(b, True, "answered 200")
    return sched, backends, clock


def unanswered(sched, backend, clock, probes: int, every: float = 2.0) -> None:
    for _ in range(probes):
        clock.now += every
        sched.probed(backend, False, NO_ANSWER, no_answer=True, first_byte=FIRST_BYTE)


def test_unanswered_probes_of_a_backend_working_on_a_request_are_inconclusive():
    sched, (b0,), clock = busy_fleet()
    assert sched.acquire(Waiter()) is b0       # an 8 s job: 4 probes time out meanwhile
    unanswered(sched, b0, clock, 4)
    snap = b0.snapshot(clock.now)
    assert snap["state"] == "busy" and snap["probe"]["busy"] is True
    assert snap["probe"]["up"] is True and NO_ANSWER in snap["probe"]["last"]
    assert b0.health.in_rotation(clock.now) and b0.health.probe_streak == 0
    sched.succeeded(b0)                        # the job is answered
    sched.release(b0)
    clock.now += 1
    sched.probed(b0, True, "answered 200")
    assert b0.snapshot(clock.now)["state"] == "up"


def test_a_refused_probe_counts_even_while_requests_are_in_flight_and_answered():
    sched, (b0,), clock = busy_fleet()
    sched.acquire(Waiter())
    sched.succeeded(b0)                        # answered just now
    for _ in range(3):
        clock.now += 2
        sched.probed(b0, False, "cannot connect: Connection refused", no_answer=False,
                     first_byte=FIRST_BYTE)
    assert b0.health.probe_up is False and b0.snapshot(clock.now)["state"] == "down"


def test_unanswered_probes_count_once_nothing_is_in_flight():
    sched, (b0,), clock = busy_fleet()
    sched.acquire(Waiter())
    sched.succeeded(b0)
    sched.release(b0)                          # an answer just now, but nothing in flight
    unanswered(sched, b0, clock, 2)
    assert b0.health.probe_up is True and b0.health.probe_streak == 2
    unanswered(sched, b0, clock, 1)
    assert b0.health.probe_up is False


def test_a_request_older_than_first_byte_with_no_recent_answer_does_not_hold_probes_off():
    sched, (b0,), clock = busy_fleet()
    sched.acquire(Waiter())
    unanswered(sched, b0, clock, 29)           # 58 s: younger than first_byte, all busy
    assert b0.health.probe_up is True and b0.health.probe_busy
    unanswered(sched, b0, clock, 2)            # 62 s: counted
    assert b0.health.probe_up is True and b0.health.probe_streak == 2
    unanswered(sched, b0, clock, 1)
    assert b0.health.probe_up is False


def test_a_recent_answer_keeps_an_old_request_from_making_probes_count():
    sched, (b0,), clock = busy_fleet()
    sched.acquire(Waiter())                    # a long stream: started at T0 ...
    clock.now += 100
    sched.succeeded(b0)                        # ... its head came at T0 + 100; still in flight
    unanswered(sched, b0, clock, 3)            # up to 6 s since that answer: the window
    assert b0.health.probe_busy and b0.health.probe_streak == 0
    unanswered(sched, b0, clock, 2)            # past it, and the request is 110 s old
    assert b0.health.probe_up is True and b0.health.probe_streak == 2
    unanswered(sched, b0, clock, 1)
    assert b0.health.probe_up is False


def test_without_first_byte_only_a_recent_answer_makes_a_probe_inconclusive():
    sched, (b0,), clock = busy_fleet()
    sched.acquire(Waiter())
    for _ in range(3):
        clock.now += 2
        sched.probed(b0, False, NO_ANSWER, no_answer=True)
    assert b0.health.probe_up is False


@settings(max_examples=200, deadline=None, derandomize=True)
@given(results=st.lists(st.sampled_from(["pass", "fail", "busy"]), min_size=1, max_size=40),
       rise=st.integers(1, 4), fall=st.integers(1, 4))
def test_busy_probes_leave_rise_and_fall_as_if_they_never_happened(results, rise, fall):
    h, reference = health(rise, fall), health(rise, fall)
    for i, result in enumerate(results):
        if result == "busy":
            h.probe_was_busy("no answer while busy")
            assert h.state(T0 + 2 * i, 1) in ("busy", "down")
        else:
            h.probed(T0 + 2 * i, result == "pass", "r")
            reference.probed(T0 + 2 * i, result == "pass", "r")
        assert (h.probe_up, h.probe_streak) == (reference.probe_up, reference.probe_streak)

