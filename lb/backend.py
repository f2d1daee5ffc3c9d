"""One backend's runtime state: load, counters and its idle-connection pool."""

from __future__ import annotations

import time

from .config import BackendConfig
from .pool import UpstreamPool

# Consecutive connection-level failures (refused, reset, timeout) after which
# a backend counts as down for /health and is picked only when nothing else
# is up.  A placeholder for the passive ejection of the scheduling work.
DOWN_AFTER_FAILURES = 3

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
        self.bytes_sent = 0         # request bodies forwarded to the backend
        self.bytes_received = 0     # response bodies received from it

    @property
    def state(self) -> str:
        return "down" if self.consecutive_failures >= DOWN_AFTER_FAILURES else "up"

    @property
    def usable(self) -> bool:
        return self.consecutive_failures < DOWN_AFTER_FAILURES

    def record_response(self, status: int) -> None:
        self.responses[f"{min(status // 100, 5)}xx"] += 1
        self.consecutive_failures = 0

    def record_failure(self, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        self.consecutive_failures += 1
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
