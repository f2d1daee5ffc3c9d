"""This process's side of the slots its fleet shares through Redis.

The scheduler still picks a backend and counts the call in its own
`in_flight` at once; with the fleet's slots shared, the pick is only a
claim until Redis agrees (`claim`: the take script, bounded by
cluster.timeout).  What comes back:

    TAKEN        the call goes;
    LOST         the fleet filled that backend meanwhile: the scheduler
                 gives the local count back and picks again (or queues);
    UNAVAILABLE  Redis did not answer in time (SLOW_CLAIMS in a row) or at
                 all (a connection error): this process goes
                 *degraded* -- every backend's limit here drops to its
                 static share (Backend.use_shared) -- and picks again.
                 The calls the rest of the fleet had under way still count
                 against the backend here, fading out over FADE, so the
                 static shares do not land on top of them.

Holders are interchangeable within a process: a release drops any of ours
for that backend, so the scheduler never needs to know which.  One task
(`_tend`) renews every lease we hold and reads the fleet-wide counts, every
RECHECK while calls wait here (a lost pub/sub message cannot strand them)
and every third of the lease otherwise; while degraded it asks Redis every
RECOVER_EVERY whether it is back, then adopts the calls that started
meanwhile (so the fleet counts them) and shares again.

`in_flight_elsewhere` on each backend is what the rest of the fleet holds
there as last seen: the fleet's count minus ours.  The policy and the
limit check use `in_flight + in_flight_elsewhere`; Redis has the last word.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from typing import Callable, Sequence

from .backend import Backend

log = logging.getLogger("lb")

TAKEN, LOST, UNAVAILABLE = "taken", "lost", "unavailable"
RECHECK = 0.25          # seconds between fleet-count reads while calls wait here
RECOVER_EVERY = 1.0     # seconds between "is Redis back?" while degraded
REJOIN = 2 * RECOVER_EVERY + RECHECK   # seconds from Redis's return to sharing again
FADE = 5.0              # seconds over which the fleet's last-seen calls fade out, degraded
SLOW_CLAIMS = 3         # claims in a row past cluster.timeout: Redis is too slow to use
MAX_ORPHANS = 100_000   # holders kept to give back after an outage
SAMPLES = 4096          # recent slot acquisitions kept for p50 / p99
# What a Redis call can fail with: the client library's errors, a socket's, ours.
try:
    from redis.exceptions import RedisError as _RedisError
except ImportError:     # redis is a dependency; this keeps the module importable
    _RedisError = OSError
REDIS_TROUBLE = (_RedisError, OSError, asyncio.TimeoutError, EOFError)


def quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class FleetSlots:
    """`slots`: a SharedSlots; `backends()`: the scheduler's backends now;
    `wake()`: dispatch what waits (a slot may be free)."""

    def __init__(self, cfg, slots, loop: asyncio.AbstractEventLoop, *,
                 backends: Callable[[], Sequence[Backend]], wake: Callable[[], None],
                 waiting: Callable[[], int]):
        self.cfg = cfg
        self.slots = slots
        self.loop = loop
        self._backends = backends
        self._wake = wake
        self._waiting = waiting
        # Calls claim their slots through Redis (once it answered; not while
        # degraded); `rejoining`: just back, still within the static shares.
        self.shared = False
        self.held: dict[str, list[str]] = {}   # backend -> our holders in Redis
        self._releases: list[tuple[str, str]] = []
        self._flush: asyncio.Handle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._tender: asyncio.Task | None = None
        self._renewed = 0.0
        self._stopped = False
        self._warned = False                # the degraded warning of this outage is out
        self._faded_from: dict[str, int] = {}   # fleet counts when we went degraded
        self._next_recovery = 0.0
        self._orphans: list[tuple[str, str]] = []   # released while Redis was away
        self._slow_claims = 0                # claims in a row past cluster.timeout
        self.rejoining = False
        self._rejoin_at: float | None = None
        # for /lb-stats and /metrics
        self.acquire_s: deque[float] = deque(maxlen=SAMPLES)
        self.acquired = 0
        self.lost_races = 0
        self.redis_errors = 0
        self.degraded_total = 0
        self.degraded_since: float | None = None
        self.last_error = ""

    # --- life

    def start(self) -> None:
        """Claim through Redis from the first call: a process that is still
        starting must not add its static share on top of the fleet's
        (if Redis does not answer, the first claim finds out)."""
        self.shared = True
        self.degraded_since = None
        for b in self._backends():
            b.use_shared(True)
        log.info("cluster: slots shared through Redis at %s (fleet %s, %d replicas, lease %gs)",
                 self.cfg.shown_url, self.cfg.fleet, self.cfg.replicas, self.cfg.lease)
        self._tender = self.loop.create_task(self._tend())

    def stop(self) -> None:
        """Give back every slot we hold (best effort) and stop."""
        self._stopped = True
        if self._tender is not None:
            self._tender.cancel()
        for task in list(self._tasks):
            task.cancel()
        held = [(name, h) for name, holders in self.held.items() for h in holders]
        self.held.clear()
        if held and self.shared:
            self._spawn(self._release_now(held))

    @property
    def mode(self) -> str:
        return "shared" if self.shared and not self.rejoining else "degraded"

    # --- what the scheduler calls

    def claim(self, backend: Backend, done: Callable[[str], None]) -> None:
        self._spawn(self._claim(backend, done))

    def release(self, backend: Backend) -> None:
        holders = self.held.get(backend.name)
        if not holders:
            return      # taken while degraded and never adopted: nothing in Redis
        holder = holders.pop()
        if not self.shared:
            self._orphan([(backend.name, holder)])   # given back once Redis answers
            return
        self._releases.append((backend.name, holder))
        if self._flush is None:
            # Every release of this loop iteration in one round trip.
            self._flush = self.loop.call_soon(self._flush_releases)

    def ejected(self, backend: Backend, seconds: float) -> None:
        """We ejected `backend`: the fleet's other balancers step around it too."""
        self._spawn(self._publish(self.slots.ejected(backend.name, seconds),
                                  f"the ejection of {backend.name}"))

    def set_admin(self, name: str, state: str) -> None:
        """An operator's drain / maint / ready here: for every replica."""
        self._spawn(self._publish(self.slots.set_admin(name, state),
                                  f"{state} of backend {name}"))

    async def _publish(self, call, what: str) -> None:
        try:
            await asyncio.wait_for(call, RECOVER_EVERY)
        except REDIS_TROUBLE as exc:
            log.warning("cluster: %s is not shared with the fleet: Redis at %s failed (%s)",
                        what, self.cfg.shown_url, type(exc).__name__)
            self._trouble(exc)

    # --- Redis round trips

    async def _claim(self, backend: Backend, done: Callable[[str], None]) -> None:
        name = backend.name
        holder = self.slots.new_holder()
        started = time.monotonic()
        try:
            taken, held = await asyncio.wait_for(
                self.slots.take(name, backend.configured_limit, holder), self.cfg.timeout)
        except REDIS_TROUBLE as exc:
            # It may have been taken all the same, after we stopped waiting.
            self._spawn(self._forget([(name, holder)]))
            if not isinstance(exc, asyncio.TimeoutError):
                self._trouble(exc)
            else:
                # One slow answer on a busy machine is not an outage: the call
                # picks again; SLOW_CLAIMS in a row are.
                self._slow_claims += 1
                what = f"{self._slow_claims} slot claims in a row got no answer within " \
                       f"{self.cfg.timeout * 1000:g} ms (cluster.timeout)"
                if self._slow_claims >= SLOW_CLAIMS:
                    self._trouble(exc, what)
                else:
                    self.redis_errors += 1
            done(UNAVAILABLE)
            return
        self._slow_claims = 0
        self.acquire_s.append(time.monotonic() - started)
        if not self.shared:     # degraded while we waited: this slot is not counted on
            self._spawn(self._forget([(name, holder)]))
            done(UNAVAILABLE)
            return
        ours = self.held.setdefault(name, [])
        if taken:
            self.acquired += 1
            ours.append(holder)
        else:
            self.lost_races += 1
        backend.in_flight_elsewhere = max(0, held - len(ours))
        done(TAKEN if taken else LOST)

    def _flush_releases(self) -> None:
        self._flush = None
        releases, self._releases = self._releases, []
        if releases:
            self._spawn(self._release_now(releases))

    async def _release_now(self, releases: list[tuple[str, str]]) -> None:
        try:
            await asyncio.wait_for(self.slots.release(releases), max(1.0, self.cfg.timeout))
        except REDIS_TROUBLE as exc:
            self._trouble(exc)     # the leases run out by themselves

    async def _forget(self, releases: list[tuple[str, str]]) -> None:
        try:
            await asyncio.wait_for(self.slots.release(releases), RECOVER_EVERY)
        except REDIS_TROUBLE:
            self._orphan(releases)    # Redis is in trouble already

    def _orphan(self, releases: list[tuple[str, str]]) -> None:
        """Holders to drop once Redis answers: a short outage should not
        leave their slots taken for a whole lease.  (Bounded: past that,
        the leases run out by themselves.)"""
        room = MAX_ORPHANS - len(self._orphans)
        self._orphans.extend(releases[:max(0, room)])

    async def _tend(self) -> None:
        while not self._stopped:
            try:
                if self.shared:
                    if self.rejoining and time.monotonic() >= self._rejoin_at:
                        self._rejoined()
                    await self._refresh()
                else:
                    self._apply_fade()
                    if time.monotonic() >= self._next_recovery:
                        self._next_recovery = time.monotonic() + RECOVER_EVERY
                        await self._recover()
            except REDIS_TROUBLE as exc:
                self._trouble(exc)
            except Exception:    # a bug must not stop renewals for good
                log.exception("cluster: renewing slots failed")
            await asyncio.sleep(RECHECK)

    async def _refresh(self) -> None:
        now = time.monotonic()
        renew = now - self._renewed >= self.cfg.lease / 3
        if not renew and not self._waiting() and not self.rejoining:
            return
        backends = list(self._backends())
        holders = {b.name: (list(self.held.get(b.name, ())) if renew else []) for b in backends}
        counts = await asyncio.wait_for(self.slots.hold(holders), max(1.0, self.cfg.lease / 10))
        if renew:
            self._renewed = now
        self._apply_counts(backends, counts)

    def _apply_counts(self, backends: Sequence[Backend], counts: dict[str, int]) -> None:
        def elsewhere(b: Backend) -> int:
            n = max(0, counts.get(b.name, 0) - len(self.held.get(b.name, ())))
            # Rejoining: processes not back yet are not in Redis's count.
            return max(n, self._faded(b)) if self.rejoining else n
        self._set_elsewhere(backends, elsewhere)

    def _set_elsewhere(self, backends: Sequence[Backend],
                       elsewhere: Callable[[Backend], int]) -> None:
        """New fleet counts; a slot that freed up wakes those waiting here."""
        freed = False
        for b in backends:
            n = elsewhere(b)
            freed |= n < b.in_flight_elsewhere
            b.in_flight_elsewhere = n
        if freed and self._waiting():
            self._wake()

    def _faded(self, b: Backend) -> int:
        """The fleet's calls at `b` seen last before the outage, fewer as time passes."""
        since = self.degraded_since
        left = 0.0 if since is None else max(0.0, 1 - (time.monotonic() - since) / FADE)
        return math.ceil(self._faded_from.get(b.name, 0) * left)

    def _apply_fade(self) -> None:
        self._set_elsewhere(list(self._backends()), self._faded)

    async def _recover(self) -> None:
        """Degraded (or not yet connected): is Redis back?  Then give back
        what was released meanwhile, adopt the calls under way here (so the
        fleet counts them) and claim through Redis again -- still within the
        static shares while *rejoining*: only after REJOIN, when every
        process that can reach Redis is back too (they ask every
        RECOVER_EVERY) and counted, does each backend's whole limit apply.
        Sharing at once would count only the processes back so far."""
        if self.degraded_total:
            await asyncio.wait_for(self.slots.reconnect(), RECOVER_EVERY)
        if self._orphans:
            orphans, self._orphans = self._orphans, []
            await self._forget(orphans)
        backends = list(self._backends())
        for b in backends:
            ours = self.held.setdefault(b.name, [])
            del ours[b.in_flight:]
            ours.extend(self.slots.new_holder() for _ in range(b.in_flight - len(ours)))
        counts = await asyncio.wait_for(
            self.slots.hold({b.name: self.held[b.name] for b in backends}, adopt=True),
            RECOVER_EVERY)
        self.shared, self.rejoining = True, True
        self._rejoin_at = time.monotonic() + REJOIN
        self._renewed = time.monotonic()
        self._apply_counts(backends, counts)
        self._wake()

    def _rejoined(self) -> None:
        self.rejoining = False
        for b in self._backends():
            b.use_shared(True)
        self.degraded_since = None
        self._warned = False
        log.info("cluster: shared slots again: Redis at %s answers (fleet %s)",
                 self.cfg.shown_url, self.cfg.fleet)
        self._wake()

    def _trouble(self, exc: BaseException, what: str | None = None) -> None:
        """Redis failed us: count it; once an outage, go degraded and say so."""
        self.redis_errors += 1
        self.last_error = what or f"{type(exc).__name__}: {exc}"[:200]
        fully_shared = self.shared and not self.rejoining
        claiming = self.shared
        self.shared = self.rejoining = False
        if fully_shared:
            self.degraded_since = time.monotonic()
            # What the rest of the fleet had running goes on running: it is
            # kept in the count, fading out over FADE (those calls end by
            # then, most likely), so the static shares do not come on top.
            self._faded_from = {b.name: b.in_flight_elsewhere for b in self._backends()}
            for b in self._backends():
                b.use_shared(False)
        elif not claiming and self._warned:
            return
        self._apply_fade()
        if not self._warned:
            self._warned = True
            self.degraded_total += 1
            shares = ", ".join(f"{b.name} {b.max_concurrency}" for b in self._backends())
            log.warning("cluster: degraded: Redis at %s failed (%s); each backend's limit in "
                        "this process is its static share until Redis answers again (%s)",
                        self.cfg.shown_url, self.last_error, shares)
        self._wake()

    def _spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- seen from outside

    def snapshot(self) -> dict:
        samples = self.acquire_s
        return {
            "mode": self.mode,
            "rejoining": self.rejoining,
            "redis": self.cfg.shown_url,
            "fleet": self.cfg.fleet,
            "replicas": self.cfg.replicas,
            "lease_s": self.cfg.lease,
            "timeout_s": self.cfg.timeout,
            "acquire_ms": {"count": self.acquired + self.lost_races,
                           "p50": round(quantile(samples, 0.5) * 1000, 3),
                           "p99": round(quantile(samples, 0.99) * 1000, 3)},
            "held": sum(len(h) for h in self.held.values()),
            "lost_races": self.lost_races,
            "redis_errors": self.redis_errors,
            "degraded_total": self.degraded_total,
            "degraded_for_s": (round(time.monotonic() - self.degraded_since, 3)
                               if self.degraded_since is not None else 0),
            "last_error": self.last_error,
        }
