"""A backend slot for one piece of a front-door call, awaited.

The proxy's exchange is a callback object the scheduler dispatches; a
front-door call is a task with several pieces, each wanting a slot of its
own.  `take_slot` is the scheduler's acquire as a coroutine: the same FIFO
queue, limits, retries-at-the-head and (with [cluster]) Redis claims, and
`Attempt` keeps a backend's counts the way the proxy does (one attempt
started, then a response, a failure or an abandonment; the slot given back
exactly once), so /lb-stats, passive ejection and slow start see these
calls like any other.
"""

from __future__ import annotations

import asyncio

from ..scheduling.backend import Backend
from ..scheduling.scheduler import NO_BACKEND, QUEUE_FULL, QUEUE_TIMEOUT, Scheduler, Ticket


class NoSlot(Exception):
    """No backend took the piece: `why` is NO_BACKEND, QUEUE_FULL or QUEUE_TIMEOUT."""

    def __init__(self, why: str, reason: str):
        super().__init__(reason)
        self.why, self.reason = why, reason


class _Waiter:
    """What the scheduler dispatches a queued piece to."""
    __slots__ = ("future", "scheduler")

    def __init__(self, future: asyncio.Future, scheduler: Scheduler):
        self.future, self.scheduler = future, scheduler

    def dispatch(self, backend: Backend) -> None:
        if self.future.done():      # the piece left meanwhile: the slot goes back
            self.scheduler.release(backend)
        else:
            self.future.set_result(backend)

    def no_backend(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


async def take_slot(scheduler: Scheduler, exclude: frozenset[str], *, retry: bool,
                    queue_timeout: float, why_none) -> Backend:
    """A backend whose slot is ours, or NoSlot.  `why_none()`: the words for
    a fleet with nothing in the rotation."""
    future = asyncio.get_running_loop().create_future()
    result = scheduler.acquire(_Waiter(future, scheduler), exclude, retry=retry)
    if isinstance(result, Backend):
        return result
    if result == QUEUE_FULL:
        raise NoSlot(QUEUE_FULL, f"every backend is at its concurrency limit and the queue "
                     f"is full ({scheduler.queue_limit} waiting, balancer.queue_limit)")
    if result == NO_BACKEND:
        raise NoSlot(NO_BACKEND, "no backend available: " + why_none())
    assert isinstance(result, Ticket)
    try:
        backend = await asyncio.wait_for(asyncio.shield(future), queue_timeout)
    except asyncio.TimeoutError:
        scheduler.cancel(result, timed_out=True)
        _give_back(future, scheduler)
        raise NoSlot(QUEUE_TIMEOUT, f"every backend stayed at its concurrency limit "
                     f"for {queue_timeout:g}s (balancer.queue_timeout)") from None
    except BaseException:
        scheduler.cancel(result)
        _give_back(future, scheduler)
        raise
    if backend is None:
        raise NoSlot(NO_BACKEND, "no backend available: " + why_none())
    return backend


def _give_back(future: asyncio.Future, scheduler: Scheduler) -> None:
    """A dispatch that landed just as we left: its slot is not ours to keep."""
    if future.done() and not future.cancelled() and future.result() is not None:
        scheduler.release(future.result())
    elif not future.done():
        future.cancel()


class Attempt:
    """One backend call on a slot: accounted once, released once."""
    __slots__ = ("backend", "scheduler", "statuses", "_open", "_held")

    def __init__(self, backend: Backend, scheduler: Scheduler, statuses: tuple[int, ...]):
        self.backend, self.scheduler, self.statuses = backend, scheduler, statuses
        backend.attempt_started(took_slot=True)
        self._open = True
        self._held = True

    def answered(self, status: int) -> None:
        """The server's answer: a status in health.passive.statuses counts against it."""
        if not self._open:
            return
        self._open = False
        self.backend.record_response(status)
        if status in self.statuses:
            self.scheduler.failed(self.backend, local=False, reason=f"answered {status}")
        else:
            self.scheduler.succeeded(self.backend)

    def failed(self, kind: str, reason: str) -> None:
        self.backend.record_failure(kind, reason, ends_attempt=self._open)
        self._open = False
        self.scheduler.failed(self.backend, local=True, reason=reason)

    def end(self) -> None:
        """The attempt is over (whatever happened): the slot goes back."""
        if self._open:
            self._open = False
            self.backend.record_abandoned()
        if self._held:
            self._held = False
            self.scheduler.release(self.backend)
