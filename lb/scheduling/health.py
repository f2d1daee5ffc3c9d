"""Whether a backend is in the rotation, and how much it may take.

Sans-io: every method takes the current (monotonic) time, so each rule is
testable without sockets or sleeping.  Four things decide it:

- the operator's state: ready, drain (no new requests; those in flight
  finish) or maint (the same, and probes pause);
- passive ejection (outlier detection): `consecutive_failures` connection-
  level failures (refused, reset, timeouts) or `consecutive_5xx` answers with
  a status in `statuses`, in a row, eject the backend for `base_ejection` x
  the number of times it has been ejected, at most `max_ejection`, shortened
  by up to `jitter` so a fleet ejected together does not return together.
  When the time is up it is half-open: one trial request may go, and its
  success (or a passing probe) readmits it; a failure ejects it again, for
  longer.  Each `max_ejection` of healthy time forgets one past ejection;
- active probes: `rise` passing results in a row bring a backend back,
  `fall` failing ones take it out.  The first result counts at once, so a
  server still loading its model at start-up is sent work only until its
  first probe answers (the first probe goes out at start).
  Busy is not dead: most GPU TTS servers block their own event loop while
  they synthesize, so their /health goes unanswered until the job is done.
  A probe that got no answer (it connected, then timed out) while the
  backend is visibly still working -- one of its requests was answered
  within the last `fall` x `interval`, or the oldest request in flight there
  is younger than `timeouts.first_byte` (it may yet be answered) -- is
  inconclusive (`probe_inconclusive`): it changes nothing, neither counting
  towards `fall` nor resetting the run towards `rise` (the streak stays as
  it was, whichever way it ran), and the backend shows as "busy".  A
  refused or timed-out connect is never inconclusive: a dead server
  refuses, and the kernel accepts connections for a server whose event loop
  is blocked.  A frozen server (it accepts, never answers) that keeps being
  sent requests is passive health's to take out: each of them ends in a
  first-byte timeout, a connection-level failure;
- slow start: a backend coming back (readmitted, probed up, or set ready)
  ramps its concurrency limit from 1 to the full value over `slow_start`.

How many backends of the fleet may be ejected at once is the scheduler's
call, since it sees the whole fleet.
"""

from __future__ import annotations

import math
import random

from ..config_model import Active, Passive

READY, DRAIN, MAINT = "ready", "drain", "maint"
ADMIN_STATES = (READY, DRAIN, MAINT)
BUSY = "busy"


def probe_inconclusive(now: float, *, no_answer: bool, oldest_in_flight: float | None,
                       last_answer: float | None, window: float, first_byte: float) -> bool:
    """Does a failed probe say nothing about the backend, because it is busy?

    `no_answer`: the probe connected but got no answer in time (anything else
    -- refused, a bad answer, 503 -- is conclusive).  Only while requests are
    in flight (`oldest_in_flight` is when the oldest took its slot) that are
    still completing: one was answered at `last_answer` within `window`
    (fall x interval), or the oldest is younger than `first_byte`."""
    if not no_answer or oldest_in_flight is None:
        return False
    if last_answer is not None and now - last_answer <= window:
        return True
    return now - oldest_in_flight < first_byte


class Health:
    __slots__ = ("passive", "active", "slow_start", "admin", "ejected", "ejected_until", "ejections",
                 "ejections_total", "trial", "local_failures", "consecutive_5xx", "probe_up",
                 "probe_streak", "probe_reason", "probe_busy", "ramp_start", "readmitted_at")

    def __init__(self, passive: Passive, active: Active, slow_start: float):
        self.passive = passive
        self.active = active
        self.slow_start = slow_start
        self.admin = READY
        self.ejected = False
        self.ejected_until = 0.0
        self.ejections = 0                  # the ejection-time multiplier
        self.ejections_total = 0
        self.trial = False                  # a half-open trial request is out
        self.local_failures = 0             # in a row
        self.consecutive_5xx = 0            # in a row
        self.probe_up: bool | None = None   # None: no probe verdict (off, or none yet)
        self.probe_streak = 0               # results in a row against the verdict
        self.probe_reason = ""
        self.probe_busy = False             # the last probe was inconclusive
        self.ramp_start: float | None = None
        self.readmitted_at: float | None = None

    # --- what the scheduler asks

    def in_rotation(self, now: float) -> bool:
        """May requests be sent (or queued) for this backend at all?"""
        return (self.admin == READY and self.probe_up is not False
                and (not self.ejected or now >= self.ejected_until))

    def half_open(self, now: float) -> bool:
        return self.ejected and now >= self.ejected_until

    def has_room(self, now: float, in_flight: int, limit: int) -> bool:
        """Could one more request start here now (given it is in the rotation)?"""
        if self.ejected:
            # Half-open: a single trial, and never past the limit even if
            # requests from before the ejection are still running.
            return not self.trial and in_flight < limit
        return in_flight < self.limit(now, limit)

    def limit(self, now: float, limit: int) -> int:
        """The concurrency limit in force: lower while slow start ramps."""
        if self.ejected:
            return 1
        if self.ramp_start is None:
            return limit
        elapsed = now - self.ramp_start
        if elapsed >= self.slow_start:
            self.ramp_start = None
            return limit
        return max(1, math.ceil(limit * elapsed / self.slow_start))

    def next_change(self, now: float, limit: int) -> float | None:
        """When `in_rotation`/`has_room` may next change by time alone."""
        if self.ejected:
            return self.ejected_until if now < self.ejected_until else None
        if self.ramp_start is not None:
            current = self.limit(now, limit)
            if self.ramp_start is not None:
                # ceil(limit * elapsed / slow_start) passes `current` just after this.
                return self.ramp_start + self.slow_start * current / limit + 1e-3
        return None

    def started(self, now: float) -> None:
        """A request was sent here."""
        if self.half_open(now):
            self.trial = True

    # --- outcomes

    def succeeded(self, now: float) -> bool:
        """The backend answered (with a status not counted as a failure).
        Returns True if that readmitted it: once the ejection time is up, any
        answer counts, the trial's or one from a request sent before."""
        self.local_failures = self.consecutive_5xx = 0
        if self.half_open(now):
            self._readmit(now)
            return True
        return False

    def failed(self, now: float, local: bool) -> bool:
        """A failure: connection-level if `local`, else an HTTP status in
        `passive.statuses`.  Returns True if the backend should be ejected now."""
        if self.ejected:
            # A failed trial re-ejects; failures of requests sent before
            # the ejection change nothing, even if they end after it.
            if self.trial and self.half_open(now):
                self.trial = False
                return True
            return False
        if local:
            self.local_failures += 1
            threshold, count = self.passive.consecutive_failures, self.local_failures
        else:
            self.consecutive_5xx += 1
            threshold, count = self.passive.consecutive_5xx, self.consecutive_5xx
        return threshold > 0 and count >= threshold

    def abandoned(self) -> None:
        """The trial ended with no verdict on the backend (its client left)."""
        self.trial = False

    def ejection_refused(self) -> None:
        """The fleet cannot spare this backend now: start counting afresh."""
        self.local_failures = self.consecutive_5xx = 0

    def eject(self, now: float, rng: random.Random) -> float:
        """Take the backend out; returns for how long."""
        p = self.passive
        if not self.ejected and self.readmitted_at is not None:
            healthy = now - self.readmitted_at
            self.ejections = max(0, self.ejections - int(healthy // p.max_ejection))
        self.ejections += 1
        self.ejections_total += 1
        nominal = min(p.max_ejection, p.base_ejection * self.ejections)
        duration = nominal * (1.0 - p.jitter * rng.random())
        self.ejected = True
        self.ejected_until = now + duration
        self.trial = False
        self.ramp_start = None
        self.local_failures = self.consecutive_5xx = 0
        return duration

    def eject_for(self, now: float, seconds: float) -> None:
        """Out for `seconds` on another balancer's word: its own back-off
        counted the ejections; ours do not grow."""
        self.ejected = True
        self.ejected_until = now + seconds
        self.ejections_total += 1
        self.trial = False
        self.ramp_start = None
        self.local_failures = self.consecutive_5xx = 0

    def _readmit(self, now: float) -> None:
        self.ejected = False
        self.trial = False
        self.readmitted_at = now
        self._ramp(now)

    def _ramp(self, now: float) -> None:
        if self.slow_start > 0:
            self.ramp_start = now

    # --- active probes

    def probed(self, now: float, ok: bool, reason: str) -> str | None:
        """Count one probe result; returns "up", "down" or "readmitted" when
        that changes the backend's standing, else None."""
        self.probe_reason = reason
        self.probe_busy = False
        if self.probe_up is None:          # the first verdict counts at once
            self.probe_up = ok
            self.probe_streak = 0
            if ok and self.half_open(now):
                self._readmit(now)
                return "readmitted"
            return "up" if ok else "down"
        if ok == self.probe_up:
            self.probe_streak = 0
            if ok and self.half_open(now):
                self._readmit(now)
                return "readmitted"
            return None
        self.probe_streak += 1
        if self.probe_streak < (self.active.rise if ok else self.active.fall):
            return None
        self.probe_up = ok
        self.probe_streak = 0
        if ok:
            if self.half_open(now):
                self._readmit(now)
            else:
                self._ramp(now)
            return "up"
        return "down"

    def probe_was_busy(self, reason: str) -> bool:
        """An inconclusive probe (see probe_inconclusive): the verdict and the
        streak stay as they are.  Returns True if the backend just became busy."""
        became = not self.probe_busy
        self.probe_busy = True
        self.probe_reason = reason
        return became

    # --- the operator

    def set_admin(self, now: float, state: str) -> None:
        if state == self.admin:
            return
        was = self.admin
        self.admin = state
        if state == MAINT:
            # Maintenance starts the backend's record afresh: no ejection
            # (nor its history), no probe verdict until probes resume.
            self.ejected = False
            self.ejections = 0
            self.trial = False
            self.local_failures = self.consecutive_5xx = 0
            self.probe_up = None
            self.probe_streak = 0
            self.probe_busy = False
        elif state == READY and was != READY:
            self._ramp(now)

    # --- reporting

    def state(self, now: float, in_flight: int) -> str:
        if self.admin == MAINT:
            return "maint"
        if self.admin == DRAIN:
            return "draining" if in_flight else "drained"
        if self.probe_up is False:
            return "down"
        if self.ejected:
            return "half-open" if now >= self.ejected_until else "ejected"
        if self.probe_busy:
            return BUSY
        if self.ramp_start is not None and now - self.ramp_start < self.slow_start:
            return "slow-start"
        return "up"
