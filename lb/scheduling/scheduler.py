"""Which backend takes a request, or where it waits: the concurrency limits,
the FIFO queue, and the fleet-wide side of health (how many may be ejected).

Sans-io: the clock and the random source are passed in, and a request
waiting in the queue is any object with `dispatch(backend)` and
`no_backend()` methods, so the rules here are tested without sockets.

The rules:
- a backend takes a request only while it is in the rotation and below its
  limit (`max_concurrency`, or less while slow start ramps); the policy
  chooses among those that qualify;
- when none qualifies, the request waits in one FIFO queue of at most
  `queue_limit`, and is dispatched the moment a slot frees; a retry has
  already waited its turn once, so it waits at the head;
- a retry avoids the backends it already tried while another is in the
  rotation;
- when no backend is in the rotation at all, nothing waits: the request is
  answered at once (and whatever was waiting is let go), since no slot can
  free until an ejection ends or an operator acts;
- at most `max_ejected_percent` of the fleet is ejected at once, rounded
  down, but never less than one backend: a fleet of one or two can still
  step around a failing server;
- with the fleet's slots shared through Redis (a `gate`, fleet_slots), a
  pick is a claim until Redis agrees: the caller gets a Ticket and waits
  as if queued; a lost race or an unreachable Redis gives the local count
  back and the ticket goes to the head of the queue for another pick;
- a probe that got no answer while the backend is still completing
  requests is inconclusive (health.probe_inconclusive); for that the
  scheduler keeps, per backend, when each request in flight took its slot
  and when the backend last answered one.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from typing import Callable, Protocol, Sequence

from .backend import Backend
from ..config_model import Passive
from .health import probe_inconclusive
from .policy import Policy

log = logging.getLogger("lb")

QUEUE_FULL = "queue_full"
NO_BACKEND = "no_backend"
QUEUE_TIMEOUT = "queue_timeout"   # a waiter the caller gave up on (cancel(timed_out=True))


class Waiter(Protocol):
    def dispatch(self, backend: Backend) -> None: ...
    def no_backend(self) -> None: ...


class Gate(Protocol):
    """Slots shared with other processes (fleet_slots.FleetSlots)."""
    shared: bool
    def claim(self, backend: Backend, done: Callable[[str], None]) -> None: ...
    def release(self, backend: Backend) -> None: ...
    def ejected(self, backend: Backend, seconds: float) -> None: ...


TAKEN = "taken"     # what a Gate's claim says when the slot is ours


class Ticket:
    """A place in the queue, or a claim the gate has not answered yet."""
    __slots__ = ("waiter", "exclude", "since", "claiming", "queued_once")

    def __init__(self, waiter: Waiter | None, exclude: frozenset[str], since: float):
        self.waiter = waiter            # None once dispatched or cancelled
        self.exclude = exclude
        self.since = since
        self.claiming = False           # out to the gate, not in the queue
        self.queued_once = False        # it waited in the queue (for the wait figures)


class Scheduler:
    def __init__(self, backends: Sequence[Backend], policy: Policy, *, queue_limit: int,
                 passive: Passive, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 wake_at: Callable[[float], None] = lambda when: None,
                 gate: Gate | None = None):
        self.backends = list(backends)
        self.gate = gate
        self.policy = policy
        self.queue_limit = queue_limit
        self.passive = passive
        self.clock = clock
        self.rng = rng or random.Random()
        self._wake_at = wake_at           # ask to be dispatched again at this time
        self._queue: deque[Ticket] = deque()
        self.queued = 0                   # live tickets in `_queue`
        self._dispatching = False
        self._again = False
        # counters for /lb-stats and /metrics
        self.peak_queued = 0
        self.dispatched_from_queue = 0
        self.queue_full = 0
        self.queue_timeouts = 0
        self.no_backend = 0
        self.queue_wait_total = 0.0       # seconds waited by those dispatched from the queue

    def reconfigure(self, backends: Sequence[Backend], policy: Policy, *, queue_limit: int,
                    passive: Passive) -> None:
        """A reload: what is queued stays queued, in order."""
        self.backends = list(backends)
        self.policy = policy
        self.queue_limit = queue_limit
        self.passive = passive

    # --- taking and giving back slots

    def acquire(self, waiter: Waiter, exclude: frozenset[str] = frozenset(), *,
                retry: bool = False) -> Backend | Ticket | str:
        """A backend now (its slot taken), a Ticket (queued), QUEUE_FULL or NO_BACKEND."""
        now = self.clock()
        rotation = self._rotation(now)
        if not rotation:
            self.no_backend += 1
            return NO_BACKEND
        if self.queued:
            self.dispatch()   # a slot those waiting can use goes to them first
        backend = self._pick(now, rotation, exclude)
        if backend is not None:
            self._take(backend, now)
            gate = self.gate
            if gate is None or not gate.shared:
                return backend
            ticket = Ticket(waiter, exclude, now)
            self._claim(ticket, backend)
            return ticket
        if not retry and self.queued >= self.queue_limit:
            self.queue_full += 1
            return QUEUE_FULL
        ticket = Ticket(waiter, exclude, now)
        self._enqueue(ticket, head=retry)
        self._schedule_wakeup(now)
        return ticket

    def _enqueue(self, ticket: Ticket, *, head: bool) -> None:
        if head:
            self._queue.appendleft(ticket)
        else:
            self._queue.append(ticket)
        ticket.queued_once = True
        self.queued += 1
        self.peak_queued = max(self.peak_queued, self.queued)

    def _claim(self, ticket: Ticket, backend: Backend) -> None:
        """Ask the gate for the slot taken here on `backend`."""
        ticket.claiming = True
        self.gate.claim(backend, lambda result: self._claimed(ticket, backend, result))

    def _claimed(self, ticket: Ticket, backend: Backend, result: str) -> None:
        ticket.claiming = False
        waiter = ticket.waiter
        if result == TAKEN:
            if waiter is None:          # it gave up meanwhile
                self.release(backend)
                return
            ticket.waiter = None
            if ticket.queued_once:
                self.dispatched_from_queue += 1
                self.queue_wait_total += self.clock() - ticket.since
            waiter.dispatch(backend)
            return
        # Lost (the fleet filled it meanwhile) or no answer: give the count
        # back and pick again, first in line.
        self._let_go(backend)
        if waiter is not None:
            self._enqueue(ticket, head=True)
        self.dispatch()

    def choose(self, exclude: frozenset[str] = frozenset()) -> Backend | None:
        """A backend for work that takes no slot (a `slot = false` route): the
        policy's pick among those in the rotation, whatever their limits;
        None (counted as no_backend) if none is."""
        rotation = self._rotation(self.clock())
        if not rotation:
            self.no_backend += 1
            return None
        pool = [b for b in rotation if b.name not in exclude] or rotation
        return self.policy.pick(pool)

    def release(self, backend: Backend) -> None:
        """A request let go of `backend` (finished, failed or abandoned)."""
        self._let_go(backend)
        if self.gate is not None:
            self.gate.release(backend)
        if self.queued:
            self.dispatch()

    def _let_go(self, backend: Backend) -> None:
        backend.in_flight -= 1
        if backend.in_flight_since:
            backend.in_flight_since.popleft()
        if backend.in_flight == 0 and backend.health.trial:
            # The half-open trial ended without a verdict (its client left):
            # with nothing left there, no trial is out; another may go.
            backend.health.abandoned()

    def cancel(self, ticket: Ticket, *, timed_out: bool = False) -> None:
        """The waiter gives up its place (client left, or its deadline passed)."""
        if ticket.claiming:
            ticket.waiter = None        # the gate's answer gives the slot back
            if timed_out:
                self.queue_timeouts += 1
            return
        if ticket.waiter is not None:
            ticket.waiter = None
            self.queued -= 1
            if timed_out:
                self.queue_timeouts += 1
            if len(self._queue) > 2 * self.queued + 64:
                self._queue = deque(t for t in self._queue if t.waiter is not None)

    def dispatch(self) -> None:
        """Give free slots to those waiting, in order."""
        if self._dispatching:
            self._again = True    # re-entered from a waiter's dispatch(): the loop repeats
            return
        self._dispatching = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._dispatch_once()
        finally:
            self._dispatching = False
        if self.queued:
            self._schedule_wakeup(self.clock())

    def _dispatch_once(self) -> None:
        queue = self._queue
        now = self.clock()
        rotation = self._rotation(now)
        if not rotation:
            self._let_go_all()
            return
        i = 0
        while i < len(queue):
            ticket = queue[i]
            waiter = ticket.waiter
            if waiter is None:
                if i == 0:
                    queue.popleft()
                else:
                    i += 1
                continue
            backend = self._pick(now, rotation, ticket.exclude)
            if backend is None:
                if not ticket.exclude:
                    return    # no slot for this one: none for any plain request behind it
                i += 1        # a retry avoiding some backends; others may still fit
                continue
            self.queued -= 1
            if i == 0:
                queue.popleft()
            self._take(backend, now)
            gate = self.gate
            if gate is not None and gate.shared:
                if i > 0:
                    del queue[i]    # (a retry that skipped the head: rare)
                self._claim(ticket, backend)
                continue
            ticket.waiter = None
            self.dispatched_from_queue += 1
            self.queue_wait_total += now - ticket.since
            waiter.dispatch(backend)

    def _let_go_all(self) -> None:
        queue, self._queue = self._queue, deque()
        self.queued = 0
        for ticket in queue:
            waiter, ticket.waiter = ticket.waiter, None
            if waiter is not None:
                self.no_backend += 1
                waiter.no_backend()

    # --- outcomes, for passive health

    def succeeded(self, backend: Backend) -> None:
        now = self.clock()
        backend.last_answer = now
        if backend.health.succeeded(now):
            log.info("backend %s readmitted after a successful trial request", backend.name)
            if self.queued:
                self.dispatch()

    def failed(self, backend: Backend, *, local: bool, reason: str) -> float | None:
        """Count a failure; returns the ejection time if it ejected the backend."""
        now = self.clock()
        health = backend.health
        if not local:
            backend.last_answer = now   # a 5xx is an answer: the server is working
        if not health.failed(now, local):
            return None
        if not health.ejected and self.ejected_count() >= self.max_ejected():
            health.ejection_refused()   # warn again only after another run of failures
            log.warning("backend %s is failing (%s) but is not ejected: %d of %d backends "
                        "are ejected already (health.passive.max_ejected_percent = %d)",
                        backend.name, reason, self.ejected_count(), len(self.backends),
                        self.passive.max_ejected_percent)
            return None
        again = health.ejected
        seconds = health.eject(now, self.rng)
        log.warning("backend %s %s for %.1fs (ejection #%d): %s", backend.name,
                    "ejected again after its trial failed" if again else "ejected",
                    seconds, health.ejections, reason)
        if self.gate is not None:
            self.gate.ejected(backend, seconds)   # the fleet's other balancers step around it too
        if self.queued:
            self.dispatch()   # lets the queue go if nothing is left in the rotation
        return seconds

    def ejection_reported(self, backend: Backend, seconds: float, by: str) -> None:
        """Another balancer of the fleet ejected `backend` for `seconds`:
        step around it here too (within max_ejected_percent, as our own)."""
        health = backend.health
        if health.ejected or seconds <= 0:
            return
        if self.ejected_count() >= self.max_ejected():
            log.warning("backend %s was ejected by %s but is kept here: %d of %d backends "
                        "are ejected already", backend.name, by, self.ejected_count(),
                        len(self.backends))
            return
        health.eject_for(self.clock(), seconds)
        log.warning("backend %s ejected for %.1fs: balancer %s of the fleet found it failing",
                    backend.name, seconds, by)
        if self.queued:
            self.dispatch()

    def probed(self, backend: Backend, ok: bool, reason: str, *, no_answer: bool = False,
               first_byte: float = 0.0) -> None:
        """One probe result.  `no_answer`: it connected but got no answer in time, which
        says nothing while the backend is busy with requests (health.probe_inconclusive;
        `first_byte` is timeouts.first_byte)."""
        now = self.clock()
        health = backend.health
        if not ok and probe_inconclusive(
                now, no_answer=no_answer,
                oldest_in_flight=backend.in_flight_since[0] if backend.in_flight_since else None,
                last_answer=backend.last_answer,
                window=health.active.fall * health.active.interval, first_byte=first_byte):
            if health.probe_was_busy(reason):
                log.debug("backend %s is busy: its probe got no answer (%s) while it works "
                          "on %d request(s); not counted as a failure", backend.name, reason,
                          backend.in_flight)
            return
        change = health.probed(now, ok, reason)
        if change is None:
            return
        if change == "down":
            log.warning("backend %s failed its health probe: %s", backend.name, reason)
        else:
            log.info("backend %s %s by its health probe: %s", backend.name,
                     "readmitted" if change == "readmitted" else "is up", reason)
        if self.queued:
            self.dispatch()

    def set_admin(self, backend: Backend, state: str) -> None:
        """The operator's ready / drain / maint."""
        if backend.health.admin != state:
            log.info("backend %s set to %s (was %s)", backend.name, state, backend.health.admin)
        backend.health.set_admin(self.clock(), state)
        if self.queued:
            self.dispatch()

    def max_ejected(self) -> int:
        pct = self.passive.max_ejected_percent
        return 0 if pct == 0 else max(1, len(self.backends) * pct // 100)

    def ejected_count(self) -> int:
        return sum(1 for b in self.backends if b.health.ejected)

    # --- internals

    def _rotation(self, now: float) -> list[Backend]:
        return [b for b in self.backends if b.health.in_rotation(now)]

    def _pick(self, now: float, rotation: list[Backend], exclude: frozenset[str]) -> Backend | None:
        pool = rotation
        if exclude:
            pool = [b for b in rotation if b.name not in exclude] or rotation
        candidates = [b for b in pool
                      if b.health.has_room(now, b.in_flight + b.in_flight_elsewhere,
                                           b.max_concurrency)]
        if not candidates:
            return None
        return self.policy.pick(candidates)

    def _take(self, backend: Backend, now: float) -> None:
        backend.in_flight += 1
        backend.in_flight_since.append(now)
        backend.requests += 1
        if backend.in_flight > backend.peak_in_flight:
            backend.peak_in_flight = backend.in_flight
        backend.health.started(now)

    def _schedule_wakeup(self, now: float) -> None:
        """Slots can also open by time alone (an ejection ends, slow start
        ramps up): ask to dispatch again then, while anyone waits."""
        times = [t for b in self.backends
                 if (t := b.health.next_change(now, b.max_concurrency)) is not None]
        if times:
            self._wake_at(min(times))

    def snapshot(self) -> dict:
        return {
            "length": self.queued,
            "limit": self.queue_limit,
            "peak": self.peak_queued,
            "dispatched": self.dispatched_from_queue,
            "mean_wait_s": round(self.queue_wait_total / self.dispatched_from_queue, 4)
            if self.dispatched_from_queue else 0.0,
            "rejected_full": self.queue_full,
            "timed_out": self.queue_timeouts,
            "no_backend": self.no_backend,
            "ejected": self.ejected_count(),
            "max_ejected": self.max_ejected(),
        }
