"""bench.progress: the fraction shown only moves forward, whatever the steps take."""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.progress import Progress, Step


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _bar_percentages(text: str) -> list[int]:
    return [int(p) for p in re.findall(r"\r\[[#.]+\]\s+(\d+)%", text)]


def _plan() -> list[Step]:
    return [Step("starting the simulated fleet", 2.0, run=False),
            Step("least_conn, 10 callers", 5.0), Step("haproxy, 10 callers", 5.0)]


def test_a_run_that_overruns_its_estimate_does_not_pull_the_bar_back():
    """What the old bar did: the time after a run ended counted into the next one twice."""
    clock, term = Clock(), Terminal()
    p = Progress(_plan(), term, clock)
    p.begin("starting the simulated fleet")
    clock.now += 3.0                       # over its 2 s estimate
    p.tick()
    p.end()
    p.begin("least_conn, 10 callers")
    clock.now += 9.0                       # far over its 5 s
    p.tick()
    p.end("54 calls")
    clock.now += 1.0                       # between runs: waiting for the fleet
    p.tick()
    p.begin("haproxy, 10 callers")
    p.tick()
    clock.now += 1.0
    p.tick()
    p.end("54 calls")
    shown = _bar_percentages(term.getvalue())
    assert shown == sorted(shown) and shown[-1] == 100, shown
    assert "bench: least_conn, 10 callers: 54 calls\n" in term.getvalue()


def test_plain_lines_number_the_runs_and_say_the_share_done():
    clock, out = Clock(), io.StringIO()
    p = Progress(_plan(), out, clock)
    p.begin("starting the simulated fleet")
    clock.now += 2.0
    p.end()
    p.begin("least_conn, 10 callers")
    clock.now += 11.0                      # a line every 10 s within a long run
    p.tick()
    p.end("54 calls")
    p.begin("haproxy, 10 callers")
    lines = out.getvalue().splitlines()
    assert lines[0] == "bench: starting the simulated fleet  (0% done, ~12 s left)"
    assert lines[1].startswith("bench: [1/2] least_conn, 10 callers  (16% done, ")
    assert lines[2].startswith("bench:   ... least_conn, 10 callers: 11 s into it, 58% done")
    assert lines[3] == "bench:     54 calls"
    assert lines[4].startswith("bench: [2/2] haproxy, 10 callers  (58% done, ")


def test_the_plan_and_the_steps_taken_must_agree():
    p = Progress(_plan(), io.StringIO(), Clock())
    with pytest.raises(AssertionError, match="the plan has 'starting the simulated fleet'"):
        p.begin("least_conn, 10 callers")
    with pytest.raises(ValueError):
        Progress([], io.StringIO(), Clock())


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 30), st.lists(st.floats(0, 40), max_size=6),
                          st.booleans()), min_size=1, max_size=8),
       st.booleans())
def test_the_fraction_never_decreases_and_ends_at_one(steps, tty):
    """Any estimates, any real durations (ticks at any times, early or late ends)."""
    clock = Clock()
    stream = Terminal() if tty else io.StringIO()
    plan = [Step(f"step {i}", est, run=run) for i, (est, _, run) in enumerate(steps)]
    p = Progress(plan, stream, clock)
    seen = [p.fraction()]
    for i, (_, waits, _) in enumerate(steps):
        p.begin(f"step {i}")
        seen.append(p.fraction())
        for w in waits:
            clock.now += w
            p.tick()
            seen.append(p.fraction())
        p.end("done" if i % 2 else None)
        seen.append(p.fraction())
        clock.now += 0.5                   # between steps
        seen.append(p.fraction())
    assert seen == sorted(seen)
    assert seen[0] == 0.0 and seen[-1] == 1.0
    assert p.seconds_left() == 0.0
    if tty:
        shown = _bar_percentages(stream.getvalue())
        assert shown == sorted(shown) and shown[-1] == 100
