"""One backend's runtime state: load, limit, health, counters and its idle-connection pool."""

from __future__ import annotations

import time
from collections import deque

from ..config_model import Active, BackendConfig, Passive
from .health import Health
from ..wire.pool import UpstreamPool
from ..wire.splice import SpliceTally

FAILURE_KINDS = ("connect", "connect_timeout", "reset", "first_byte_timeout",
                 "idle_timeout", "bad_response")


_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def process_share(limit: int, processes: int) -> int:
    """What one of `processes` balancer processes (workers) may send a
    backend at once, so that together they stay within its `limit`:
    floor(limit / processes), at least 1 (a backend must stay usable, so
    with more workers than slots the limit can be passed, by at most
    processes - limit)."""
    return max(1, limit // processes)


class Backend:
    def __init__(self, cfg: BackendConfig, pool: UpstreamPool, *, passive: Passive,
                 active: Active, slow_start: float, processes: int = 1, replicas: int = 1):
        self.cfg = cfg              # as configured (api, formats: the front door reads them)
        self.name = cfg.name
        self.url = cfg.url
        self.host = cfg.host
        self.port = cfg.port
        self.processes = processes  # workers of this replica sharing the backend's slots
        self.replicas = replicas    # [cluster] replicas (1 without): for the static share
        self.shared = False         # the fleet's slots are taken through Redis now
        self.configured_limit = cfg.max_concurrency
        # What the scheduler holds this process to: the whole limit while the
        # fleet shares slots, else this process's static share of it.
        self.max_concurrency = self._limit()
        # Calls the rest of the fleet has here, as last seen (fleet_slots).
        self.in_flight_elsewhere = 0
        self.weight = cfg.weight
        self.health_path = cfg.health_path
        # Host header for requests that arrive without one (HTTP/1.0).
        self.host_header = cfg.url.split("://", 1)[1].encode("ascii")
        self.pool = pool
        self.health = Health(passive, active, slow_start)
        self.in_flight = 0          # requests holding this backend, connecting included
        # For telling a busy backend from a dead one (health.probe_inconclusive): when each
        # request in flight took its slot, oldest first (a release drops the oldest: exact
        # for the blocking servers this is for, which finish in arrival order), and when the
        # backend last answered a request.  Kept by the scheduler.
        self.in_flight_since: deque[float] = deque()
        self.last_answer: float | None = None
        self.peak_in_flight = 0
        # Attempts sent here: retries and two-step audio GETs (which take no
        # slot) included.  Each ends exactly once, so at every moment
        #     requests == sum(responses) + no_response + abandoned + under_way
        # (`failures` also counts failures after a response head came).
        self.requests = 0
        self.responses = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
        self.no_response = 0        # attempts that failed before a response head
        self.abandoned = 0          # given up before a response head: client left, bad body
        self.under_way = 0          # attempts not ended yet (unlike in_flight, GETs too)
        self.failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.last_error: tuple[float, str] | None = None
        self.bytes_sent = 0         # request bodies (and tunnel bytes) forwarded to the backend
        self.bytes_received = 0     # response bodies (and tunnel bytes) received from it
        # Tunnels (after a 101); and upgrade requests the backend answered
        # with anything but a 101.
        self.tunnels = SpliceTally()
        self.handshakes_refused = 0

    def reconfigure(self, cfg: BackendConfig, *, passive: Passive, active: Active,
                    slow_start: float) -> None:
        """A reload kept this backend (same name and URL): new limit, weight,
        probe path and health settings; its state and counters stay."""
        self.cfg = cfg
        self.configured_limit = cfg.max_concurrency
        self.max_concurrency = self._limit()
        self.weight = cfg.weight
        self.health_path = cfg.health_path
        self.health.passive = passive
        self.health.active = active
        self.health.slow_start = slow_start
        if not cfg.health_path:
            self.health.probe_up = None   # no probes now: no verdict holds it out
            self.health.probe_busy = False

    def _limit(self) -> int:
        if self.shared:
            return self.configured_limit
        return process_share(process_share(self.configured_limit, self.replicas),
                             self.processes)

    def use_shared(self, shared: bool) -> None:
        """The fleet's slots are taken through Redis (True), or not: no Redis,
        or Redis is unreachable and this process keeps to its static share."""
        self.shared = shared
        self.max_concurrency = self._limit()

    def attempt_started(self, *, took_slot: bool) -> None:
        """An attempt goes out; one that took a slot was counted in `requests`
        by the scheduler as it took it."""
        if not took_slot:
            self.requests += 1
        self.under_way += 1

    def record_response(self, status: int) -> None:
        """The attempt's response head came: it ends here."""
        self.under_way -= 1
        self.responses[_STATUS_CLASSES[min(status // 100, 5)]] += 1

    def record_failure(self, kind: str, reason: str, *, ends_attempt: bool = True) -> None:
        """`ends_attempt`: False for a failure after the response head (the
        attempt was counted under `responses` then)."""
        self.failures[kind] += 1
        self.last_error = (time.time(), reason)
        if ends_attempt:
            self.under_way -= 1
            self.no_response += 1

    def record_abandoned(self) -> None:
        """The attempt was given up before its response head, not for the backend's fault."""
        self.under_way -= 1
        self.abandoned += 1

    def snapshot(self, now: float) -> dict:
        health = self.health
        return {
            "name": self.name,
            "url": self.url,
            "state": health.state(now, self.in_flight),
            "in_rotation": health.in_rotation(now),
            "admin": health.admin,
            "in_flight": self.in_flight,
            "fleet_in_flight": self.in_flight + self.in_flight_elsewhere,
            "peak_in_flight": self.peak_in_flight,
            "max_concurrency": self.configured_limit,
            "process_limit": self.max_concurrency,   # what this process holds it to
            "limit_now": health.limit(now, self.max_concurrency),
            "weight": self.weight,
            "requests": self.requests,
            "responses": dict(self.responses),
            "no_response": self.no_response,
            "abandoned": self.abandoned,
            "under_way": self.under_way,
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
                "busy": health.probe_busy,
                "last": health.probe_reason,
            },
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "tunnels": {"open": len(self.tunnels.open), "total": self.tunnels.total,
                        "refused": self.handshakes_refused,
                        "bytes_to_backend": self.tunnels.bytes_to_backend,
                        "bytes_to_client": self.tunnels.bytes_to_client},
            "pool": self.pool.snapshot(),
        }
