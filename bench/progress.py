"""A progress display for a bench whose whole plan is known up front; it only moves forward.

The plan is every step the bench will take -- starting the fleet, then each (level, target)
run, HAProxy's included -- with an estimate of its wall seconds.  The fraction shown is
(the estimates of the finished steps + the time spent in the current one, at most its
estimate) / the sum of all estimates, and never less than a fraction already shown.  A step
that runs over its estimate holds the bar at that step's end; one that ends early jumps it
forward; nothing moves it back.

On a terminal (stderr) it is one line redrawn in place; otherwise a line per step and one
every PLAIN_EVERY seconds within a long step, each with the fraction done.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

WIDTH = 100          # of the progress line on a terminal
BAR = 28             # characters of the bar itself
PLAIN_EVERY = 10.0   # seconds between lines within a step, not on a terminal


@dataclass(frozen=True)
class Step:
    label: str
    estimate: float      # wall seconds expected
    run: bool = True     # a measured run: numbered [k/N]; else a phase such as start-up


class Progress:
    def __init__(self, steps: list[Step], stream=None, clock=time.monotonic):
        if not steps:
            raise ValueError("a progress plan needs at least one step")
        self.steps = list(steps)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.clock = clock
        # A zero estimate still counts for a little, so that every step moves the bar.
        self.weights = [max(s.estimate, 0.01) for s in self.steps]
        self.total = sum(self.weights)
        self.runs = sum(1 for s in self.steps if s.run)
        self.next = 0                 # index of the next step to begin
        self.current: int | None = None
        self.started = clock()        # of the current step
        self.done = 0.0               # weights of the finished steps
        self.spent = 0.0              # wall seconds the finished steps took
        self.shown = 0.0              # the largest fraction reported so far
        self.last_line = clock()
        self.visible = False          # the terminal line is on screen

    # ---------------------------------------------------------------- the numbers

    def fraction(self) -> float:
        """Of the whole plan, 0 to 1; never less than it returned before."""
        inside = 0.0
        if self.current is not None:
            inside = min(self.clock() - self.started, self.weights[self.current])
        self.shown = max(self.shown, min(1.0, (self.done + max(0.0, inside)) / self.total))
        return self.shown

    def seconds_left(self) -> float:
        # Estimates scaled by how the finished steps went against theirs, starting from a
        # quarter of the plan's worth of "as estimated", so that one short step (start-up)
        # cannot swing it; bounded, so that one slow step cannot make it absurd.
        prior = self.total / 4
        pace = min(3.0, max(0.5, (self.spent + prior) / (self.done + prior)))
        return max(0.0, (1.0 - self.fraction()) * self.total * pace)

    def _run_number(self) -> int:
        upto = self.current + 1 if self.current is not None else self.next
        return sum(1 for s in self.steps[:upto] if s.run)

    # ---------------------------------------------------------------- the steps

    def begin(self, label: str) -> None:
        """Start the next step of the plan; `label` must be that step's (the plan and the
        bench's loops must agree, or the fraction would lie)."""
        if self.current is not None:
            self.end()
        if self.next >= len(self.steps) or self.steps[self.next].label != label:
            planned = self.steps[self.next].label if self.next < len(self.steps) else "nothing"
            raise AssertionError(f"progress: began {label!r}, the plan has {planned!r}")
        self.current, self.next = self.next, self.next + 1
        self.started = self.last_line = self.clock()
        if self.tty:
            self._draw()
        else:
            self._line(f"{self._prefix()}{label}  ({self._done_text()})")

    def tick(self) -> None:
        if self.tty:
            self._draw()
        elif self.current is not None and self.clock() - self.last_line >= PLAIN_EVERY:
            self.last_line = self.clock()
            self._line(f"  ... {self.steps[self.current].label}: "
                       f"{self.clock() - self.started:.0f} s into it, {self._done_text()}")

    def end(self, summary: str | None = None) -> None:
        """The current step is over; `summary` says what it found."""
        if self.current is None:
            return
        step = self.steps[self.current]
        self.done += self.weights[self.current]
        self.spent += max(0.0, self.clock() - self.started)
        self.current = None
        if summary is not None:
            self.note(f"{step.label}: {summary}" if self.tty else f"    {summary}")
        if self.tty and self.next >= len(self.steps):
            self._draw()              # the plan is done: 100%

    def note(self, msg: str) -> None:
        """A line of its own, above the bar (redrawn at the next step or tick)."""
        self._clear()
        self._line(msg)
        if self.tty and self.current is not None:
            self._draw()

    def close(self) -> None:
        self._clear()

    # ---------------------------------------------------------------- output

    def _prefix(self) -> str:
        step = self.steps[self.current]
        return f"[{self._run_number()}/{self.runs}] " if step.run else ""

    def _done_text(self) -> str:
        return f"{int(self.fraction() * 100)}% done, ~{self.seconds_left():.0f} s left"

    def _draw(self) -> None:
        frac = self.fraction()
        filled = int(frac * BAR)
        where = "done"
        if self.current is not None:
            step = self.steps[self.current]
            where = (f"run {self._run_number()}/{self.runs}  " if step.run else "") + step.label
        elif self.next < len(self.steps):
            where = f"next: {self.steps[self.next].label}"
        text = (f"[{'#' * filled}{'.' * (BAR - filled)}] {int(frac * 100):3d}%  {where}  "
                f"~{self.seconds_left():.0f} s left")[:WIDTH]
        self.stream.write("\r" + text.ljust(WIDTH))
        self.stream.flush()
        self.visible = True

    def _clear(self) -> None:
        if self.tty and self.visible:
            self.stream.write("\r" + " " * WIDTH + "\r")
            self.stream.flush()
            self.visible = False

    def _line(self, msg: str) -> None:
        self.stream.write(f"bench: {msg}\n")
        self.stream.flush()
