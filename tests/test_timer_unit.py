"""lb.wire.timer.Deadline on real event loops (asyncio and uvloop), with short times.

Lower bounds are checked against loop.time() (a stall can only make a timer
later); upper bounds only by ordering against marker timers, never against
wall-clock durations.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from lb.wire.timer import Deadline

SLACK = 0.005  # uvloop timers have millisecond resolution


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    loop = asyncio.new_event_loop() if request.param == "asyncio" else uvloop.new_event_loop()
    yield loop
    loop.close()


def run_for(loop, seconds: float) -> None:
    loop.run_until_complete(asyncio.sleep(seconds))


class Recorder:
    def __init__(self, loop):
        self.loop = loop
        self.events: list[str] = []
        self.fired_at: list[float] = []

    def fire(self) -> None:
        self.events.append("fire")
        self.fired_at.append(self.loop.time())

    def mark(self, label: str, delay: float) -> None:
        self.loop.call_later(delay, self.events.append, label)

    @property
    def fires(self) -> int:
        return self.events.count("fire")


def test_fires_once_after_set(loop):
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    assert not d.active
    t0 = loop.time()
    d.set(0.02)
    assert d.active
    rec.mark("end", 0.07)
    run_for(loop, 0.08)
    assert rec.events == ["fire", "end"]
    assert rec.fired_at[0] >= t0 + 0.02 - SLACK
    assert not d.active


def test_pushing_later_fires_once_at_the_later_time(loop):
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    d.set(0.03)
    pushed_at = []

    def push():
        pushed_at.append(loop.time())
        d.set(0.08)
    loop.call_later(0.01, push)        # now due at ~0.09
    rec.mark("after-original", 0.05)   # the original due time has passed
    rec.mark("end", 0.13)
    run_for(loop, 0.14)
    assert rec.events == ["after-original", "fire", "end"]
    assert rec.fired_at[0] >= pushed_at[0] + 0.08 - SLACK


def test_many_pushes_fire_once_after_the_last(loop):
    """The hot path: every body chunk pushes the idle deadline forward."""
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    last = []

    def push(n):
        last.append(loop.time())
        d.set(0.03)
        if n:
            loop.call_later(0.005, push, n - 1)
    push(8)
    rec.mark("end", 0.14)
    run_for(loop, 0.15)
    assert rec.events == ["fire", "end"]
    assert len(last) == 9
    assert rec.fired_at[0] >= last[-1] + 0.03 - SLACK


def test_moving_earlier_reschedules(loop):
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    t0 = loop.time()
    d.set(0.10)
    d.set(0.02)
    rec.mark("mid", 0.06)     # well before the first setting
    rec.mark("end", 0.13)     # well after it: no second firing
    run_for(loop, 0.14)
    assert rec.events == ["fire", "mid", "end"]
    assert rec.fired_at[0] >= t0 + 0.02 - SLACK


def test_latest_setting_wins_even_when_earlier_than_a_previous_one(loop):
    """set(a); set(c); set(b) with a < b < c fires once, at b."""
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    t0 = loop.time()
    d.set(0.02)
    d.set(0.14)
    d.set(0.06)
    rec.mark("before-b", 0.04)
    rec.mark("before-c", 0.10)
    rec.mark("end", 0.16)
    run_for(loop, 0.17)
    assert rec.events == ["before-b", "fire", "before-c", "end"]
    assert rec.fired_at[0] >= t0 + 0.06 - SLACK


def test_cancel_prevents_firing(loop):
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    d.set(0.02)
    d.cancel()
    assert not d.active
    rec.mark("end", 0.06)
    run_for(loop, 0.07)
    assert rec.events == ["end"]


def test_cancel_after_a_push_prevents_the_rearmed_timer(loop):
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    d.set(0.03)
    loop.call_later(0.01, d.set, 0.06)    # due ~0.07: the 0.03 timer re-arms itself
    loop.call_later(0.045, d.cancel)      # after the re-arm, before the new due time
    rec.mark("end", 0.12)
    run_for(loop, 0.13)
    assert rec.events == ["end"]
    assert not d.active


def test_cancel_is_idempotent_and_safe_when_unset(loop):
    d = Deadline(loop, lambda: None)
    d.cancel()
    d.set(1.0)
    d.cancel()
    d.cancel()
    assert not d.active


def test_set_after_cancel_and_after_firing_fires_again(loop):
    rec = Recorder(loop)
    d = Deadline(loop, rec.fire)
    d.set(0.02)
    d.cancel()
    d.set(0.02)
    run_for(loop, 0.05)
    assert rec.fires == 1
    d.set(0.02)
    assert d.active
    run_for(loop, 0.05)
    assert rec.fires == 2


def test_set_from_inside_the_callback(loop):
    rec = Recorder(loop)

    def fire():
        rec.fire()
        if rec.fires < 3:
            d.set(0.01)
    d = Deadline(loop, fire)
    d.set(0.01)
    rec.mark("end", 0.1)
    run_for(loop, 0.11)
    assert rec.events == ["fire", "fire", "fire", "end"]
    assert not d.active
