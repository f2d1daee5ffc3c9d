"""One backend's runtime state: load, counters and its idle-connection pool."""

from __future__ import annotations

import time

from .config import BackendConfig
from .pool import UpstreamPool

# Consecutive connection-level failures (refused, reset, timeout) after which
# a backend counts as down: /health does not count it, and the policy picks
# it only when nothing else is up -- or for one trial request at a time once
# DOWN_TRIAL_AFTER seconds have passed since its last failure, which is how a
# restarted GPU server comes back.  A placeholder for the passive ejection and
# active probes of the scheduling work.
DOWN_AFTER_FAILURES = 3
DOWN_TRIAL_AFTER = 5.0

FAILURE_KINDS = ("connect", "connect_timeout", "reset", "first_byte_timeout",
                 "idle_timeout", "bad_response")


class Backend:
    def __init__(self, cfg: BackendConfig, pool: UpstreamPool):
        self.name = cfg.name
        self.url = cfg.url
        self.host = cfg.host
        self.port = cfg.port
        # Host header for requests that arrive without one (HTTP/1.0).
        self.host_header = cfg.url.split("://", 1)[1].encode("ascii")
        self.pool = pool
        self.in_flight = 0          # requests holding this backend, connecting included
        self.requests = 0           # requests sent here
        self.responses = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.consecutive_failures = 0
        self.last_error: tuple[float, str] | None = None
        self._last_failure_at = 0.0  # monotonic
        self.bytes_sent = 0         # request bodies forwarded to the backend
        self.bytes_received = 0     # response bodies received from it

    @property
    def state(self) -> str:
        return "up" if self.up else "down"

    @property
    def up(self) -> bool:
        return self.consecutive_failures < DOWN_AFTER_FAILURES

    @property
    def usable(self) -> bool:
        """May the policy send a request here now?"""
        if self.consecutive_failures < DOWN_AFTER_FAILURES:
            return True
        return (self.in_flight == 0
                and time.monotonic() - self._last_failure_at >= DOWN_TRIAL_AFTER)

    def record_response(self, status: int) -> None:
        self.responses[f"{min(status // 100, 5)}xx"] += 1
        self.consecutive_failures = 0

    def record_failure(self, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        self.consecutive_failures += 1
        self._last_failure_at = time.monotonic()
        self.last_error = (time.time(), reason)

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "url": self.url,
            "state": self.state,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "responses": dict(self.responses),
            "failures": dict(self.failures),
            "errors": sum(self.failures.values()),
            "last_error": None if self.last_error is None else {
                "time": round(self.last_error[0], 3), "reason": self.last_error[1]},
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "pool": self.pool.snapshot(),
        }
