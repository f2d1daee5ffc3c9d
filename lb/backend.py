"""One backend's runtime state: load, limit, health, counters and its idle-connection pool."""

from __future__ import annotations

import time

from .config import Active, BackendConfig, Passive
from .health import Health
from .pool import UpstreamPool

FAILURE_KINDS = ("connect", "connect_timeout", "reset", "first_byte_timeout",
                 "idle_timeout", "bad_response")


class Backend:
    def __init__(self, cfg: BackendConfig, pool: UpstreamPool, *, passive: Passive,
                 active: Active, slow_start: float):
        self.name = cfg.name
        self.url = cfg.url
        self.host = cfg.host
        self.port = cfg.port
        self.max_concurrency = cfg.max_concurrency
        self.weight = cfg.weight
        self.health_path = cfg.health_path
        # Host header for requests that arrive without one (HTTP/1.0).
        self.host_header = cfg.url.split("://", 1)[1].encode("ascii")
        self.pool = pool
        self.health = Health(passive, active, slow_start)
        self.in_flight = 0          # requests holding this backend, connecting included
        self.peak_in_flight = 0
        self.requests = 0           # requests sent here (attempts, retries included)
        self.responses = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.last_error: tuple[float, str] | None = None
        self.bytes_sent = 0         # request bodies forwarded to the backend
        self.bytes_received = 0     # response bodies received from it

    def reconfigure(self, cfg: BackendConfig, *, passive: Passive, active: Active,
                    slow_start: float) -> None:
        """A reload kept this backend (same name and URL): new limit, weight,
        probe path and health settings; its state and counters stay."""
        self.max_concurrency = cfg.max_concurrency
        self.weight = cfg.weight
        self.health_path = cfg.health_path
        self.health.passive = passive
        self.health.active = active
        self.health.slow_start = slow_start
        if not cfg.health_path:
            self.health.probe_up = None   # no probes now: no verdict holds it out

    def record_response(self, status: int) -> None:
        self.responses[f"{min(status // 100, 5)}xx"] += 1

    def record_failure(self, kind: str, reason: str) -> None:
        self.failures[kind] += 1
        self.last_error = (time.time(), reason)

    def snapshot(self, now: float) -> dict:
        health = self.health
        return {
            "name": self.name,
            "url": self.url,
            "state": health.state(now, self.in_flight),
            "admin": health.admin,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "max_concurrency": self.max_concurrency,
            "limit_now": health.limit(now, self.max_concurrency),
            "weight": self.weight,
            "requests": self.requests,
            "responses": dict(self.responses),
            "failures": dict(self.failures),
            "errors": sum(self.failures.values()),
            "last_error": None if self.last_error is None else {
                "time": round(self.last_error[0], 3), "reason": self.last_error[1]},
            "ejections": health.ejections_total,
            "ejected_for_s": (round(health.ejected_until - now, 3)
                              if health.ejected and health.ejected_until > now else 0),
            "probe": None if not self.health_path else {
                "path": self.health_path,
                "up": health.probe_up,
                "last": health.probe_reason,
            },
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "pool": self.pool.snapshot(),
        }
