"""One `[[tcp.backend]]` at run time: what the scheduler and the policies
read of a backend (name, weight, in_flight, max_concurrency, health), the
same as an HTTP `Backend` has, with a TCP listener's counters instead of
HTTP's (no pool, no statuses).

A slot is a connection: `in_flight` counts the connections holding this
backend, connecting included; `max_connections = 0` (no limit) is a limit
no fleet reaches.
"""

from __future__ import annotations

import time
from collections import deque

from ..config_model import Active, Passive, TcpBackendConfig
from .backend import process_share
from .health import Health
from ..wire.splice import SpliceTally

UNLIMITED = 1 << 40


class TcpBackend:
    def __init__(self, cfg: TcpBackendConfig, *, passive: Passive, active: Active,
                 processes: int = 1):
        self.name = cfg.name
        self.processes = processes      # workers sharing max_connections
        self.host = cfg.host
        self.port = cfg.port
        # No slow start: a TCP slot is a connection, not a GPU job to ramp up to.
        self.health = Health(passive, active, slow_start=0.0)
        self.weight = cfg.weight
        self.max_connections = cfg.max_connections
        self.max_concurrency = self._limit()
        # Kept by the scheduler, as for an HTTP backend.
        self.in_flight = 0
        self.in_flight_elsewhere = 0    # [[tcp]] backends are never shared through Redis
        self.in_flight_since: deque[float] = deque()
        self.last_answer: float | None = None
        self.peak_in_flight = 0
        self.requests = 0               # slots taken: connection attempts
        # Counters of this listener's connections to it.
        self.connect_failures = 0
        self.failures = {"connect": 0, "connect_timeout": 0}
        self.last_error: tuple[float, str] | None = None
        self.connections = SpliceTally()   # made, and joined to their client

    def reconfigure(self, cfg: TcpBackendConfig, *, passive: Passive, active: Active,
                    probed: bool) -> None:
        """A reload kept this backend (same name and address): its state and
        counters stay; `probed`: the listener still runs checks."""
        self.weight = cfg.weight
        self.max_connections = cfg.max_connections
        self.max_concurrency = self._limit()
        self.health.passive = passive
        self.health.active = active
        if not probed:
            self.health.probe_up = None   # no checks now: no verdict holds it out
            self.health.probe_busy = False

    def _limit(self) -> int:
        """This process's share of max_connections (as for HTTP backends)."""
        limit = self.max_connections
        return process_share(limit, self.processes) if limit else UNLIMITED

    def record_failure(self, kind: str, reason: str) -> None:
        """A connection to it could not be made (`kind`: connect | connect_timeout)."""
        self.failures[kind] += 1
        self.connect_failures += 1
        self.last_error = (time.time(), reason)

    def snapshot(self, now: float) -> dict:
        health = self.health
        return {
            "name": self.name,
            "address": f"{self.host}:{self.port}",
            "state": health.state(now, self.in_flight),
            "in_rotation": health.in_rotation(now),
            "admin": health.admin,
            "open": self.in_flight,
            "peak": self.peak_in_flight,
            "total": self.connections.total,
            "attempts": self.requests,
            "max_connections": self.max_connections,
            "weight": self.weight,
            "connect_failures": self.connect_failures,
            "failures": dict(self.failures),
            "last_error": None if self.last_error is None else {
                "time": round(self.last_error[0], 3), "reason": self.last_error[1]},
            "ejections": health.ejections_total,
            "ejected_for_s": (round(health.ejected_until - now, 3)
                              if health.ejected and health.ejected_until > now else 0),
            "probe": None if health.probe_up is None and not health.probe_reason else {
                "up": health.probe_up, "last": health.probe_reason},
            "bytes_to_backend": self.connections.bytes_to_backend,
            "bytes_to_client": self.connections.bytes_to_client,
        }
