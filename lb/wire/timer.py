"""A cheap resettable deadline.

Every body chunk moves an idle deadline forward.  Cancelling and rescheduling
a loop timer per chunk would dominate the hot path, so `set()` only stores
the new due time when it is later than the scheduled one; the timer, when it
fires early, re-arms itself for the stored time.  Only a deadline moved
*earlier* reschedules.
"""

from __future__ import annotations

import asyncio
from typing import Callable


class Deadline:
    __slots__ = ("_loop", "_callback", "_due", "_handle", "_scheduled_for")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]):
        self._loop = loop
        self._callback = callback
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._scheduled_for = 0.0

    def set(self, seconds: float) -> None:
        """Fire `seconds` from now (replacing any earlier setting)."""
        self._due = due = self._loop.time() + seconds
        if self._handle is None or self._scheduled_for > due:
            if self._handle is not None:
                self._handle.cancel()
            self._schedule(due)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def active(self) -> bool:
        return self._handle is not None

    def _schedule(self, when: float) -> None:
        self._scheduled_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        if self._loop.time() + 0.001 < self._due:
            self._schedule(self._due)  # moved forward since we were scheduled
            return
        self._handle = None
        self._callback()
