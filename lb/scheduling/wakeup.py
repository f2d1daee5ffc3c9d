"""The scheduler's `wake_at` on an event loop: one timer, at the earliest
time asked for, that calls `scheduler.dispatch()` (slots can open by time
alone: an ejection ends, slow start raises a limit, while some wait)."""

from __future__ import annotations

import asyncio
import time
from typing import Callable


class Wakeup:
    def __init__(self, loop: asyncio.AbstractEventLoop, dispatch: Callable[[], None]):
        self._loop = loop
        self._dispatch = dispatch
        self._handle: asyncio.TimerHandle | None = None

    def at(self, when: float) -> None:
        """Dispatch at `when` (monotonic seconds), unless a timer fires sooner."""
        delay = max(0.0, when - time.monotonic())
        handle = self._handle
        if handle is not None:
            if handle.when() <= self._loop.time() + delay:
                return
            handle.cancel()
        self._handle = self._loop.call_later(delay, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._dispatch()
